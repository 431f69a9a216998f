"""Process-wide runtime settings every command applies before it computes: torch's thread count."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Give torch `threads` intra-op threads (None: every usable core); returns the number set."""
    import torch

    count = threads or usable_cores()
    torch.set_num_threads(count)
    return count
