"""`dvc repro` with each stage's wall time, read from the stage boundaries DVC prints as it goes."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from collections.abc import Callable, Iterable

STARTED = re.compile(r"^Running stage '([^']+)'")
SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
# DVC records a stage in dvc.lock the moment it finishes: the end of that stage's wall time.
LOCKED = re.compile(r"^(Updating|Generating) lock file")


@dataclasses.dataclass
class StageTime:
    """One stage of a repro: how long it ran (0 when DVC skipped it) and whether it finished."""

    stage: str
    seconds: float
    ran: bool
    finished: bool


def watch(lines: Iterable[str], clock: Callable[[], float] = time.monotonic,
          echo: Callable[[str], None] | None = None) -> list[StageTime]:
    """Stage times from DVC's output lines, timed as each line arrives (echoed on the way through)."""
    times: list[StageTime] = []
    running: tuple[str, float] | None = None
    for line in lines:
        if echo is not None:
            echo(line)
        now = clock()
        if (match := STARTED.match(line)) is not None:
            if running is not None:  # it finished without a lock update (its lock entry was already right)
                times.append(StageTime(running[0], now - running[1], ran=True, finished=True))
            running = (match.group(1), now)
        elif (match := SKIPPED.match(line)) is not None:
            if running is not None:  # as above: ended without a lock update
                times.append(StageTime(running[0], now - running[1], ran=True, finished=True))
                running = None
            times.append(StageTime(match.group(1), 0.0, ran=False, finished=True))
        elif LOCKED.match(line) and running is not None:
            times.append(StageTime(running[0], now - running[1], ran=True, finished=True))
            running = None
    if running is not None:  # the last stage: it failed or was interrupted, unless DVC went on to the end
        times.append(StageTime(running[0], clock() - running[1], ran=True, finished=False))
    return times


def repro(args: list[str], echo: Callable[[str], None]) -> tuple[int, list[StageTime], float]:
    """Run `dvc repro ARGS` (its output echoed); its exit status, stage times and total seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(["dvc", "repro", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        times = watch((line.rstrip("\n") for line in proc.stdout), echo=echo)
        status = proc.wait()
        if status == 0 and times and not times[-1].finished:  # DVC succeeded: its last stage did too
            times[-1] = dataclasses.replace(times[-1], finished=True)
    except KeyboardInterrupt:  # DVC got the same SIGINT from the terminal; let it clean up its stage
        status = proc.wait()
        times = []
    return status, times, time.monotonic() - start


def summary(times: list[StageTime], total: float) -> str:
    """A one-screen table of stage wall times, slowest stages visible at a glance."""
    width = max([len(t.stage) for t in times] + [len("total")])
    lines = [f"{'stage':<{width}}  {'wall time':>9}"]
    for t in times:
        note = "" if t.finished else "  (did not finish)"
        value = f"{t.seconds:8.1f}s" if t.ran else "  skipped"
        lines.append(f"{t.stage:<{width}}  {value}{note}")
    lines.append(f"{'total':<{width}}  {total:8.1f}s  ({format_minutes(total)}, "
                 f"{sum(t.ran for t in times)} of {len(times)} stages ran)")
    return "\n".join(lines)


def format_minutes(seconds: float) -> str:
    """1121.4 -> '18 min 41 s'."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"
