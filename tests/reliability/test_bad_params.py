"""Bad params stop `capline train` and `capline sweep` before any work: exit 2, the key named, nothing written.

How each kind of mistake is worded is tested in tests/test_params.py; `dvc exp run -S` with a bad value in
tests/test_dvc_pipeline.py. Here: the commands that would start training or a Ray cluster never get that far.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import ROOT, tiny_overrides

FAMILY = "lstm_lm"
BAD = {  # kind -> (override, what the message must say)
    "unknown key": ({f"train.{FAMILY}.lrr": 0.1}, f"train.{FAMILY}.lrr: unknown key"),
    "wrong type": ({f"train.{FAMILY}.batch_size": "eight"}, f"train.{FAMILY}.batch_size: Input should be a valid int"),
    "out of range": ({f"train.{FAMILY}.lr": -1.0}, f"train.{FAMILY}.lr: Input should be greater than"),
    "empty search space": ({f"sweep.{FAMILY}.space": {}}, f"sweep.{FAMILY}.space: Dictionary should have at least 1"),
    "space on a missing key": ({f"sweep.{FAMILY}.space": {f"train.{FAMILY}.lrr": {"loguniform": [1e-3, 1e-2]}}},
                               f"space.train.{FAMILY}.lrr: no such params key"),
}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_params_stop_the_command_before_any_work_naming_the_key(tmp_path, command, kind):
    override, message = BAD[kind]
    sets = {**tiny_overrides(tmp_path), "paths.ray_storage": str(tmp_path / "ray"), **override}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    before = files_under(tmp_path)

    result = CliRunner().invoke(app, [command, FAMILY, "--params", str(ROOT / "params.yaml"), *args])

    assert result.exit_code == 2, result.output
    assert message in result.output
    assert files_under(tmp_path) == before  # no data, checkpoint, MLflow store or Ray folder
