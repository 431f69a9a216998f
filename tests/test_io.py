"""Atomic writes: a failure part-way leaves the previous output whole and no temp files behind."""

import errno
import json
import os

import numpy as np
import pytest

from pipeline.io import (
    atomic_dir,
    atomic_open,
    read_json,
    save_npy,
    split_metrics,
    timings_path,
    write_json,
    write_metrics,
)


def test_write_json_round_trip(tmp_path):
    write_json(tmp_path / "a" / "m.json", {"x": 1, "y": "é"})
    assert read_json(tmp_path / "a" / "m.json") == {"x": 1, "y": "é"}


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"good": True})
    with pytest.raises(OSError), atomic_open(path) as fh:
        fh.write('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(path.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_failed_npy_write_keeps_previous_array(tmp_path, monkeypatch):
    path = tmp_path / "a.npy"
    save_npy(path, np.arange(3))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_npy(path, np.arange(10))
    monkeypatch.undo()
    assert np.load(path).tolist() == [0, 1, 2]
    assert len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_replaces_whole_or_nothing(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "one.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as d:
        (d / "two.txt").write_text("2")
        raise RuntimeError("killed mid-stage")
    assert sorted(p.name for p in out.iterdir()) == ["one.txt"]
    with atomic_dir(out) as d:
        (d / "three.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["three.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: not found"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="bad.json: not valid UTF-8 JSON"):
        read_json(tmp_path / "bad.json")


def test_outputs_get_umask_permissions_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_metrics_keep_results_and_counts_and_move_timings_beside_them(tmp_path):
    metrics = {"images": 24, "errored": 0, "bleu_4": 0.5, "family": "lstm_lm", "enabled": False,
               "skipped": {"missing_file": 0, "empty_file": 2, "truncated_image": 0},
               "stripped": {"documents": 0, "characters": 0}, "best_config": {"models.x.layers": 0},
               "overrides": {}, "seconds": 1.5, "check_seconds": 0.1, "images_per_second": 16.0,
               "wall_seconds": 9.0, "gpu_seconds": 0.0, "splits": {"train": {"seconds": 2.0, "images": 8}}}
    path = tmp_path / "metrics" / "prepare_coco.json"
    write_metrics(path, metrics)
    # top-level zeros are results (errored: 0); a breakdown lists only what happened; params keys stay as set
    assert read_json(path) == {"images": 24, "errored": 0, "bleu_4": 0.5, "family": "lstm_lm", "enabled": False,
                               "skipped": {"empty_file": 2}, "best_config": {"models.x.layers": 0},
                               "overrides": {}, "splits": {"train": {"images": 8}}}
    assert timings_path(path) == tmp_path / "metrics" / "timings" / "prepare_coco.json"
    assert read_json(timings_path(path)) == {"seconds": 1.5, "check_seconds": 0.1, "images_per_second": 16.0,
                                             "wall_seconds": 9.0, "gpu_seconds": 0.0,
                                             "splits": {"train": {"seconds": 2.0}}}
    assert metrics["skipped"]["missing_file"] == 0 and metrics["seconds"] == 1.5  # the caller's dict is untouched


def test_metrics_without_timings_remove_a_previous_runs_timings(tmp_path):
    path = tmp_path / "sample.json"
    write_metrics(path, {"images": 3, "seconds": 1.0})
    assert timings_path(path).is_file()
    write_metrics(path, {"images": 3})
    assert read_json(path) == {"images": 3} and not timings_path(path).exists()
    # a zero rate is a measurement (nothing out of vocabulary), a zero count inside a breakdown is not
    assert split_metrics({"val": {"oov_rate": 0.0, "types": 0}}) == ({"val": {"oov_rate": 0.0}}, {})
