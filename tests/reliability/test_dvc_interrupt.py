"""Ctrl-C during `dvc repro` of a later stage: the finished stages are kept, the rerun runs only the stale one."""

from __future__ import annotations

import json
import os
import re
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


def default_sigint() -> None:
    """In the child: Ctrl-C's default action, whatever this process inherited (a shell's `&` ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
                            start_new_session=True, preexec_fn=default_sigint)
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


def test_an_interrupted_final_training_continues_from_its_checkpoint_on_the_next_repro(tmp_path):
    from tests.test_dvc_pipeline import TINY_SWEEPS, init_repo

    corpus = tiny_corpus(tmp_path / "repo" / "corpus")
    epochs = 20  # long enough to be interrupted after epoch 3 (a tiny epoch takes ~0.3 s), short to finish after
    params = {**TINY, **TINY_SWEEPS, "data.text.files": [str(corpus.relative_to(tmp_path / "repo"))],
              "train.lstm_lm.early_stopping_patience": 0, "train.lstm_lm.max_epochs": epochs}
    repo = init_repo(tmp_path / "repo", params)
    sh(repo, "dvc", "repro", "sweep@lstm_lm")  # its trials' epochs are sweep.lstm_lm's: the sweep runs once
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log_path = tmp_path / "repro.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["dvc", "repro", "train@lstm_lm"], cwd=repo, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=default_sigint)
    try:
        deadline = time.time() + 600  # liveness only
        while f"train lstm_lm: epoch 3/{epochs}" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) != 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = [int(e) for e in re.findall(rf"train lstm_lm: epoch (\d+)/{epochs}", log_path.read_text())]
    assert 3 <= before[-1] < epochs and not (repo / "metrics" / "train_lstm_lm.json").exists()

    out = sh(repo, "dvc", "repro", "train@lstm_lm")
    after = [int(e) for e in re.findall(rf"train lstm_lm: epoch (\d+)/{epochs}", out)]
    assert "continuing the interrupted run" in out
    # went on, not from epoch 1: from the epoch after the last one printed, or that one again when Ctrl-C came
    # between its line and its checkpoint (the line is printed first; a loaded machine hits that window)
    assert before[-1] <= after[0] <= before[-1] + 1 and after[-1] == epochs
    metrics = json.loads((repo / "metrics" / "train_lstm_lm.json").read_text())
    assert metrics["epochs"] == epochs and not (repo / "artifacts" / "models" / "lstm_lm" / "resume_key.json").exists()
    assert ran(sh(repo, "dvc", "repro", "train@lstm_lm")) == set()
