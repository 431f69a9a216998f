"""Timing (warm-up, then the median of repeated runs), the machine description, the case registry and the
results file of the benchmark suite.

Every figure is a median over `repeats` timed runs after `warmup` untimed ones; a comparison (a speed-up, a
ratio of rates) is always formed from two medians measured in the same process, one after the other.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.io import write_json, write_text

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS_DIR = ROOT / "bench" / "results"
SCHEMA = 1  # bump when the results JSON changes shape

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name; more specific names first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
)


@dataclasses.dataclass
class Timing:
    """Wall seconds of each timed run (warm-up runs excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def rate(self, work: float) -> tuple[float, list[float]]:
        """work / median seconds, and [min, max] of the per-run rates."""
        rates = [work / s for s in self.seconds]
        return work / self.median, [min(rates), max(rates)]


def cuda_sync() -> None:
    """Wait for queued GPU work, so that a timer brackets what was launched (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Call fn `warmup` times untimed, then `repeats` times timed (GPU work synchronised at both ends)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        cuda_sync()
        start = time.perf_counter()
        fn()
        cuda_sync()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


@dataclasses.dataclass
class Figure:
    """One measured figure: a value (the median), its unit, the spread over runs and the target it answers."""

    name: str
    value: float | None
    unit: str
    spread: list[float] | None = None  # [min, max] over the timed runs
    target: str | None = None  # e.g. ">= 150"; None where the issue sets none
    ok: bool | None = None  # whether the value meets the target; None without one
    note: str = ""

    @classmethod
    def check(cls, name: str, value: float | None, unit: str, op: str, bound: float, **kw: Any) -> Figure:
        """A figure with a target `op bound` (op is >= or <=) and whether the value meets it."""
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        return cls(name, value, unit, target=f"{op} {bound:g}", ok=ok, **kw)


@dataclasses.dataclass
class Context:
    """What a case gets: how to repeat, how small to be, where to write scratch files, extra params."""

    repeats: int
    warmup: int
    quick: bool
    scratch: Path
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile: bool = False
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # shared between cases of one run

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def timed(self, fn: Callable[[], Any], repeats: int | None = None) -> Timing:
        """time_runs with this run's repeats and warm-up."""
        return time_runs(fn, repeats or self.repeats, self.warmup)


@dataclasses.dataclass(frozen=True)
class Case:
    """A named benchmark: run(ctx) returns its figures."""

    name: str
    run: Callable[[Context], list[Figure]]
    doc: str
    default: bool = True  # part of a plain `python -m bench`
    needs_gpu: bool = False


CASES: dict[str, Case] = {}


def case(name: str, *, default: bool = True, needs_gpu: bool = False) -> Callable:
    """Register a benchmark function under `name` (its docstring describes it in the table and --list)."""
    def register(fn: Callable[[Context], list[Figure]]) -> Callable[[Context], list[Figure]]:
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} registered twice")
        CASES[name] = Case(name, fn, (fn.__doc__ or "").strip().splitlines()[0], default, needs_gpu)
        return fn
    return register


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        return None
    return round(kib / 2**20, 1)


def bf16_peak_tflops(gpu_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU by name, None when unknown (then no MFU is reported)."""
    if not gpu_name:
        return None
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key.lower() in gpu_name.lower()), None)


def machine() -> dict[str, Any]:
    """CPU model and cores, memory, GPU, library versions and the load average when the run started."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpu_model(), "cpu_cores": os.cpu_count(), "cpu_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(), "gpu": gpu, "gpu_count": torch.cuda.device_count(),
        "gpu_bf16_peak_tflops": bf16_peak_tflops(gpu), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if gpu else None, "python": platform.python_version(),
        "platform": platform.platform(), "load_average_1m": round(os.getloadavg()[0], 2),
    }


def machine_slug(m: dict[str, Any]) -> str:
    """A file name for a machine class: cpu model, cores, gpu (e.g. amd-epyc-2c or ...-2c-nvidia-h100-80gb-hbm3)."""
    parts = [m["cpu_model"], f"{m['cpu_cores']}c"] + ([m["gpu"]] if m.get("gpu") else [])
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower().replace("(r)", "").replace("(tm)", ""))
    return slug.strip("-")[:100]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def merge_results(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """New cases replace old ones of the same name; cases not rerun are kept (each has its own date)."""
    if not old or old.get("schema") != SCHEMA:
        return new
    return {**new, "cases": {**old.get("cases", {}), **new["cases"]}}


def write_results(path: Path, results: dict[str, Any], table_md: str) -> None:
    """The results JSON and its Markdown table beside it, both written atomically."""
    write_json(path, results)
    write_text(path.with_suffix(".md"), table_md)


def rows(results: dict[str, Any]) -> Iterator[tuple[str, str, str, str, str, str]]:
    """(case, figure, value, spread, target, verdict) for every figure of every case, as display strings."""
    for name, res in results["cases"].items():
        if res["status"] != "ok":
            yield name, "-", res["status"], "", "", res.get("reason", "")[:120]
            continue
        for f in res["figures"]:
            value = "n/a" if f["value"] is None else f"{_fmt(f['value'])} {f['unit']}"
            spread = "" if not f.get("spread") else f"{_fmt(f['spread'][0])}..{_fmt(f['spread'][1])}"
            verdict = {True: "meets", False: "MISSES", None: ""}[f.get("ok")]
            yield name, f["name"], value, spread, f.get("target") or "", (verdict + " " + f.get("note", "")).strip()


def _fmt(x: float) -> str:
    if x == 0 or 0.01 <= abs(x) < 1e6:
        return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return f"{x:.3g}"


def markdown_table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table with the machine and date above it."""
    m = results["machine"]
    head = (f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}; "
            f"load average at start {m['load_average_1m']}. Updated {results['date']} by `{results['command']}`.\n\n")
    lines = ["| case | figure | median | spread | target | verdict |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    return head + "\n".join(lines) + "\n"
