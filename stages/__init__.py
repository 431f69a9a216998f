"""DVC stages: one module per stage, each a `run(params)` and the `main()` that `dvc repro` calls."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import DEBUG_ENV, VERBOSE_ENV, debug_requested, run_entry
from pipeline.params import Params
from pipeline.quiet import quiet


def best_path(p: Params, family: str) -> Path:
    """Where sweep@<family> writes its best configuration and train@<family> reads it."""
    return Path(p.paths.sweeps) / family / "best.json"


def entry(work: Callable[[], Any]) -> None:
    """Run a stage's work through the one error path: a known error is one line (CAPLINE_DEBUG=1: traceback too);
    third-party chatter is off unless CAPLINE_VERBOSE=1."""
    quiet(debug_requested(os.environ.get(VERBOSE_ENV)))
    run_entry(work, debug=debug_requested(os.environ.get(DEBUG_ENV)))
