"""Reading the report's inputs: curves, metrics files, `dvc metrics diff` in a real git + DVC repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.io import write_metrics
from pipeline.report.sources import (
    dvc_metrics_diff,
    flatten_numbers,
    frequent_words,
    metrics_files,
    read_curve,
    read_metrics,
)

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def test_curve_rows_are_numbers_and_blank_cells_are_left_out(tmp_path):
    path = tmp_path / "curve.csv"
    path.write_text("epoch,step,train_loss,val_loss,val_cider\n0,10,2.5,2.7,\n1,20,2.0,2.2,0.3\n")
    assert read_curve(path) == [{"epoch": 0.0, "step": 10.0, "train_loss": 2.5, "val_loss": 2.7},
                                {"epoch": 1.0, "step": 20.0, "train_loss": 2.0, "val_loss": 2.2, "val_cider": 0.3}]
    assert read_curve(tmp_path / "absent.csv") is None
    path.write_text("epoch,train_loss\n0,oops\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected numbers")):
        read_curve(path)
    path.write_text("step,train_loss\n0,1\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field 'epoch'")):
        read_curve(path)


def test_metrics_files_keep_numeric_leaves_as_dotted_keys(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"x": 1, "nested": {"y": 2.5, "z": "text"}, "flag": True,
                                                 "list": [1, 2]}))
    (tmp_path / "a.json").write_text(json.dumps({"k": 0.5}))
    (tmp_path / "report.json").write_text(json.dumps({"html_bytes": 9}))
    assert metrics_files(tmp_path, exclude=("report.json",)) == {"a.json": {"k": 0.5},
                                                                 "b.json": {"x": 1, "nested.y": 2.5}}
    assert flatten_numbers({"a": {"b": {"c": 3}}}) == {"a.b.c": 3}
    assert metrics_files(tmp_path / "none") == {}


def test_metrics_section_shows_what_stages_compare_not_their_timings(tmp_path):
    write_metrics(tmp_path / "prepare_coco.json", {"images": 8, "skipped": {"missing_file": 0, "empty_file": 1},
                                                   "seconds": 2.0, "images_per_second": 4.0})
    assert (tmp_path / "timings" / "prepare_coco.json").is_file()  # there, but not a metric of the report
    assert metrics_files(tmp_path) == {"prepare_coco.json": {"images": 8, "skipped.empty_file": 1}}


def test_read_metrics_gives_back_what_the_stage_wrote_timings_included(tmp_path):
    written = {"trials": 4, "errored": 0, "best_config": {"models.x.layers": 0}, "wall_seconds": 92.7,
               "splits": {"train": {"images": 8, "seconds": 1.5}}}
    write_metrics(tmp_path / "sweep_lstm_lm.json", written)
    assert "wall_seconds" not in json.loads((tmp_path / "sweep_lstm_lm.json").read_text())
    assert read_metrics(tmp_path, "sweep_lstm_lm.json") == written  # the sweep table's wall seconds come back
    (tmp_path / "timings" / "sweep_lstm_lm.json").unlink()  # a fresh clone: timings are not committed
    assert read_metrics(tmp_path, "sweep_lstm_lm.json") == {k: v for k, v in written.items() if k != "wall_seconds"
                                                           } | {"splits": {"train": {"images": 8}}}
    assert read_metrics(tmp_path, "sweep_captioner.json") is None


def test_frequent_words_skip_specials_and_untrained_rows(tmp_path):
    from pipeline.data.vocab import Vocabulary

    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "the", "red", "circle"], {"the": 9, "red": 5})
    vocab.save(tmp_path / "words.json")
    matrix = np.ones((7, 3), np.float32)
    matrix[5] = 0  # never trained: no direction to place
    words, vectors = frequent_words(tmp_path / "words.json", matrix, 10)
    assert words == ["the", "circle"] and vectors.shape == (2, 3)
    with pytest.raises(ValueError, match="does not match"):
        frequent_words(tmp_path / "words.json", matrix[:5], 10)


def test_metrics_diff_outside_a_repository_says_there_is_nothing_to_compare(tmp_path):
    diff, note = dvc_metrics_diff(tmp_path)
    assert diff is None and note.startswith("no previous commit to compare with")


def sh(cwd: Path, *args: str) -> None:
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"


def test_metrics_diff_against_the_last_commit_in_a_real_dvc_repo(tmp_path):
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate_lstm_lm.json\n")
    metrics = tmp_path / "metrics" / "evaluate_lstm_lm.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"bits_per_char": 3.0, "tokens": 10}))
    assert dvc_metrics_diff(tmp_path)[0] is None  # no commit yet
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "first")
    metrics.write_text(json.dumps({"bits_per_char": 2.5, "tokens": 10}))
    diff, note = dvc_metrics_diff(tmp_path)
    assert note == "change since the last commit (HEAD)"
    entry = diff["evaluate_lstm_lm.json"]
    assert (entry["bits_per_char"]["old"], entry["bits_per_char"]["new"]) == (3.0, 2.5)
    assert entry["bits_per_char"]["diff"] == pytest.approx(-0.5)
    assert entry["tokens"]["old"] == 10  # --all: unchanged metrics come with their old value too
