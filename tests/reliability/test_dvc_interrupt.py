"""Ctrl-C during `dvc repro` of a later stage: the finished stages are kept, the rerun runs only the stale one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, TINY, tiny_corpus
from tests.test_dvc_pipeline import GIT_ENV, ran, sh, write_params

pytestmark = pytest.mark.slow
SLOW_EMBEDDINGS = {**TINY, "embeddings.epochs": 40}  # a few seconds of skip-gram: time to interrupt it


@pytest.fixture
def repo_params(tmp_path) -> tuple[Path, dict]:
    """A git + DVC repo with the project's pipeline, dvc.yaml and tiny params, its data stages run once."""
    repo = tmp_path / "repo"
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    corpus = tiny_corpus(repo / "corpus")
    write_params(repo, params := {**SLOW_EMBEDDINGS, "data.text.files": [str(corpus.relative_to(repo))]})
    for args in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "config", "core.analytics", "false"),
                 ("git", "add", "-A"), ("git", "commit", "-qm", "pipeline"), ("dvc", "repro", "embeddings")):
        sh(repo, *args)
    return repo, params


def stage_process(dvc: psutil.Process, module: str) -> psutil.Process | None:
    """The `python -m <module>` process DVC started for a stage, if it is running."""
    for child in dvc.children(recursive=True):
        try:
            if module in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_ctrl_c_during_a_later_stage_reruns_only_the_stale_stages(repo_params, tmp_path):
    repo, params = repo_params
    write_params(repo, {**params, "vocab.min_freq": 2})  # vocab and embeddings are stale
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "repro.log", "w+")
    proc = subprocess.Popen(["dvc", "repro", "embeddings"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        dvc, deadline = psutil.Process(proc.pid), time.time() + 600  # liveness only
        while (stage := stage_process(dvc, "stages.embeddings")) is None or time.time() - stage.create_time() < 1:
            assert proc.poll() is None and time.time() < deadline, "dvc ended before embeddings could be interrupted"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: dvc and the stage it runs
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        interrupted = log.read()
        log.close()
    assert ran(interrupted) == {"vocab", "embeddings"}, interrupted
    leftovers = [p for p in repo.rglob("*.tmp") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert leftovers == []  # the interrupted stage's partial output was removed

    assert ran(sh(repo, "dvc", "repro", "embeddings")) == {"embeddings"}  # vocab finished before Ctrl-C: kept
    assert ran(sh(repo, "dvc", "repro", "embeddings")) == set()
    assert (repo / "artifacts" / "embeddings" / "words.npy").is_file()
