"""The full embedded `dvc repro`: every stage of dvc.yaml with the committed params, in a fresh clone.

Opt-in (`python -m bench repro`: about a quarter of an hour on 2 cores). The clone holds the last commit, not
the working tree; the virtualenv of this interpreter goes first on PATH. One cold run is the figure (a
second `dvc repro` finds everything up to date, so there is nothing to repeat); it is not a median.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import ROOT, Context, Figure, case
from bench.workspace import QUICK
from pipeline.io import write_text
from pipeline.params import apply_overrides

TARGET_S = 600.0
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost"}


def _run(args: list[str], cwd: Path, log: Path) -> str:
    """Run a command with this virtualenv first on PATH; fail with the tail of its output."""
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    write_text(log, out)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode} (log: {log}): {out[-1500:]}")
    return out


@case("repro", default=False)
def repro_wall_time(ctx: Context) -> list[Figure]:
    """Wall time of the full embedded `dvc repro` (all stages, committed params) in a fresh clone."""
    clone = ctx.scratch / "repro"
    _run(["git", "clone", "--quiet", str(ROOT), str(clone)], ctx.scratch, ctx.scratch / "clone.log")
    if ctx.quick:  # plumbing only: the shrunk data and models
        raw = yaml.safe_load((clone / "params.yaml").read_text(encoding="utf-8"))
        write_text(clone / "params.yaml", yaml.safe_dump(apply_overrides(raw, QUICK), sort_keys=False))
    start = time.perf_counter()
    out = _run(["dvc", "repro"], clone, ctx.scratch / "repro.log")
    wall = time.perf_counter() - start
    stages = re.findall(r"Running stage '([^']+)'", out)
    return [Figure.check("dvc repro (fresh clone, all stages)", wall, "s", "<=", TARGET_S,
                         note=f"one cold run; {len(stages)} stages ran: {', '.join(stages)}")]
