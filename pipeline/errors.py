"""The one error path of every entry point (`capline`, `python -m pipeline`, `python -m stages.X`).

A known error is a mistake the user can fix (a bad param, a missing or malformed file, an unreachable tracking
server, a diverged run): its message already names the file, record or key and what to do, so it is shown as
one line and the process exits 1 (2 for bad params). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from pipeline.params import ParamsError

T = TypeVar("T")

DEBUG_ENV = "CAPLINE_DEBUG"  # read by the front doors (pipeline/cli.py, stages/), never by the library
VERBOSE_ENV = "CAPLINE_VERBOSE"  # the same: third-party info lines and known warnings (pipeline/quiet.py)
PARAMS_EXIT, ERROR_EXIT = 2, 1

# Always known: params, files that are missing or of the wrong kind, malformed content (every ValueError of the
# project names its file or key), an unreachable MLflow server (the tracking check's ConnectionError).
KNOWN: tuple[type[BaseException], ...] = (ParamsError, ValueError, FileNotFoundError, NotADirectoryError,
                                          IsADirectoryError, PermissionError, ConnectionError)
# Known types that live in heavy modules (torch, network code), by module and name: an exception of such a type
# exists only once its module is imported, so a light command never imports torch just to classify an error.
KNOWN_ELSEWHERE = (("pipeline.training.callbacks", "NonFiniteLossError"), ("pipeline.data.download", "DownloadError"),
                   ("stages.sweep", "NoTrialFinished"))


def debug_requested(value: str | None) -> bool:
    """Whether a CAPLINE_DEBUG value asks for tracebacks (unset, empty, 0, false, no, off: it does not)."""
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def known_errors() -> tuple[type[BaseException], ...]:
    """Every exception type shown as one line (those of modules not imported yet cannot occur)."""
    extra = [getattr(sys.modules[mod], name) for mod, name in KNOWN_ELSEWHERE if mod in sys.modules]
    return (*KNOWN, *(cls for cls in extra if isinstance(cls, type)))


def one_line(err: BaseException) -> str:
    """`capline: <message>`: the message as the library wrote it (several lines only for several bad params)."""
    return f"capline: {str(err).strip() or type(err).__name__}"


def run_entry(entry: Callable[[], T], debug: bool = False) -> T:
    """Call `entry`; a known error prints one line to stderr and exits 1 (2 for params); `debug` adds its traceback.

    Unknown exceptions (bugs) propagate with their traceback; SystemExit and KeyboardInterrupt pass untouched.
    """
    try:
        return entry()
    except known_errors() as err:
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(one_line(err), file=sys.stderr, flush=True)
        raise SystemExit(PARAMS_EXIT if isinstance(err, ParamsError) else ERROR_EXIT) from None
