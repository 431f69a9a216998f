"""End to end: `dvc repro` of the real dvc.yaml in a temporary git repo, with shrunk params."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import apply_overrides
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow
DATA_STAGES = {"sample", "prepare_coco", "prepare_text", "vocab", "embeddings"}


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd: Path, *args: str, ok: bool = True) -> str:
    """Run a command with the test's virtualenv first on PATH; fail with its output unless ok=False."""
    env = {**os.environ, **GIT_ENV,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    report = f"{' '.join(args)} -> {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert (proc.returncode == 0) == ok, report
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def write_params(repo: Path, overrides: dict) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, overrides), sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding the project's pipeline code, dvc.yaml and tiny params."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo, TINY)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    return repo


def test_repro_runs_every_data_stage_then_nothing(repo: Path):
    assert ran(sh(repo, "dvc", "repro", "embeddings")) == DATA_STAGES
    for out in ("data/sample/annotations/captions.json", "data/prepared/coco/train/images.npy",
                "data/vocab/words.json", "data/encoded/text_train_word.npy",
                "artifacts/embeddings/words.npy", "metrics/embeddings.json"):
        assert (repo / out).is_file(), out
    assert ran(sh(repo, "dvc", "repro", "embeddings")) == set()
    assert "changed" not in sh(repo, "dvc", "status", "embeddings")


def test_changing_min_freq_reruns_only_downstream(repo: Path):
    sh(repo, "dvc", "repro", "embeddings")
    write_params(repo, {**TINY, "vocab.min_freq": 2})
    assert ran(sh(repo, "dvc", "repro", "embeddings")) == {"vocab", "embeddings"}
    assert '"min_freq": 2' in sh(repo, "dvc", "metrics", "show", "--json")


def test_exp_run_overrides_go_through_the_params_loader(repo: Path):
    sh(repo, "dvc", "repro", "embeddings")
    assert ran(sh(repo, "dvc", "exp", "run", "-S", "vocab.min_freq=3", "embeddings")) == {"vocab", "embeddings"}
    assert '"min_freq": 3' in sh(repo, "dvc", "metrics", "show", "--json")
    out = sh(repo, "dvc", "exp", "run", "-S", "vocab.min_freq=0", "embeddings", ok=False)
    assert "vocab.min_freq: Input should be greater than or equal to 1" in out
    # DVC refuses a new key unless it is appended with "+"; then our loader rejects it.
    out = sh(repo, "dvc", "exp", "run", "-S", "+vocab.min_frequency=2", "embeddings", ok=False)
    assert "vocab.min_frequency: unknown key" in out
