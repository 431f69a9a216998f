"""Third-party chatter is off by default and back with verbose (pipeline/quiet.py, `capline -v`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = """
import sys, warnings
from pipeline.quiet import quiet
quiet(sys.argv[1] == "verbose")
import os
import pytorch_lightning as pl
pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
from mlflow.utils.warnings_utils import color_warning
color_warning("Add type hints to the `predict` method to enable data validation", 1, "yellow")
color_warning("An input example was not provided when logging the model. To ensure", 1, "yellow")
warnings.warn("something new", UserWarning)
print("progress bars:", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "default"))
"""


def run(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_lightning_banners_and_known_warnings_show_only_when_verbose(mode):
    out = run(mode)
    chatty = mode == "verbose"
    assert ("GPU available" in out) == chatty
    assert ("Add type hints" in out) == chatty and ("An input example" in out) == chatty
    assert "something new" in out  # any other warning still shows
    assert f"progress bars: {'default' if chatty else 'false'}" in out


def test_capline_v_keeps_the_chatter_for_the_stages_it_runs_too(monkeypatch):
    import os

    from typer.testing import CliRunner

    from pipeline.cli import app

    for flag in ("-v", "--verbose"):
        monkeypatch.setenv("CAPLINE_VERBOSE", "0")  # restored after the test
        result = CliRunner().invoke(app, [flag, "params", "check", "--params", str(ROOT / "params.yaml")])
        assert result.exit_code == 0, result.output
        assert os.environ["CAPLINE_VERBOSE"] == "1"  # what `capline -v repro` hands to dvc's stages
