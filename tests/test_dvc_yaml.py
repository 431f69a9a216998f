"""dvc.yaml and dvc.lock match the code: every stage lists the project code it runs, and the committed lock was
made by the code beside it (so `dvc status` on a clean clone has nothing to rerun for code or params)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

# Code a stage runs that cannot change what it writes: error reporting, redaction of printed URIs, thread count,
# silencing of library chatter,
# the stages' shared entry point. The params loader is covered by each stage's `params:` (DVC compares the values).
NOT_OUTPUT_CODE = {"pipeline/errors.py", "pipeline/redact.py", "pipeline/runtime.py", "pipeline/params.py",
                   "stages/__init__.py", "pipeline/__init__.py", "pipeline/quiet.py"}


def module_file(name: str) -> Path | None:
    """The source file of a project module (pipeline.x.y or stages.x), or None for anything else."""
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path, package: str) -> set[str]:
    """Every project module `path` imports, at any depth of the file (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from pipeline import tracking`
    return {n for n in names if n.split(".")[0] in ("pipeline", "stages") and module_file(n) is not None}


def code_closure(module: str) -> set[str]:
    """Repository paths of every project file running `module` imports, transitively (package __init__s too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            prefix = ".".join(parts[:i])
            if prefix in seen or module_file(prefix) is None:
                continue
            seen.add(prefix)
            path = module_file(prefix)
            if path.relative_to(ROOT).as_posix() in NOT_OUTPUT_CODE:  # e.g. params.py checking a plug-in's schema
                continue
            package = prefix if path.name == "__init__.py" else prefix.rsplit(".", 1)[0]
            todo.extend(imported(path, package))
    return {module_file(n).relative_to(ROOT).as_posix() for n in seen}


def stages() -> dict[str, tuple[str, list[str]]]:
    """stage name -> (the stages.X module its command runs, its code deps as written in dvc.yaml)."""
    found = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"].items():
        body = stage.get("do", stage)
        module = re.search(r"python -m (stages\.\w+)", body["cmd"]).group(1)
        found[name] = (module, [d for d in body.get("deps", []) if "${" not in d])
    return found


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_the_closure_follows_lazy_imports_and_packages():
    closure = code_closure("stages.train")
    assert {"stages/train.py", "pipeline/training/fit.py", "pipeline/tracking/__init__.py",
            "pipeline/tracking/registry.py"} <= closure  # registry: a lazy import inside run()


@pytest.mark.parametrize("stage", sorted(stages()))
def test_every_stage_lists_the_project_code_it_runs(stage):
    module, deps = stages()[stage]
    missing = sorted(p for p in code_closure(module) - NOT_OUTPUT_CODE if not covered(p, deps))
    assert missing == [], f"dvc.yaml stage {stage}: add to deps {missing}"


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("dvc", path=str(Path(sys.executable).parent))
                    is None, reason="needs the git checkout and dvc")
def test_the_committed_lock_matches_the_code_and_params():
    """`dvc status`: no stage's code dependency or params changed since dvc.lock was written (`make demo`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["dvc", "status", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    stale = {}
    for stage, changes in json.loads(proc.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for path, state in change.get("changed deps", {}).items():
                if path.startswith(("pipeline", "stages")) or path.startswith("params.yaml"):
                    stale.setdefault(stage, {})[path] = state
    assert stale == {}, f"dvc.lock is stale: run `make demo` and commit dvc.lock and metrics/ ({stale})"


def test_the_report_renders_what_evaluate_wrote_and_reads_no_checkpoint():
    """evaluate@<family> writes the report's captions and samples; the report depends on them, not on models."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    evaluate, report = declared["evaluate"], declared["report"]
    assert evaluate["do"]["outs"] == ["${paths.evaluation}/${key}"]
    assert {f"${{paths.evaluation}}/{family}" for family in evaluate["foreach"]} <= set(report["deps"])
    decoding = ("pipeline/decoding.py", "pipeline/inference.py", "pipeline/evaluation.py")
    assert [d for d in report["deps"] if "paths.models" in d or d in decoding] == []
    assert not [k for k in report["params"] if k.startswith(("evaluate", "seed"))]  # it samples nothing itself
