"""Run one family's sweep: Ray Tune random search + ASHA, nested MLflow runs, resumable, summarised."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray
from pyarrow import fs as pafs
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import tracking
from pipeline.families import FAMILIES
from pipeline.families import family as family_record
from pipeline.params import Params, SweepFamilyParams, domain_values
from pipeline.sweep_results import SweepResult, metric_figure, summarise
from pipeline.training.fit import build_datamodule, check_epoch_fraction, vocabulary
from pipeline.tuning import records, state
from pipeline.tuning.space import search_space
from pipeline.tuning.trial import TrialContext, metric_key, multi_worker_trial, single_worker_trial

log = logging.getLogger(__name__)

DONE_FILE = "capline_sweep.json"  # written into the experiment folder once a sweep is summarised
DRIVER_MEMORY = 256 * 1024**2  # logical bytes a multi-worker trial's driver asks for: it needs no CPU
TRIAL_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0",  # trials keep the driver's cwd (paths are absolute anyway)
             "RAY_TRAIN_V2_ENABLED": "1"}


def init_ray(address: str | None = None, dashboard: bool = False) -> bool:
    """Start a local Ray (address None) or connect to a cluster; True when this call did either.

    A local Ray runs without the dashboard unless asked: Ray Train V2 needs it (its State API is how a
    Train run's placement group is released when ASHA stops a multi-worker trial). An already initialised
    Ray is used as it is (False: whoever started it shuts it down).
    """
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": TRIAL_ENV}
    if address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=dashboard, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    return True


def sweep_key(p: Params, family: str, lineage: dict[str, str]) -> str:
    """Hash of what a family's trials depend on: its params, the data params and the data's DVC hashes.

    Paths, tracking and evaluation settings and other families are left out: they do not change what a
    trial computes, except evaluate.no_repeat_ngram for the captioner (its val/cider decoding blocks repeats).
    A rerun with the same key resumes (or reuses) the same Ray experiment.
    """
    d = p.to_dict()
    skip = ("paths", "tracking", "evaluate", "models", "train", "sweep", "report", "features")
    key = {k: v for k, v in d.items() if k not in skip}
    key["models"] = d["models"][family]
    key["train"] = {k: v for k, v in d["train"].items() if k not in FAMILIES or k == family}
    key["sweep"] = d["sweep"][family]
    data = ["coco", "text", "vocab", "encoded", "embeddings"]
    if family_record(family).captions:  # only captioner trials read pre-extracted features and decode captions
        key["features"], data = d["features"], [*data, "features"]
        key["no_repeat_ngram"] = d["evaluate"]["no_repeat_ngram"]
    key["lineage"] = tracking.dvc_hashes_under(lineage, [d["paths"][k] for k in data])
    return tracking.params_hash(key)


def storage_root(ray_storage: str, family: str) -> str:
    """paths.ray_storage/<family>, absolute (a URI such as s3://bucket/path stays a URI)."""
    return f"{ray_storage.rstrip('/')}/{family}" if "://" in ray_storage else str(Path(ray_storage).resolve() / family)


def absolute_uri(uri: str) -> str:
    """A relative sqlite:/// tracking URI made absolute (trials may run elsewhere); others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _remove(path: str) -> None:
    """Delete a folder of Ray storage if it exists (local or remote)."""
    if "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = state.filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)


def _read_done(path: str) -> dict | None:
    fs, inner = state.filesystem(f"{path}/{DONE_FILE}")
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as fh:
        return json.loads(fh.read().decode("utf-8"))


def _write_done(path: str, summary: dict) -> None:
    if "://" not in path:
        from pipeline.io import write_json

        write_json(Path(path) / DONE_FILE, summary)
        return
    fs, inner = state.filesystem(f"{path}/{DONE_FILE}")
    with fs.open_output_stream(inner) as fh:
        fh.write(json.dumps(summary, indent=2).encode("utf-8"))


def _concurrency(s: SweepFamilyParams) -> int | None:
    """max_concurrent, or (0) what the cluster's resources allow; None lets Tune place single-worker trials."""
    if s.max_concurrent:
        return s.max_concurrent
    if s.num_workers == 1:
        return None  # the trials ask Tune for their own resources
    total = ray.cluster_resources()  # a multi-worker trial's driver holds nothing: count the workers
    fits = total.get("CPU", 0.0) // (s.num_workers * s.cpus_per_worker)
    if s.use_gpu:
        fits = min(fits, total.get("GPU", 0.0) // (s.num_workers * s.gpus_per_worker))
    return max(1, int(fits))


def check_trial_epochs(p: Params, family: str, s: SweepFamilyParams) -> None:
    """A trial's epoch (sweep.<family>.epoch_fraction of the batches) must hold one batch, at the largest batch
    size the space can draw: checked once before Ray starts, not found by every trial (ValueError naming keys)."""
    key = f"train.{family}.batch_size"
    overrides: dict[str, Any] = {f"train.{family}.epoch_fraction": s.epoch_fraction}
    if key in s.space:  # the largest batch size the space can draw gives the fewest batches
        (kind, values), = s.space[key].items()
        overrides[key] = int(max(values)) - (kind == "randint")  # randint's upper bound is exclusive
    trial = p.overridden(overrides)
    check_epoch_fraction(trial, family, build_datamodule(trial, family, vocabulary(trial, family)))


def _check_resources(s: SweepFamilyParams, family: str) -> None:
    """Fail at once when one trial needs more than the whole (local) cluster has, instead of waiting."""
    total = ray.cluster_resources()
    need = {"CPU": s.num_workers * s.cpus_per_worker, "GPU": s.num_workers * s.gpus_per_worker}
    for name, amount in need.items():
        if amount > total.get(name, 0.0):
            raise ValueError(f"sweep.{family}: a trial needs {amount:g} {name} (num_workers x {name.lower()}s_per_"
                             f"worker) but this Ray cluster has {total.get(name, 0.0):g}")


class TrialLines(tune.Callback):
    """One flushed line per trial that ends, so a sweep is not silent for minutes (Tune runs with verbose=0)."""

    def __init__(self, family: str, monitor: str, mode: str) -> None:
        self.family, self.monitor, self.mode = family, monitor, mode

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}  # final_epoch: how records.trial_records tells completed from stopped
        status = "completed" if result.get("final_epoch") else "early_stopped"
        self.line(trial, status, int(result.get("epoch", 0)))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.line(trial, "errored", int((trial.last_result or {}).get("epoch", 0)))

    def line(self, trial: Any, status: str, epochs: int) -> None:
        best = (trial.metric_analysis or {}).get(metric_key(self.monitor), {}).get(self.mode)
        value = f"{self.monitor} {best:.4f}" if best is not None else f"no {self.monitor}"
        seconds = (trial.last_result or {}).get("time_total_s", 0.0)
        print(f"sweep {self.family}: trial {trial.trial_id} {status} after {epochs} epoch(s), best {value}, "
              f"{seconds:.0f} s", flush=True)


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


def _trainable(ctx: TrialContext) -> Any:
    """The Tune function trainable with the resources it holds."""
    if ctx.num_workers == 1:
        fn, resources = single_worker_trial, {"cpu": ctx.cpus_per_worker, "gpu": ctx.gpus_per_worker}
    else:  # the driver only waits on its Train workers, which get their own resources
        fn, resources = multi_worker_trial, {"cpu": 0, "memory": DRIVER_MEMORY}
    return tune.with_resources(tune.with_parameters(fn, ctx=ctx), resources)


def trial_epochs(ctx: TrialContext) -> int:
    """The most epochs a trial runs: the sweep's max_epochs, then a captioner's self-critical epochs (the most
    its search space can give), which ASHA must let it reach."""
    extra = family_record(ctx.family).extra_epochs
    if extra is None:
        return ctx.max_epochs
    spec = ctx.base["sweep"][ctx.family]["space"].get(f"train.{ctx.family}.{extra}")
    most = ctx.base["train"][ctx.family][extra] if spec is None else max(domain_values(*next(iter(spec.items()))))
    return ctx.max_epochs + int(most)


def _tuner(ctx: TrialContext, s: SweepFamilyParams, path: str, seed: int) -> tune.Tuner:
    """A fresh Tuner at `path` (storage/name): seeded random search, ASHA on the monitor, a report per epoch."""
    storage, name = path.rsplit("/", 1)
    fam = family_record(ctx.family)
    monitor, mode = fam.monitor, fam.mode
    key = metric_key(monitor)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=trial_epochs(ctx), grace_period=s.grace_period,
                              reduction_factor=s.reduction_factor)
    tune_config = tune.TuneConfig(metric=key, mode=mode, num_samples=s.num_samples, scheduler=scheduler,
                                  # Tune ignores max_concurrent_trials with a generator: it takes the limit itself
                                  search_alg=BasicVariantGenerator(max_concurrent=_concurrency(s) or 0,
                                                                   random_state=seed),
                                  trial_dirname_creator=trial_dirname,
                                  # a new single-worker trial reuses a finished one's process: no fresh
                                  # import of torch and Lightning (most of a small trial's start-up)
                                  reuse_actors=s.num_workers == 1)
    run_config = tune.RunConfig(
        name=name, storage_path=storage, verbose=0, failure_config=tune.FailureConfig(max_failures=s.max_failures),
        callbacks=[state.SealState(path),  # records each save's digests in the parent run
                   TrialLines(ctx.family, monitor, mode)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=key,
                                                checkpoint_score_order=mode))
    return tune.Tuner(_trainable(ctx), param_space=search_space(s.space), tune_config=tune_config,
                      run_config=run_config)


def _find_parent(uri: str, experiment: str, name: str) -> dict | None:
    """The MLflow run of an earlier sweep with this name (the newest), if any."""
    found = tracking.find_runs(uri, experiment, tracking.tag_filter({"capline.kind": "sweep", "capline.sweep": name}),
                               max_results=1)
    return found[0] if found else None


def _new_parent(p: Params, family: str, name: str, path: str, lineage: dict, uri: str) -> str:
    """A new MLflow run for the sweep: lineage tags, the sweep's settings as params."""
    tags = {**lineage, "capline.kind": "sweep", "capline.sweep": name, "family": family,
            "params_hash": tracking.params_hash(p.to_dict()), "ray.experiment_path": path, "seed": p.seed}
    run_id = tracking.create_run(uri, p.tracking.experiment, f"sweep-{family}", tags)
    tracking.log_params_flat(run_id, {"sweep": {family: getattr(p.sweep, family).model_dump()}, "seed": p.seed})
    return run_id


def run_sweep(p: Params, family: str, *, address: str | None = None, resume: bool = True) -> SweepResult:
    """Sweep `family` over sweep.<family>.space; resume (or reuse) the same sweep when rerun.

    The Ray experiment is named after sweep_key, under paths.ray_storage/<family>. With resume, an
    interrupted sweep continues in its own MLflow run (finished trials are kept, unfinished ones resume from
    their last checkpoint, errored ones are retried) and a finished one is only read back; resume=False
    deletes the experiment and starts over.
    """
    family_record(family)  # an unknown name stops here, naming the known ones
    started = time.time()
    s = getattr(p.sweep, family)
    root = str(Path.cwd())
    lineage = tracking.lineage_tags(root)
    name = f"sweep-{sweep_key(p, family, lineage)}"
    path = f"{storage_root(p.paths.ray_storage, family)}/{name}"
    uri, experiment = absolute_uri(p.tracking.uri), p.tracking.experiment
    tracking.check_server(uri)  # an unreachable tracking server stops the sweep before Ray starts
    check_trial_epochs(p, family, s)
    started_ray = init_ray(address, dashboard=s.num_workers > 1)
    try:
        if started_ray and address is None:
            _check_resources(s, family)
        tracking.mark_stale_runs(uri, experiment)  # runs of a crashed sweep end KILLED, not RUNNING forever
        restore = resume and tune.Tuner.can_restore(path)
        found = _find_parent(uri, experiment, name) if restore else None
        if restore and found is None:  # nothing to check the saved state against: never unpickle it
            log.warning("sweep %s: %s has no MLflow run recording its state; starting over", family, path)
            restore = False
        if restore:  # before Tune reads any of it: every pickled file is one this sweep recorded
            state.verify(path, state.recorded_digests(found["tags"]))
        else:
            _remove(path)
            _remove(f"{path}.train")
        parent = found["run_id"] if found else _new_parent(p, family, name, path, lineage, uri)
        state.SealState.TARGETS[path] = (uri, parent)
        ctx = TrialContext(family, p.to_dict(), root, name, f"{path}.train", uri, experiment, parent, lineage,
                           s.num_workers, s.use_gpu, s.cpus_per_worker, s.gpus_per_worker, s.max_epochs,
                           s.epoch_fraction)
        done = _read_done(path) if found and found["status"] == "FINISHED" else None
        if done is not None:
            log.info("sweep %s: reusing the finished sweep %s", family, path)
            grid = tune.Tuner.restore(path, trainable=_trainable(ctx)).get_results()
            # the sweep's own wall time, not this read-back's
            return _result(ctx, s, path, p.seed, grid, time.time() - float(done.get("wall_seconds", 0.0)))
        if found:
            tracking.reopen_run(parent)
        return _run(ctx, s, path, p.seed, restore, started)
    finally:
        if started_ray:
            ray.shutdown()


def _run(ctx: TrialContext, s: SweepFamilyParams, path: str, seed: int, restore: bool, started: float) -> SweepResult:
    """Fit (or resume) the Tuner, record trials and summary in MLflow; the parent run never stays RUNNING."""
    status = "FAILED"
    try:
        if restore:
            log.info("sweep %s: resuming %s", ctx.family, path)
            tuner = tune.Tuner.restore(path, trainable=_trainable(ctx), resume_errored=True)
        else:
            tuner = _tuner(ctx, s, path, seed)
        state.seal_storage(ctx.uri, ctx.parent_run_id, path)  # tuner.pkl, written when the Tuner is made
        grid = tuner.fit()
        result = _result(ctx, s, path, seed, grid, started)
        records.finish_children(result, ctx, grid)
        log_summary(result, s.space)
        _write_done(path, result.to_metrics())
        state.seal_storage(ctx.uri, ctx.parent_run_id, path)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(status, ctx.parent_run_id)


def _result(ctx: TrialContext, s: SweepFamilyParams, path: str, seed: int, grid: Any, started: float) -> SweepResult:
    fam = family_record(ctx.family)
    monitor, mode = fam.monitor, fam.mode
    trials = records.trial_records(grid, ctx, metric_key(monitor), mode, seed)
    return summarise(ctx.family, monitor, mode, trials, experiment_path=path, parent_run_id=ctx.parent_run_id,
                     wall_seconds=time.time() - started, epochs_budget=s.num_samples * trial_epochs(ctx))


def log_summary(result: SweepResult, space: dict[str, dict]) -> None:
    """The parent run's summary: counts, best trial, compute, ASHA savings and the metric figure."""
    run_id = result.parent_run_id
    metrics = result.to_metrics()
    tracking.log_metrics(run_id, {k: metrics[k] for k in (
        "trials", "completed", "early_stopped", "errored", "best_metric", "wall_seconds", "cpu_seconds",
        "gpu_seconds", "epochs_run", "epochs_budget", "asha_savings")})
    best = result.best
    tracking.set_tags(run_id, {"best_trial_id": best.trial_id if best else "none",
                               "best_run_id": (best.run_id or "none") if best else "none",
                               "best_config": json.dumps(best.config if best else None, sort_keys=True)})
    tracking.log_dict(run_id, {**metrics, "trials": [t.to_dict() for t in result.trials]}, "sweep/summary.json")
    if any(t.metric is not None for t in result.trials):
        import matplotlib.pyplot as plt

        fig = metric_figure(result, space)
        tracking.log_figure(run_id, fig, "sweep/metric_vs_params.png")
        plt.close(fig)
