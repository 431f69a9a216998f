"""Sweeps on a real local Ray (CPU): search spaces, trials as nested MLflow runs, resume, divergence."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.cli import app
from pipeline.params import Params, apply_overrides, flatten_keys, load_params, validate_params
from pipeline.sweep_results import best_trial, metric_figure, summarise
from pipeline.training.checkpoints import load_module
from pipeline.tuning import TrialRecord, init_ray, run_sweep, sample_config, search_space, sweep_key
from tests.conftest import ROOT, TINY

FAMILY = "lstm_lm"


# ---- search spaces (no Ray cluster needed) ------------------------------------------------------------


def test_each_kind_maps_to_its_tune_domain() -> None:
    space = search_space({"a": {"loguniform": [1e-4, 1e-1]}, "b": {"one_minus_loguniform": [1e-3, 1e-1]},
                          "c": {"uniform": [0.0, 0.3]}, "d": {"randint": [2, 5]}, "e": {"choice": ["lstm", "gru"]}})
    assert (space["a"].lower, space["a"].upper) == (1e-4, 1e-1)
    assert (space["b"].lower, space["b"].upper) == pytest.approx((0.9, 0.999))
    assert (space["c"].lower, space["c"].upper) == (0.0, 0.3)
    assert space["e"].categories == ["lstm", "gru"]
    ints = space["d"].sample(size=500, random_state=np.random.default_rng(0))
    assert set(ints) == {2, 3, 4}  # hi exclusive, like params.yaml says


def test_an_invalid_entry_names_its_key() -> None:
    with pytest.raises(ValueError, match="space.train.x.lr: loguniform needs low > 0"):
        search_space({"train.x.lr": {"loguniform": [0, 1]}})
    with pytest.raises(ValueError, match="space.k: expected one of"):
        search_space({"k": {"gaussian": [0, 1]}})


def _log10_ks(values: np.ndarray, low: float, high: float) -> float:
    """p-value of the KS test that log10(values) is uniform on [log10 low, log10 high]."""
    a, b = math.log10(low), math.log10(high)
    return stats.kstest((np.log10(values) - a) / (b - a), "uniform").pvalue


def test_loguniform_samples_are_uniform_in_log10() -> None:
    draws = np.array([c["lr"] for c in sample_config({"lr": {"loguniform": [1e-5, 1e-1]}}, 2000, seed=3)])
    assert draws.min() >= 1e-5 and draws.max() <= 1e-1
    assert _log10_ks(draws, 1e-5, 1e-1) > 0.01
    # the test has power: values uniform on the linear scale fail it
    linear = np.random.default_rng(3).uniform(1e-5, 1e-1, 2000)
    assert _log10_ks(linear, 1e-5, 1e-1) < 1e-6
    counts = np.histogram(np.log10(draws), bins=4, range=(-5, -1))[0]  # one bin per decade
    assert counts.min() > 400  # 500 expected per decade


def test_one_minus_loguniform_records_beta_with_one_minus_beta_log_uniform() -> None:
    beta = np.array([c["b"] for c in sample_config({"b": {"one_minus_loguniform": [1e-3, 1e-1]}}, 2000, seed=4)])
    assert beta.min() >= 0.9 and beta.max() <= 0.999  # the value itself is beta, near 1
    assert _log10_ks(1.0 - beta, 1e-3, 1e-1) > 0.01
    assert _log10_ks(beta, 0.9, 0.999) < 1e-6  # beta itself is not log-uniform


def test_sampling_is_seeded() -> None:
    space = {"lr": {"loguniform": [1e-4, 1e-1]}, "cell": {"choice": ["lstm", "gru"]}, "n": {"randint": [1, 9]}}
    assert sample_config(space, 5, seed=7) == sample_config(space, 5, seed=7)
    assert sample_config(space, 5, seed=7) != sample_config(space, 5, seed=8)
    assert all(isinstance(c["lr"], float) and isinstance(c["n"], int) for c in sample_config(space, 5, seed=7))


def _record(trial_id: str, status: str, metric: float | None, config: dict) -> TrialRecord:
    return TrialRecord(trial_id, None, status, config, metric, 1, 0, None, None, None, 2.0, 0.0, 1.0)


def test_the_best_trial_is_never_an_errored_one() -> None:
    trials = [_record("a", "errored", 0.1, {}), _record("b", "early_stopped", 2.0, {}),
              _record("c", "completed", 1.5, {}), _record("d", "completed", float("nan"), {})]
    result = summarise("lstm_lm", "val/loss", "min", trials, experiment_path="x", parent_run_id=None,
                       wall_seconds=1.0, epochs_budget=8)
    assert result.best.trial_id == "c"
    assert (result.completed, result.early_stopped, result.errored) == (2, 1, 1)
    assert result.asha_savings == pytest.approx(1 - 4 / 8) and result.cpu_seconds == 8.0
    assert best_trial([_record("a", "errored", 0.1, {})], "min") is None


def test_the_figure_puts_log_spaces_on_log_axes_and_beta_as_one_minus_beta() -> None:
    space = {"lr": {"loguniform": [1e-4, 1e-2]}, "beta": {"one_minus_loguniform": [1e-3, 1e-1]},
             "drop": {"uniform": [0.0, 0.5]}, "cell": {"choice": ["lstm", "gru"]}}
    trials = [_record("a", "completed", 1.0, {"lr": 1e-3, "beta": 0.99, "drop": 0.1, "cell": "gru"}),
              _record("b", "early_stopped", 2.0, {"lr": 3e-3, "beta": 0.9, "drop": 0.2, "cell": "lstm"})]
    result = summarise("lstm_lm", "val/loss", "min", trials, experiment_path="x", parent_run_id=None,
                       wall_seconds=1.0, epochs_budget=4)
    axes = metric_figure(result, space).axes
    assert [ax.get_xscale() for ax in axes] == ["log", "log", "linear", "linear"]
    assert axes[1].get_xlabel() == "1 - beta"
    completed_x = [float(axis.collections[0].get_offsets()[0][0]) for axis in axes]
    assert completed_x == pytest.approx([1e-3, 0.01, 0.1, 1.0])  # gru is the second choice


def test_the_sweep_key_follows_what_trials_depend_on(tiny_params) -> None:
    def key(lineage: dict | None = None, **overrides) -> str:
        p = validate_params(apply_overrides(tiny_params.to_dict(), {"paths.encoded": "data/encoded", **overrides}))
        return sweep_key(p, FAMILY, lineage or {"dvc.data/encoded": "1", "dvc.metrics/sweep.json": "1"})

    base = key()
    assert key(**{"evaluate.beam_size": 5, "paths.ray_storage": "elsewhere", "sweep.captioner.num_samples": 9}) == base
    assert key(**{f"sweep.{FAMILY}.num_samples": 9}) != base
    assert key(**{f"train.{FAMILY}.batch_size": 3}) != base and key(seed=2) != base
    # the data's DVC hash counts (new data: a new sweep); outputs such as metrics files do not
    assert key({"dvc.data/encoded": "2", "dvc.metrics/sweep.json": "1"}) != base
    assert key({"dvc.data/encoded": "1", "dvc.metrics/sweep.json": "2", "git.commit": "x"}) == base
    # pre-extracted features feed captioner trials only
    features = {"features.dtype": "float32"}
    assert sweep_key(validate_params(apply_overrides(tiny_params.to_dict(), features)), "captioner", {}) != \
        sweep_key(tiny_params, "captioner", {})
    assert key(**features) == base and key({"dvc.data/encoded": "1", "dvc.data/features": "2"}) == base


# ---- sweeps -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module's sweeps, shut down at the end (no processes left behind)."""
    import ray

    started = init_ray(None)
    yield
    if started:
        ray.shutdown()


def sweep_params(prepared: Params, tmp_path: Path, **overrides) -> Params:
    """The session's prepared tiny data; Ray storage, MLflow and models under tmp_path; a 2-trial sweep."""
    paths = {f"paths.{k}": v for k, v in prepared.paths.model_dump().items()}
    return load_params(ROOT / "params.yaml", {
        **TINY, **paths, "paths.models": str(tmp_path / "models"), "paths.metrics": str(tmp_path / "metrics"),
        "paths.ray_storage": str(tmp_path / "ray"), "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        f"sweep.{FAMILY}.num_samples": 2, f"sweep.{FAMILY}.max_epochs": 2, f"sweep.{FAMILY}.grace_period": 1,
        f"sweep.{FAMILY}.epoch_fraction": 1.0, **overrides})


def trial_params(p: Params, config: dict) -> Params:
    """What a trial trains with: the sweep's params, its sampled config, the sweep's max_epochs, on CPU."""
    s = getattr(p.sweep, FAMILY)
    return validate_params(apply_overrides(p.to_dict(), {**config, f"train.{FAMILY}.max_epochs": s.max_epochs,
                                                          f"train.{FAMILY}.epoch_fraction": s.epoch_fraction,
                                                          "train.accelerator": "cpu", "train.devices": 1}))


@pytest.mark.parametrize(("raised", "status"), [(None, "FINISHED"), (SystemExit(0), "FINISHED"),
                                                 (SystemExit(1), "FAILED"), (RuntimeError("boom"), "FAILED")])
def test_the_trial_attempt_ends_its_run_finished_when_done_or_stopped_by_tune_and_failed_otherwise(
        tmp_path, raised, status) -> None:
    from pipeline.tuning.trial import trial_run_ends

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(uri, "capline", "trial")
    tracking.end_run("FAILED", run_id)  # an earlier attempt's outcome: the attempt's own end decides
    with pytest.raises(type(raised)) if raised else contextlib.nullcontext(), trial_run_ends(run_id):  # re-raised
        if raised:
            raise raised  # Tune stops a trial with SystemExit(0) inside tune.report
    assert tracking.get_run(uri, run_id)["status"] == status


def test_two_trial_sweep_is_tracked_as_nested_runs_and_rerun_reuses_it(local_ray, prepared_params, tmp_path, capfd):
    p = sweep_params(prepared_params, tmp_path, **{f"sweep.{FAMILY}.epoch_fraction": 0.5})  # half-epoch trials
    s = getattr(p.sweep, FAMILY)
    uri, exp = p.tracking.uri, p.tracking.experiment
    result = run_sweep(p, FAMILY)
    lines = re.findall(rf"sweep {FAMILY}: trial (\S+) (\w+) after (\d+) epoch\(s\), best val/loss ([\d.]+), \d+ s",
                       capfd.readouterr().out)  # one line per trial as it ends
    assert sorted((i, st, int(e)) for i, st, e, _ in lines) == sorted((t.trial_id, t.status, t.epochs)
                                                                     for t in result.trials)
    assert all(float(v) == pytest.approx(next(t.metric for t in result.trials if t.trial_id == i), abs=1e-4)
               for i, _, _, v in lines)

    assert [t.config for t in result.trials] == sample_config(s.space, 2, p.seed)  # seeded, beta-free here
    assert result.errored == 0 and result.completed + result.early_stopped == 2
    assert result.best.metric == min(t.metric for t in result.trials)
    assert result.epochs_run == sum(t.epochs for t in result.trials) and result.epochs_budget == 4
    metrics = result.to_metrics()
    assert metrics["best_config"] == result.best.config and metrics["trials"] == 2

    parent = tracking.get_run(uri, result.parent_run_id)
    assert parent["status"] == "FINISHED" and parent["tags"]["capline.kind"] == "sweep"
    assert parent["metrics"]["trials"] == 2 and parent["metrics"]["errored"] == 0
    assert parent["metrics"]["best_metric"] == pytest.approx(result.best.metric)
    assert parent["tags"]["best_run_id"] == result.best.run_id
    assert parent["metrics"]["cpu_seconds"] > 0 and parent["metrics"]["epochs_budget"] == 4
    assert set(tracking.list_artifacts(uri, parent["run_id"], "sweep")) == {
        "sweep/metric_vs_params.png", "sweep/summary.json"}

    lineage = tracking.lineage_tags(Path.cwd())
    children = tracking.child_runs(uri, exp, result.parent_run_id)
    assert sorted(c["tags"]["ray.trial_id"] for c in children) == [t.trial_id for t in result.trials]
    for trial in result.trials:
        child = tracking.get_run(uri, trial.run_id)
        tags = child["tags"]
        assert child["status"] == "FINISHED" and tags["mlflow.parentRunId"] == result.parent_run_id
        assert lineage.items() <= tags.items()  # git commit and the DVC hashes of the data
        assert tags["ray.trial_id"] == trial.trial_id and tags["seed"] == str(p.seed) and tags["node_id"]
        assert tags["params_hash"] == tracking.params_hash(trial_params(p, trial.config).to_dict())
        assert tags["sweep.status"] == trial.status
        assert json.loads(child["params"][f"train.{FAMILY}.lr"]) == trial.config[f"train.{FAMILY}.lr"]
        assert json.loads(child["params"][f"train.{FAMILY}.epoch_fraction"]) == 0.5
        others = [k for k in child["params"] if k != "seed" and not k.startswith(f"models.{FAMILY}.")
                  and not (k.startswith("train.") and k.split(".")[1] not in ("captioner", "transformer_lm"))]
        assert others == []  # the family's own params, once: no other family's, no Lightning copies (model/*)
        history = tracking.metric_history(uri, trial.run_id, "val/loss")
        assert len(history) == trial.epochs and min(v for _, v in history) == pytest.approx(trial.metric)
        assert (trial.status == "completed") == (trial.epochs == s.max_epochs)
        assert tracking.list_artifacts(uri, trial.run_id, "checkpoints") == ["checkpoints/best.ckpt"]
        assert not load_module(FAMILY, trial.checkpoint).training  # a real Lightning checkpoint

    again = run_sweep(p, FAMILY)  # finished: read back, nothing retrained
    assert again.parent_run_id == result.parent_run_id
    assert again.wall_seconds == pytest.approx(result.wall_seconds, abs=1.0)  # the sweep's, not the read-back's
    assert [(t.trial_id, t.metric, t.status) for t in again.trials] == [
        (t.trial_id, t.metric, t.status) for t in result.trials]
    assert len(tracking.child_runs(uri, exp, result.parent_run_id)) == 2
    for trial in result.trials:
        assert len(tracking.metric_history(uri, trial.run_id, "val/loss")) == trial.epochs

    # the CLI over the same store: the trials table, and one trial rerun outside Ray from its record
    sets = [a for k, v in cli_overrides(p).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    table = CliRunner().invoke(app, ["runs", FAMILY, *sets], env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    assert all(t.trial_id in table.output and t.run_id in table.output for t in result.trials)
    rows = {line.split("│")[1].strip(): line for line in table.output.splitlines() if line.count("│") > 3}
    assert all(t.status in rows[t.trial_id] for t in result.trials)  # completed / early_stopped, not FINISHED
    again = CliRunner().invoke(app, ["reproduce", result.best.run_id[:8], *sets])  # a unique start of the id
    assert again.exit_code == 0, again.output
    report = yaml.safe_load(again.stdout)
    assert report["within_tolerance"] and report["recorded"] == pytest.approx(result.best.metric)


def cli_overrides(p: Params) -> dict:
    """The --set overrides that make the CLI see exactly the params `p`."""
    return flatten_keys(p.to_dict())


def _seed_with_both(space: dict, n: int) -> int:
    """The first seed whose n sampled configs include every choice (the test needs both outcomes)."""
    values = next(iter(space.values()))["choice"]
    key = next(iter(space))
    return next(s for s in range(100) if {c[key] for c in sample_config(space, n, s)} == set(values))


def test_a_diverging_trial_errors_is_recorded_and_never_best(local_ray, prepared_params, tmp_path):
    # AdamW's decoupled decay multiplies weights by (1 - lr * wd) = -9 per step at lr 10: inf within ~40 steps
    space = {f"train.{FAMILY}.lr": {"choice": [3e-3, 10.0]}}
    seed = _seed_with_both(space, 3)
    p = sweep_params(prepared_params, tmp_path, seed=seed, **{
        f"sweep.{FAMILY}.space": space, f"sweep.{FAMILY}.num_samples": 3, f"sweep.{FAMILY}.grace_period": 2,
        f"sweep.{FAMILY}.max_failures": 1, f"train.{FAMILY}.optimizer": "adamw",
        f"train.{FAMILY}.weight_decay": 1.0, f"train.{FAMILY}.warmup_fraction": 0.0,
        f"train.{FAMILY}.clip_grad_norm": 0.0, f"train.{FAMILY}.schedule": "constant"})
    result = run_sweep(p, FAMILY)

    diverging = [t for t in result.trials if t.config[f"train.{FAMILY}.lr"] == 10.0]
    healthy = [t for t in result.trials if t not in diverging]
    assert diverging and healthy
    assert result.errored == len(diverging) and all(t.status == "completed" for t in healthy)
    assert result.best in healthy and result.best.metric is not None and math.isfinite(result.best.metric)
    for trial in diverging:
        assert trial.status == "errored" and trial.metric is None and trial.checkpoint is None
        # the retry (max_failures=1) failed at once instead of training again
        assert "NonFiniteLossError" in trial.error and "not retried" in trial.error
        child = tracking.get_run(p.tracking.uri, trial.run_id)
        assert child["status"] == "FAILED" and child["tags"]["diverged"] == "true"
        assert child["tags"]["sweep.status"] == "errored"
    assert tracking.get_run(p.tracking.uri, result.parent_run_id)["tags"]["best_run_id"] == result.best.run_id



def test_the_sweep_stage_stops_without_writing_best_json_when_every_trial_diverged(local_ray, prepared_params,
                                                                                     tmp_path):
    from stages import sweep

    p = sweep_params(prepared_params, tmp_path, **{
        f"sweep.{FAMILY}.space": {f"train.{FAMILY}.lr": {"choice": [10.0]}}, f"sweep.{FAMILY}.num_samples": 1,
        f"sweep.{FAMILY}.max_failures": 0, f"train.{FAMILY}.optimizer": "adamw",
        f"train.{FAMILY}.weight_decay": 1.0, f"train.{FAMILY}.warmup_fraction": 0.0,
        f"train.{FAMILY}.clip_grad_norm": 0.0, f"train.{FAMILY}.schedule": "constant",
        "paths.sweeps": str(tmp_path / "sweeps")})
    with pytest.raises(RuntimeError, match=r"sweep lstm_lm: no trial finished with a finite val/loss \(1 of 1 errored"):
        sweep.run(p, FAMILY)
    assert not sweep.best_path(p, FAMILY).exists()  # train@ cannot pick up a diverged configuration
    assert not (Path(p.paths.metrics) / f"sweep_{FAMILY}.json").exists()

def _result_rows(storage: Path) -> list[dict]:
    """Every result Tune's driver has processed, from the (one) trial's result.json."""
    rows: list[dict] = []
    for path in storage.glob("sweep-*/trial_*/result.json"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return rows


def test_a_crashed_trial_restarts_from_its_last_checkpoint(local_ray, prepared_params, tmp_path):
    epochs = 20  # long enough to kill the trial in the middle (a tiny epoch takes a fraction of a second)
    p = sweep_params(prepared_params, tmp_path, **{f"sweep.{FAMILY}.num_samples": 1,
                                                   f"sweep.{FAMILY}.max_epochs": epochs,
                                                   f"sweep.{FAMILY}.grace_period": epochs,
                                                   f"sweep.{FAMILY}.max_failures": 1})
    storage = tmp_path / "ray" / FAMILY
    outcome: dict = {}
    sweep = threading.Thread(target=lambda: outcome.update(result=run_sweep(p, FAMILY)))
    sweep.start()
    deadline = time.time() + 120
    while len(_result_rows(storage)) < 2:  # epoch 1's checkpoint is registered once epoch 2 is processed
        assert sweep.is_alive() and time.time() < deadline, "the trial finished before it could be killed"
        time.sleep(0.05)
    trial_run = tracking.find_runs(p.tracking.uri, p.tracking.experiment,
                                   tracking.tag_filter({"capline.kind": "trial"}))[0]
    os.kill(int(trial_run["tags"][tracking.PID_TAG]), signal.SIGKILL)  # the trial's Ray worker process
    sweep.join(timeout=240)
    result = outcome["result"]

    (trial,) = result.trials
    assert trial.status == "completed" and trial.epochs == epochs
    rows = _result_rows(storage)
    restarts = [r for r in rows if r["iterations_since_restore"] == 1 and r is not rows[0]]
    assert restarts and restarts[0]["epoch"] > 1  # went on from a checkpoint, not from epoch 1
    assert rows[-1]["epoch"] == epochs
    assert [c["run_id"] for c in tracking.child_runs(p.tracking.uri, p.tracking.experiment,
                                                     result.parent_run_id)] == [trial.run_id]


DRIVER = """
import sys
from pipeline.params import load_params
from pipeline.tuning import run_sweep
run_sweep(load_params(sys.argv[1]), sys.argv[2])
"""


def _terminated_trials(storage: Path) -> set[str]:
    """Trial ids Tune's saved experiment state marks TERMINATED (what a restore will not rerun)."""
    done: set[str] = set()
    for state in storage.glob("sweep-*/experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):  # being rewritten
            continue
        done |= {t["trial_id"] for t in (json.loads(raw) for raw, _ in trials) if t.get("status") == "TERMINATED"}
    return done


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(local_ray, prepared_params, tmp_path):
    p = sweep_params(prepared_params, tmp_path, **{f"sweep.{FAMILY}.num_samples": 3,
                                                   f"sweep.{FAMILY}.max_concurrent": 1,
                                                   f"sweep.{FAMILY}.grace_period": 2})
    uri, exp = p.tracking.uri, p.tracking.experiment
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.to_dict()), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(params_file), FAMILY], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    storage = tmp_path / "ray" / FAMILY
    try:
        deadline = time.time() + 600  # liveness only: generous for a loaded 2-core machine
        while not (finished := _terminated_trials(storage)):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started (its own process group)
        driver.wait()
        log.close()
    assert len(finished) < 3, "the sweep ended before it could be interrupted"
    crashed = tracking.latest_sweep(uri, exp, FAMILY)
    before = {c["tags"]["ray.trial_id"]: tracking.metric_history(uri, c["run_id"], "val/loss")
              for c in tracking.child_runs(uri, exp, crashed["run_id"])}

    result = run_sweep(p, FAMILY)

    assert result.parent_run_id == crashed["run_id"]  # the same sweep, resumed
    assert len(result.trials) == 3 and result.completed == 3
    for trial_id in finished:  # finished before the kill: kept, not trained again
        run_id = next(t.run_id for t in result.trials if t.trial_id == trial_id)
        assert tracking.metric_history(uri, run_id, "val/loss") == before[trial_id]
    assert len(tracking.child_runs(uri, exp, result.parent_run_id)) == 3
    assert not tracking.find_runs(uri, exp, "attributes.status = 'RUNNING'")


@pytest.mark.parametrize(("overrides", "epochs"), [
    ({}, 3), ({"train.captioner.scst_epochs": 2}, 5),
    ({"train.captioner.scst_epochs": 2, "sweep.captioner.space": {"train.captioner.scst_epochs": {"randint": [0, 5]}}},
     7)])
def test_asha_lets_a_captioner_trial_reach_its_self_critical_epochs(overrides, epochs) -> None:
    from pipeline.tuning.sweep import trial_epochs
    from pipeline.tuning.trial import TrialContext

    base = load_params(ROOT / "params.yaml", {"sweep.captioner.max_epochs": 3, **overrides}).to_dict()
    ctx = TrialContext("captioner", base, "", "", "", "", "", "", {}, 1, False, 1.0, 0.0, 3, 1.0)
    assert trial_epochs(ctx) == epochs  # 3 of cross-entropy, then the most scst_epochs a trial can have
