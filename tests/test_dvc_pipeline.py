"""End to end: `dvc repro` of the real dvc.yaml in a temporary git repo, with shrunk params."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.params import apply_overrides
from tests.conftest import ROOT, TINY, tiny_corpus

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


def init_repo(repo: Path, overrides: dict) -> Path:
    """Make `repo` a fresh git + DVC repo holding the project's pipeline code, dvc.yaml and shrunk params."""
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/ray_results/\n")
    write_params(repo, overrides)
    for args in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "config", "core.analytics", "false"),
                 ("git", "add", "-A"), ("git", "commit", "-qm", "pipeline")):
        sh(repo, *args)
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The pipeline with TINY params, for the data stages."""
    return init_repo(tmp_path_factory.mktemp("dvcrepo"), TINY)


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


# ---- the whole DAG: sweeps, final training, evaluation -------------------------------------------------

FAMILIES = ("captioner", "lstm_lm", "transformer_lm")
MODEL_STAGES = {f"{stage}@{family}" for stage in ("sweep", "train", "evaluate") for family in FAMILIES}
# Two one-epoch trials per family: enough for ASHA, MLflow nesting and best.json, in seconds per trial.
TINY_SWEEPS = {key: value for family in FAMILIES for key, value in {
    f"sweep.{family}.num_samples": 2, f"sweep.{family}.max_epochs": 1, f"sweep.{family}.grace_period": 1}.items()}


@pytest.fixture(scope="module")
def full_repo(tmp_path_factory) -> Path:
    """Like `repo`, with tiny sweeps, on the small text corpus, for the whole DAG."""
    repo = tmp_path_factory.mktemp("dvcfull")
    corpus = tiny_corpus(repo / "corpus")
    return init_repo(repo, {**TINY, **TINY_SWEEPS, "data.text.files": [str(corpus.relative_to(repo))]})


def test_full_repro_sweeps_trains_registers_evaluates_reports_then_does_nothing(full_repo: Path):
    out = sh(full_repo, "capline", "repro")  # what `make demo` runs: dvc repro, then each stage's wall time
    stages = DATA_STAGES | MODEL_STAGES | {"features", "report"}
    assert ran(out) == stages
    table = out[out.rindex("stage "):].splitlines()
    timed = {m.group(1): float(m.group(2)) for line in table if (m := re.match(r"(\S+)\s+([\d.]+)s$", line))}
    assert set(timed) == stages and all(t > 0 for t in timed.values())
    for family in FAMILIES:  # each sweep shows its trials as they end, then a table with the best starred
        assert len(re.findall(rf"sweep {family}: trial \S+ (completed|early_stopped) after", out)) == 2
    assert len(re.findall(r"^  \* \S+  (completed|early_stopped)", out, re.M)) == len(FAMILIES)
    assert re.match(rf"total\s+[\d.]+s  \(\d+ min \d+ s, {len(stages)} of {len(stages)} stages ran\)$", table[-1])
    for family in FAMILIES:
        best = json.loads((full_repo / f"artifacts/sweeps/{family}/best.json").read_text())
        sweep = json.loads((full_repo / f"metrics/sweep_{family}.json").read_text())
        assert sweep["trials"] == 2 and sweep["errored"] == 0
        assert sweep["completed"] + sweep["early_stopped"] == 2 and best["overrides"] == sweep["best_config"]
        assert set(best["overrides"]) == set(yaml.safe_load((full_repo / "params.yaml").read_text())
                                             ["sweep"][family]["space"])
        evaluation = json.loads((full_repo / f"metrics/evaluate_{family}.json").read_text())
        assert evaluation and all(v is None or isinstance(v, (int, float, str, dict, list))
                                  for v in evaluation.values())
        assert (full_repo / f"metrics/curve_{family}.csv").read_text().startswith("epoch,")
    assert not (set(os.listdir(full_repo / "artifacts")) & {"ray_results"})  # Ray's folders stay outside DVC
    assert "<html" in (full_repo / "reports/index.html").read_text()[:200].lower()
    assert ran(sh(full_repo, "dvc", "repro")) == set()
    assert "changed" not in sh(full_repo, "dvc", "status")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{full_repo / 'mlflow.db'}")
    for family in FAMILIES:
        registered = json.loads((full_repo / f"metrics/train_{family}.json").read_text())["registered"]
        champion = client.get_model_version_by_alias(f"capline-{family}", "champion")
        assert registered["version"] == str(champion.version) and registered["alias"] == "champion"

def test_exp_run_with_a_bigger_sweep_reruns_that_family_only(full_repo: Path):
    sh(full_repo, "dvc", "repro")
    out = sh(full_repo, "dvc", "exp", "run", "-S", "sweep.captioner.num_samples=3")
    assert "sweep@captioner" in ran(out) and ran(out) <= {"sweep@captioner", "train@captioner", "evaluate@captioner",
                                                           "report"}
    assert json.loads((full_repo / "metrics/sweep_captioner.json").read_text())["trials"] == 3
