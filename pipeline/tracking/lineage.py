"""Lineage tags of a run: the git commit and dirtiness, MLflow's source tags, the DVC hashes of the data, a
params hash.

Dirtiness ignores what DVC itself writes (each dvc.yaml's dvc.lock and its stages' outs, metrics and plots):
under `dvc repro` those change by design, and counting them would mark every run dirty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

from pipeline.tracking.store import mlflow_key

log = logging.getLogger(__name__)

SOURCE_TYPE = "LOCAL"  # MLflow's SourceType of a script run on this machine (not a notebook, job or project)


def _git(repo: Path, *args: str) -> str | None:
    """Output of a read-only git command in repo, or None outside git."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _dvc_outs(lock: Path) -> dict[str, str]:
    """dvc.<out path> -> md5 for every stage's outs in dvc.lock."""
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{lock}: not valid YAML: {err}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        raise ValueError(f"{lock}: expected a mapping under 'stages'")
    tags = {}
    for name, stage in stages.items():
        for i, out in enumerate((stage or {}).get("outs") or []):
            if not isinstance(out, dict) or "path" not in out or "md5" not in out:
                raise ValueError(f"{lock}: stages.{name}.outs[{i}]: expected 'path' and 'md5'")
            tags[mlflow_key(f"dvc.{out['path']}")] = str(out["md5"])
    return tags


def _plot_files(entry: Any) -> list[str]:
    """The data files of one top-level `plots` entry: a path, {path: props} or {id: {y: {path: cols}}}."""
    if isinstance(entry, str):
        return [entry]
    name, props = next(iter(entry.items()))
    y = (props or {}).get("y")
    return list(y) if isinstance(y, dict) else [name]


def dvc_written(repo: Path) -> list[Path] | None:
    """Every path DVC writes in the project at repo, from its dvc.yaml files as DVC resolves them (templates,
    foreach): the dvc.lock beside each, its stages' outs, metrics and plots, its top-level metrics and plots.
    [] outside a DVC project; None when DVC cannot read the project (nothing can be ignored then)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc:
            index = dvc.index
            paths = [Path(out.fs_path) for out in index.outs]
            pipelines = {stage.dvcfile.path: stage.dvcfile for stage in index.stages
                         if Path(stage.dvcfile.path).name == "dvc.yaml"}
            for where, dvcfile in pipelines.items():
                folder = Path(where).parent
                files = [*dvcfile.metrics, *(f for entry in dvcfile.plots for f in _plot_files(entry))]
                paths += [folder / "dvc.lock", *(folder / f for f in files)]
            return paths
    except NotDvcRepoError:
        return []
    except Exception as err:  # a dvc.yaml being edited must not stop a run: its tag just says dirty
        log.warning("cannot read DVC's outputs under %s (%s); git.dirty counts them as changes", repo, err)
        return None


def _status_paths(porcelain: str) -> list[str]:
    """Paths of `git status --porcelain -z` (relative to the work tree's top): both sides of a rename or copy."""
    paths: list[str] = []
    rest = iter(porcelain.split("\0"))
    for entry in rest:
        if len(entry) < 4:  # the empty field after the last NUL
            continue
        paths.append(entry[3:])
        if "R" in entry[:2] or "C" in entry[:2]:
            paths.append(next(rest, ""))
    return [p for p in paths if p]


def _within(path: str, roots: list[str]) -> bool:
    """Whether path is one of roots or lies under one (all relative, '/'-separated)."""
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def git_dirty(repo: Path) -> str:
    """"true" when the work tree (untracked files included) differs from HEAD other than where DVC writes,
    "false", or "unknown" outside git."""
    status = _git(repo, "status", "--porcelain", "-z", "--untracked-files=all")
    if status is None:
        return "unknown"
    changed = _status_paths(status)
    if not changed:
        return "false"
    top = os.path.realpath((_git(repo, "rev-parse", "--show-toplevel") or str(repo)).strip())
    written = dvc_written(repo) or []
    ignored = [Path(os.path.relpath(os.path.realpath(p), top)).as_posix() for p in written]
    return str(any(not _within(path, ignored) for path in changed)).lower()


def entry_point(repo: Path) -> str:
    """What this process runs, for mlflow.source.name: its script's path in the project (stages/train.py),
    else the script's or package's name (capline, pytest)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path:
        return "python"  # an interactive interpreter
    script, root = Path(path).resolve(), repo.resolve()
    if script.is_relative_to(root) and not script.is_relative_to(Path(sys.prefix).resolve()):  # not .venv/bin
        return script.relative_to(root).as_posix()
    spec = getattr(main, "__spec__", None)
    if script.name == "__main__.py" and spec is not None:  # python -m <package>
        return spec.name.removesuffix(".__main__")
    return script.name


def lineage_tags(repo_dir: str | Path) -> dict[str, str]:
    """git.commit, git.dirty ("unknown" outside git), MLflow's mlflow.source.* tags and dvc.<out> md5s from
    dvc.lock."""
    repo = Path(repo_dir)
    commit = (_git(repo, "rev-parse", "HEAD") or "").strip()
    tags = {"git.commit": commit or "unknown", "git.dirty": git_dirty(repo) if commit else "unknown",
            MLFLOW_SOURCE_NAME: entry_point(repo), MLFLOW_SOURCE_TYPE: SOURCE_TYPE}
    if commit:  # the Source column of MLflow's UI shows it next to the script
        tags[MLFLOW_GIT_COMMIT] = commit
    lock = repo / "dvc.lock"
    if lock.is_file():
        tags.update(_dvc_outs(lock))
    return tags


def dvc_hashes_under(lineage: Mapping[str, str], roots: list[str]) -> dict[str, str]:
    """The dvc.<out> tags of `lineage` whose output lies at or under one of `roots` (the data a run reads)."""
    roots = [r.rstrip("/") for r in roots]
    return {k: v for k, v in lineage.items()
            if k.startswith("dvc.") and any(k[4:] == r or k[4:].startswith(r + "/") for r in roots)}


def params_hash(params: Mapping[str, Any]) -> str:
    """First 12 hex of the sha256 of the canonical JSON of params (key order does not matter)."""
    try:
        text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"params_hash: params must be plain JSON data: {err}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
