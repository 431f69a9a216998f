"""`python -m bench [CASE ...]`: run benchmark cases, write bench/results/<machine>.json (+ .md), print a table.

Cases needing CUDA are skipped without it; `repro` and `anchors` run only when named (or with `all`). Each
case's record replaces the one of the same name in the machine's results file; the others are kept with their
dates.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench import anchors, beam, features, loading, prepare, ray_overhead, recipes, repro, training  # noqa: F401
from bench.common import (
    CASES,
    RESULTS_DIR,
    SCHEMA,
    Context,
    machine,
    machine_slug,
    markdown_table,
    merge_results,
    now,
    rows,
    write_results,
)
from pipeline.io import read_json
from pipeline.params import parse_assignments

log = logging.getLogger("bench")
ORDER = ("prepare", "training", "loading", "beam", "ray", "char_transformer", "char_lstm", "repro", "anchors")


def ordered() -> list[str]:
    """Every registered case, in the issue's order (any other after them)."""
    return sorted(CASES, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", metavar="CASE",
                        help=f"cases to run (default: all but opt-in ones; 'all': every one): {', '.join(ordered())}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and models, one run: checks the plumbing, the figures mean nothing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models of the training cases")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override params.yaml for the workspace the cases run on (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results; with --quick, bench/results/quick)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's own choice, one per core)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (data, logs)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args(argv)


def selected(names: list[str]) -> list[str]:
    """The cases to run, in registry order; an unknown name is an error listing the known ones."""
    if not names:
        return [n for n in ordered() if CASES[n].default]
    if "all" in names:
        return ordered()
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; expected one of {', '.join(ordered())} or all")
    return [n for n in ordered() if n in names]


def run_case(name: str, ctx: Context) -> dict[str, Any]:
    """One case's record: status ok / skipped / error, its figures, how long it took and with what settings."""
    c = CASES[name]
    record: dict[str, Any] = {"doc": c.doc, "date": now(), "repeats": ctx.repeats, "warmup": ctx.warmup,
                              "quick": ctx.quick, "compile": ctx.compile, "overrides": ctx.overrides}
    if c.needs_gpu and not torch.cuda.is_available():
        return {**record, "status": "skipped", "reason": "needs a CUDA device", "figures": []}
    log.info("bench: %s ...", name)
    start = time.perf_counter()
    try:
        figures = c.run(ctx)
    except Exception as err:  # one broken case must not lose the others' figures
        log.error("bench: %s failed:\n%s", name, traceback.format_exc())
        return {**record, "status": "error", "reason": f"{type(err).__name__}: {err}", "figures": [],
                "seconds": round(time.perf_counter() - start, 1)}
    return {**record, "status": "ok", "seconds": round(time.perf_counter() - start, 1),
            "figures": [f.__dict__ for f in figures]}


def print_table(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"capline bench: {results['machine']['cpu_model']} x{results['machine']['cpu_cores']}, "
                        f"GPU {results['machine']['gpu'] or 'none'}")
    for col in ("case", "figure", "median", "spread", "target", "verdict"):
        table.add_column(col, overflow="fold")
    for row in rows(results):
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.list:
        for name in ordered():
            c = CASES[name]
            flags = ", ".join(f for f, on in (("opt-in", not c.default), ("needs CUDA", c.needs_gpu)) if on)
            print(f"{name:18} {c.doc}{f' ({flags})' if flags else ''}")
        return 0
    if args.repeats < 1 or args.warmup < 0 or args.threads < 0:
        raise SystemExit("--repeats must be >= 1, --warmup and --threads >= 0")
    names = selected(args.cases)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine()
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    path = out / f"{machine_slug(m)}.json"
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    scratch = Path(tempfile.mkdtemp(prefix="capline-bench-"))
    ctx = Context(repeats=1 if args.quick else args.repeats, warmup=0 if args.quick else args.warmup,
                  quick=args.quick, scratch=scratch, overrides=parse_assignments(args.set), compile=args.compile)
    try:
        cases = {name: run_case(name, ctx) for name in names}
    finally:
        if args.keep_scratch:
            log.info("bench: scratch folder kept: %s", scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    new = {"schema": SCHEMA, "machine": m, "date": now(), "command": command.strip(), "cases": cases}
    results = merge_results(read_json(path) if path.is_file() else None, new)
    write_results(path, results, markdown_table(results))
    print_table({**results, "cases": cases}, Console(width=None if sys.stdout.isatty() else 200))
    print(f"results: {path} (+ {path.with_suffix('.md').name})")
    return 1 if any(c["status"] == "error" for c in cases.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
