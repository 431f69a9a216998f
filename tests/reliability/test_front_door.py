"""Known errors reach the user as one line, whichever door they came in by; --debug shows the traceback.

The three doors are the installed `capline` script, `python -m pipeline` and `python -m stages.X` (what DVC runs);
each is run here as a real subprocess, as a user or `dvc repro` would, in a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import run_entry
from pipeline.io import read_json
from pipeline.params import apply_overrides
from tests.conftest import ROOT, TINY, overrides_under, params_under

BIN = Path(sys.executable).parent
CAPLINE = shutil.which("capline", path=str(BIN)) or str(BIN / "capline")
DEEP = 100_000  # levels of nesting: far past Python's recursion limit


def run(args: list[str], cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CAPLINE_DEBUG"}
    if debug:
        env["CAPLINE_DEBUG"] = "1"
    return subprocess.run(args, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def one_line(proc: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """The process exited `code` with exactly one line on stderr, naming every one of `names`, no traceback."""
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, report
    assert len(lines) == 1 and lines[0].startswith("capline: "), report
    assert "Traceback" not in proc.stderr + proc.stdout, report
    for name in names:
        assert name in lines[0], report
    return lines[0]


def write_params(folder: Path, overrides: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(raw, {**TINY, **overrides}), sort_keys=False), encoding="utf-8")
    return path


def missing_text(tmp_path: Path) -> dict:
    """Params whose text corpus is a file that does not exist (prepare_text stops with FileNotFoundError)."""
    return {"data.text.files": [str(tmp_path / "nope.txt")], "paths.text": str(tmp_path / "text"),
            "paths.metrics": str(tmp_path / "metrics")}


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


DOORS = {  # door -> argv that runs the prepare_text stage with params.yaml of the cwd
    "console script": [CAPLINE, "stage", "prepare_text"],
    "python -m pipeline": [sys.executable, "-m", "pipeline", "stage", "prepare_text"],
    "python -m stages": [sys.executable, "-m", "stages.prepare_text"],
}


@pytest.mark.parametrize("door", list(DOORS))
def test_a_missing_file_is_one_line_and_exit_1_at_every_door(door, tmp_path):
    write_params(tmp_path, missing_text(tmp_path))
    proc = run(DOORS[door], tmp_path)
    one_line(proc, 1, "data.text.files", str(tmp_path / "nope.txt"))
    assert not (tmp_path / "text").exists()


@pytest.mark.parametrize("door", list(DOORS))
def test_bad_params_are_one_line_and_exit_2_at_every_door(door, tmp_path):
    write_params(tmp_path, {**missing_text(tmp_path), "seed": -1})
    one_line(run(DOORS[door], tmp_path), 2, "params.yaml", "seed", "greater than or equal to 0")


@pytest.mark.parametrize("door", ["console script", "python -m stages"])
def test_capline_debug_shows_the_traceback_with_the_same_line_and_exit_code(door, tmp_path):
    write_params(tmp_path, missing_text(tmp_path))
    proc = run(DOORS[door], tmp_path, debug=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "FileNotFoundError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("capline: data.text.files: ")


def test_the_debug_option_shows_the_traceback(tmp_path):
    write_params(tmp_path, {**missing_text(tmp_path), "seed": -1})
    proc = run([CAPLINE, "--debug", "params", "check"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "ParamsError" in proc.stderr


def test_usage_errors_keep_their_usage_message(tmp_path):
    proc = run([CAPLINE, "train", "nope"], tmp_path)
    assert proc.returncode == 2 and "Usage:" in proc.stderr and "nope" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run([sys.executable, "-m", "stages.train", "nope"], tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("usage: python -m stages.train"), proc.stderr


def test_a_dvc_stage_fails_with_one_line(tmp_path):
    """`dvc repro` runs `python -m stages.X`: the stage's own stderr is one line (DVC adds its ERROR line)."""
    write_params(tmp_path, missing_text(tmp_path))
    dvc_yaml = {"stages": {"prepare_text": {"cmd": "python -m stages.prepare_text", "params": ["data.text"],
                                            "outs": ["text"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml), encoding="utf-8")
    env_path = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # `python` in the stage command: this virtualenv's
    for args in (["dvc", "init", "-q", "--no-scm"], ["dvc", "config", "core.analytics", "false"],
                 ["dvc", "repro", "prepare_text"]):
        proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PATH": env_path, "OMP_NUM_THREADS": "1"}, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    ours = [line for line in output.splitlines() if line.startswith("capline: ")]
    assert len(ours) == 1 and "data.text.files" in ours[0], output
    assert "exited with 1" in output, output


def raising(err: BaseException):
    def entry() -> None:
        raise err
    return entry


def test_each_known_error_is_one_line_with_its_exit_code(capsys):
    from pipeline.data.download import DownloadError
    from pipeline.params import ParamsError
    from pipeline.training.callbacks import NonFiniteLossError

    for err, code in ((ParamsError("invalid params: p.yaml: seed: bad"), 2), (ValueError("f.json: bad"), 1),
                      (FileNotFoundError("f: not found"), 1), (ConnectionError("tracking.uri x: unreachable"), 1),
                      (NonFiniteLossError("non-finite training loss"), 1), (DownloadError("url: 404"), 1)):
        with pytest.raises(SystemExit) as stop:
            run_entry(raising(err))
        assert stop.value.code == code
        assert capsys.readouterr().err == f"capline: {err}\n"


def test_unknown_exceptions_keep_their_traceback(capsys):
    for err in (KeyError("a bug"), RuntimeError("a bug"), RecursionError("a bug")):
        with pytest.raises(type(err)):
            run_entry(raising(err))
    assert capsys.readouterr().err == ""


# --- inputs that used to escape as a RecursionError, a ValueError without a file, or a Lightning message ---

def test_json_nested_too_deeply_names_the_file(tmp_path):
    path = tmp_path / "words.json"
    path.write_text("[" * DEEP + "]" * DEEP, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: JSON nested too deeply"):
        read_json(path)
    path.write_text('{"n": ' + "7" * 5000 + "}", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON: .*5000 digits"):
        read_json(path)


def test_params_nested_too_deeply_are_one_line_and_exit_2(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * DEEP + "]" * DEEP, encoding="utf-8")
    one_line(run([CAPLINE, "params", "check", "--params", str(deep)], tmp_path), 2, str(deep), "nested too deeply")
    one_line(run([CAPLINE, "params", "check", "--params", str(ROOT / "params.yaml"),
                  "--set", "seed=" + "[" * 50_000 + "]" * 50_000], tmp_path), 2, "--set seed", "nested too deeply")


def coco_input(tmp_path: Path, captions_json: str, **overrides: object) -> None:
    """Two real JPEGs, a captions file with `captions_json`, and params.yaml reading them from tmp_path."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name, colour in (("a.jpg", (200, 10, 10)), ("b.jpg", (10, 200, 10))):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "images" / name)
    (tmp_path / "captions.json").write_text(captions_json, encoding="utf-8")
    write_params(tmp_path, {"data.coco.annotations": str(tmp_path / "captions.json"),
                            "data.coco.images": str(tmp_path / "images"), "paths.coco": str(tmp_path / "coco"),
                            "paths.metrics": str(tmp_path / "metrics"), **overrides})


def test_an_image_id_of_5000_digits_is_skipped_and_counted_by_the_dvc_stage(tmp_path):
    big = "1" * 5000  # more digits than Python converts to or from text (sys.get_int_max_str_digits)
    captions = {"images": [{"id": "BIG", "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                "annotations": [{"id": 1, "image_id": "BIG", "caption": "a red square"},
                                {"id": 2, "image_id": 2, "caption": "a green square"}]}
    coco_input(tmp_path, json.dumps(captions).replace('"BIG"', big),
               **{"prepare_coco.split.val": 0, "prepare_coco.split.test": 0,
                  "prepare_coco.max_skipped_fraction": 0.9})
    proc = run([sys.executable, "-m", "stages.prepare_coco"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output
    assert "images[0]: field 'id'" in output and "annotations[0]: field 'image_id'" in output, output
    skipped = read_json(tmp_path / "metrics" / "prepare_coco.json")["skipped"]
    assert (skipped["bad_image_record"], skipped["bad_caption_record"]) == (1, 1)


def test_a_captions_file_nested_100000_levels_is_one_line_from_the_dvc_stage(tmp_path):
    coco_input(tmp_path, '{"images": ' + "[" * DEEP + "]" * DEEP + ', "annotations": []}')
    one_line(run([sys.executable, "-m", "stages.prepare_coco"], tmp_path), 1, "captions.json", "nested too deeply")
    assert not (tmp_path / "coco").exists()


def test_search_spaces_outside_the_fields_range_are_rejected_by_params_check(tmp_path):
    lr = "sweep.lstm_lm.space={train.lstm_lm.lr: {uniform: [-1, -0.5]}}"
    line = one_line(run([CAPLINE, "params", "check", "--params", str(ROOT / "params.yaml"), "--set", lr], tmp_path),
                    2, "sweep.lstm_lm.space.train.lstm_lm.lr", "greater than 0")
    assert "-1" in line
    arch = "sweep.captioner.space={models.captioner.arch: {choice: [show_tell, nope]}}"
    one_line(run([CAPLINE, "params", "check", "--params", str(ROOT / "params.yaml"), "--set", arch], tmp_path),
             2, "sweep.captioner.space.models.captioner.arch", "'nope'")


def test_a_seed_too_large_for_numpy_is_rejected_by_params_check(tmp_path):
    one_line(run([CAPLINE, "params", "check", "--params", str(ROOT / "params.yaml"), "--set", f"seed={2 ** 32}"],
                 tmp_path), 2, "seed", "less than 4294967296")


def test_an_epoch_fraction_below_one_batch_stops_before_training_naming_both_keys(prepared_params, tmp_path):
    from pipeline.training.fit import train

    p = params_under(prepared_params, tmp_path, **{"train.lstm_lm.epoch_fraction": 1e-6})
    with pytest.raises(ValueError, match=r"train.lstm_lm.epoch_fraction \(sweep.lstm_lm.epoch_fraction in a sweep\)"
                                         r" is 1e-06: less than one of the \d+ training batches"):
        train(p, "lstm_lm", logger=False)
    assert not (tmp_path / "models").exists()  # nothing trained or written


def test_a_sweep_whose_trials_would_get_no_batch_stops_before_ray_starts(prepared_params, tmp_path):
    given = {**overrides_under(prepared_params, tmp_path), "paths.ray_storage": str(tmp_path / "ray"),
             "sweep.lstm_lm.epoch_fraction": 1e-6,
             "sweep.lstm_lm.space": {"train.lstm_lm.batch_size": {"choice": [4, 8]}}}
    argv = [CAPLINE, "sweep", "lstm_lm", "--params", str(ROOT / "params.yaml"), *sets(given)]
    line = one_line(run(argv, tmp_path), 1)
    assert re.fullmatch(r"capline: train\.lstm_lm\.epoch_fraction \(sweep\.lstm_lm\.epoch_fraction in a sweep\) is "
                        r"1e-06: less than one of the \d+ training batches per epoch; raise it to at least [\d.e-]+ "
                        r"or lower train\.lstm_lm\.batch_size \(8\)", line), line  # the space's largest batch
    assert not (tmp_path / "ray").exists()  # Ray never started a sweep
