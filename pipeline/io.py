"""Atomic file output: every artifact is written to a temporary sibling and renamed into place.

A crash, a kill or a full disk therefore leaves either the previous complete file or the new
complete file, never a half-written one that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it into place on success."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (UTF-8, indented, keys kept in insertion order)."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


# Durations and rates over them (seconds, wall_seconds, images_per_second): different on every run, so as DVC
# metrics they would show as changed in every `dvc metrics diff` and widen `dvc metrics show` for nothing.
TIMING_KEY = re.compile(r"(?:^|_)seconds$|_per_second$")


def timings_path(metrics_path: str | Path) -> Path:
    """Where write_metrics puts the timings of a metrics file: timings/<name> beside it (not a DVC metric)."""
    path = Path(metrics_path)
    return path.parent / "timings" / path.name


def split_metrics(metrics: dict[str, Any], nested: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what to compare, timings) of a metrics tree; zero counts inside nested breakdowns are left out."""
    kept: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for key, value in metrics.items():
        if "." in key:  # a params key (best_config, overrides): its value is a setting, kept as it is
            kept[key] = value
        elif isinstance(value, dict):
            sub_kept, sub_timings = split_metrics(value, nested=True)
            if sub_kept or not value:  # a breakdown of zeros goes; an empty dict written as such stays
                kept[key] = sub_kept
            if sub_timings:
                timings[key] = sub_timings
        elif TIMING_KEY.search(key) and _is_number(value):
            timings[key] = value
        elif not (nested and _is_zero_count(value)):
            kept[key] = value  # top-level counts stay even at 0 (errored: 0 is a result)
    return kept, timings


def _is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_zero_count(value: Any) -> bool:
    """An int 0 (a rate or score of 0.0 is a measurement, kept)."""
    return isinstance(value, int) and not isinstance(value, bool) and value == 0


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a stage's DVC metrics file as split_metrics keeps it, and its timings to timings_path(path)."""
    kept, timings = split_metrics(metrics)
    write_json(path, kept)
    if timings:
        write_json(timings_path(path), timings)
    else:  # a previous run's timings would read as this run's
        timings_path(path).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_open(path) as fh:
        fh.write(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save a .npy atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid UTF-8 JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply (limit: about {sys.getrecursionlimit():,} levels)") from None
    except ValueError as err:  # an integer longer than Python converts; its advice after ";" is for programmers
        raise ValueError(f"{path}: not valid JSON: {str(err).split(';')[0]}") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def claimed(path: str | Path) -> Iterator[None]:
    """Hold a lock on a temporary file or folder while this process uses it (the kernel drops it at exit,
    SIGKILL included), so that another process's remove_stale_temporaries leaves it alone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _held(entry: Path) -> bool:
    """Whether a live process holds `entry` (claimed); links and unopenable entries count as not held."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what killed writers of `path` left beside it; return what was removed.

    Only this module's own names for `path` qualify: `.<name>.<8 chars>.tmp` (atomic_path, atomic_dir) not
    held by a live process (claimed), and `.<name>.old-<pid>` (atomic_dir's set-aside copy) whose pid is gone.
    """
    path = Path(path)
    temp = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    old = re.compile(rf"\.{re.escape(path.name)}\.old-(\d+)")
    try:
        entries = sorted(path.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        if temp.fullmatch(entry.name):
            stale = not _held(entry)
        elif (m := old.fullmatch(entry.name)) is not None:
            stale = not _alive(int(m.group(1)))
        else:
            continue
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
