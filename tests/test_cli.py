"""The capline CLI: params inspection, overrides through the one loader, running a stage."""

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import ROOT

runner = CliRunner()
PARAMS = str(ROOT / "params.yaml")


def test_params_check_ok_and_show_applies_set():
    assert runner.invoke(app, ["params", "check", "--params", PARAMS]).exit_code == 0
    result = runner.invoke(app, ["params", "show", "--params", PARAMS, "--set", "vocab.min_freq=9"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout)["vocab"]["min_freq"] == 9


def test_bad_set_exits_2_naming_the_key():
    result = runner.invoke(app, ["params", "check", "--params", PARAMS, "--set", "vocab.min_freq=-1"])
    assert result.exit_code == 2
    assert "vocab.min_freq" in result.output and "greater than or equal to 1" in result.output
    result = runner.invoke(app, ["params", "check", "--params", PARAMS, "-S", "vocab.nope=1"])
    assert result.exit_code == 2 and "vocab.nope: unknown key" in result.output


def test_stage_command_runs_with_overrides(tmp_path: Path):
    result = runner.invoke(app, ["stage", "prepare_text", "--params", PARAMS,
                                 "--set", f"paths.text={tmp_path / 'text'}",
                                 "--set", f"paths.metrics={tmp_path / 'metrics'}"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "text" / "train.words.txt").stat().st_size > 0
    assert (tmp_path / "metrics" / "prepare_text.json").is_file()


def test_a_known_error_is_one_line_and_exit_1_and_debug_adds_the_traceback(tmp_path: Path):
    args = ["stage", "prepare_text", "--params", PARAMS, "--set", f"data.text.files=[{tmp_path / 'nope.txt'}]",
            "--set", f"paths.text={tmp_path / 'text'}", "--set", f"paths.metrics={tmp_path / 'metrics'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    missing = tmp_path / "nope.txt"
    assert result.stderr == f"capline: data.text.files: {missing}: cannot read (No such file or directory)\n"
    result = runner.invoke(app, ["--debug", *args])
    assert result.exit_code == 1 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("capline: data.text.files:")


def test_python_dash_m_pipeline():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "data" in proc.stdout and "stage" in proc.stdout


@pytest.fixture
def local_server(tmp_path: Path):
    """Serve tmp_path/www over HTTP on 127.0.0.1 (a free port) for the duration of a test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_data_download_tinyshakespeare_from_a_mirror(local_server, shared_data, tmp_path: Path):
    root, url = local_server
    source = shared_data / "text" / "tinyshakespeare.txt"
    (root / "input.txt").write_bytes(source.read_bytes())
    result = runner.invoke(app, ["data", "download", "tinyshakespeare", "--dest", str(tmp_path / "ts"),
                                 "--base-url", url, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ts" / "tinyshakespeare.txt").read_bytes() == source.read_bytes()


def test_data_download_bad_checksum_is_a_clear_error(local_server, tmp_path: Path):
    root, url = local_server
    (root / "input.txt").write_bytes(b"not shakespeare")
    result = runner.invoke(app, ["data", "download", "tinyshakespeare", "--dest", str(tmp_path / "ts"),
                                 "--base-url", url, "--no-progress"])
    assert result.exit_code == 1
    assert "tinyshakespeare.txt" in result.output or "input.txt" in result.output
    assert not (tmp_path / "ts" / "tinyshakespeare.txt").exists()


def test_runs_and_reproduce_never_create_a_store_that_is_not_there(tmp_path: Path):
    db = tmp_path / "mlflow.db"
    uri = ["--params", str(ROOT / "params.yaml"), "--set", f"tracking.uri=sqlite:///{db}"]
    result = runner.invoke(app, ["runs", *uri])
    assert result.exit_code == 1 and "no sweep in sqlite:///" in result.output
    result = runner.invoke(app, ["reproduce", "abc123", *uri])
    assert result.exit_code == 1 and "no MLflow store there (nothing tracked yet)" in result.output
    assert not db.exists()


def test_reproduce_names_an_ambiguous_or_unknown_run_id_start(tmp_path: Path):
    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = [tracking.create_run(uri, "capline", f"r{i}") for i in range(2)]
    assert tracking.resolve_run_id(uri, "capline", ids[0][:10]) == ids[0]
    assert tracking.resolve_run_id(uri, "capline", ids[1]) == ids[1]
    with pytest.raises(ValueError, match=r"run id 'zz': no run of experiment 'capline' start with it; give more"):
        tracking.resolve_run_id(uri, "capline", "zz")
    with pytest.raises(ValueError, match=r"run id '': 2 runs \("):
        tracking.resolve_run_id(uri, "capline", "")


# ---- `capline runs` / `capline reproduce` as a user runs them: the installed console script, 80 columns

CAPLINE = str(Path(sys.executable).parent / "capline")
OUTCOMES = ("completed", "early_stopped", "early_stopped", "errored")


def capline(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "CAPLINE_DEBUG"}, "COLUMNS": "80"}
    return subprocess.run([CAPLINE, *args, "--params", PARAMS], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def sweep_store(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A store with one lstm_lm sweep whose trials end as pipeline.tuning.records leaves them: ASHA's stops
    FINISHED in MLflow with sweep.status early_stopped. The trials carry no `family` tag, so `capline reproduce`
    stops right after finding the run (naming its whole id) instead of training."""
    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    parent = tracking.create_run(uri, "capline", "sweep", tags={"capline.kind": "sweep", "family": "lstm_lm"})
    trials = {}
    for i, outcome in enumerate(OUTCOMES):
        run = tracking.create_run(uri, "capline", f"trial {i}", tags={"ray.trial_id": f"a1b2c_0000{i}"},
                                  parent_run_id=parent)
        tracking.log_metrics(run, {"val/loss": 2.5 + i / 10})
        tracking.log_params_flat(run, {"train.lstm_lm.lr": 0.0019883638792294106 * (i + 1),
                                       "models.lstm_lm.cell": "gru"})
        tracking.set_tags(run, {"sweep.status": outcome})
        tracking.end_run("FAILED" if outcome == "errored" else "FINISHED", run)
        trials[f"a1b2c_0000{i}"] = run
    tracking.end_run("FINISHED", parent)
    return uri, trials


def test_runs_in_80_columns_shows_each_trials_outcome_and_an_id_reproduce_takes(sweep_store, tmp_path: Path):
    uri, trials = sweep_store
    shown = capline(tmp_path, "runs", "lstm_lm", "--set", f"tracking.uri={uri}")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in shown.stdout, shown.stdout  # nothing cut
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    rows = {row[0]: row[1:] for row in cells}  # trial -> run id, status, val/loss, lr, cell, dropout
    assert [rows[t][1] for t in trials] == list(OUTCOMES)  # Tune's outcome, not MLflow's FINISHED
    assert [rows[t][3] for t in trials] == ["0.001988", "0.003977", "0.005965", "0.007953"]  # lr, readable
    assert all(run_id.startswith(rows[t][0]) and len(rows[t][0]) >= 8 for t, run_id in trials.items())
    stopped = trials["a1b2c_00001"]
    again = capline(tmp_path, "reproduce", rows["a1b2c_00001"][0], "--set", f"tracking.uri={uri}")  # as shown
    assert (again.returncode, again.stderr) == (
        1, f"capline: MLflow run {stopped} is not a capline trial (tag 'family' is None)\n")  # found: its whole id


def test_reproduce_names_an_unknown_or_ambiguous_start_in_one_line(sweep_store, tmp_path: Path):
    uri, trials = sweep_store
    unknown = capline(tmp_path, "reproduce", "zz", "--set", f"tracking.uri={uri}")
    assert (unknown.returncode, unknown.stderr) == (1, "capline: run id 'zz': no run of experiment 'capline' start "
                                                       "with it; give more of the id (capline runs lists them)\n")
    every = capline(tmp_path, "reproduce", "", "--set", f"tracking.uri={uri}")  # the start of all five runs
    assert every.returncode == 1 and every.stderr.startswith("capline: run id '': 5 runs (")
    assert every.stderr.count("\n") == 1 and "give more of the id" in every.stderr


def test_runs_and_reproduce_leave_no_store_where_there_was_none(tmp_path: Path):
    for args in (["runs"], ["reproduce", "abc123"]):  # with the default tracking.uri: sqlite:///mlflow.db
        done = capline(tmp_path, *args)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert list(tmp_path.iterdir()) == [], args  # no mlflow.db, no mlartifacts/
