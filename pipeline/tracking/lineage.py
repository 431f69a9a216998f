"""Lineage tags of a run: the git commit and dirtiness, the DVC hashes of the data, a params hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.tracking.store import mlflow_key


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


def lineage_tags(repo_dir: str | Path) -> dict[str, str]:
    """git.commit, git.dirty ("unknown" outside git) and dvc.<out> md5s from dvc.lock."""
    repo = Path(repo_dir)
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain") if commit else None
    tags = {"git.commit": commit.strip() if commit else "unknown",
            "git.dirty": "unknown" if status is None else str(bool(status.strip())).lower()}
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
