"""Inside a trial: the same Lightning pieces as `capline train`, one report (metrics + checkpoint) per epoch.

A single-worker trial trains in the Tune trial's own process. A multi-worker trial is a Ray Train V2
`TorchTrainer` launched from the Tune trial (its driver), with Lightning's Ray integration doing DDP; the
workers report to Ray Train and `TuneReportCallback` forwards rank 0's report to Tune. Either way the trial's
MLflow run (nested under the sweep's run) is created or found again by the Tune process, and only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
import ray.train
import torch
from ray import tune
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline import tracking
from pipeline.families import family as family_record
from pipeline.params import Params, apply_overrides, validate_params
from pipeline.training import fit
from pipeline.training.callbacks import NonFiniteLossError

log = logging.getLogger(__name__)

CKPT_NAME = "epoch.ckpt"  # the Lightning checkpoint inside every reported Ray checkpoint folder
Report = Callable[[dict[str, Any], str | None], None]  # (metrics, checkpoint folder or None)


def metric_key(monitor: str) -> str:
    """The name a Lightning metric is reported to Tune under ("val/cider" -> "val_cider")."""
    return monitor.replace("/", "_")  # Tune flattens nested results on "/"


def absolute(path: str, root: str) -> str:
    """`path` made absolute against `root`; URIs (s3://...) stay as they are."""
    return path if "://" in path else str(Path(root, path).resolve())


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, small and picklable (it travels to every trial and worker)."""

    family: str
    base: dict[str, Any]  # the sweep's params as given (recorded as is)
    root: str  # the driver's working directory: relative data paths resolve against it
    sweep_name: str
    train_storage: str  # Ray Train runs of multi-worker trials: <storage>/<sweep_name>.train/trial-<id>
    uri: str  # MLflow tracking URI (absolute)
    experiment: str
    parent_run_id: str
    lineage: dict[str, str]
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    max_epochs: int
    epoch_fraction: float

    def params(self, config: dict[str, Any]) -> Params:
        """The trial's params: base + sampled config, trained for at most the sweep's max_epochs."""
        overrides = {**config, f"train.{self.family}.max_epochs": self.max_epochs,
                     f"train.{self.family}.epoch_fraction": self.epoch_fraction,
                     "train.accelerator": "gpu" if self.use_gpu else "cpu", "train.devices": 1}
        source = f"sweep.{self.family} trial"
        return validate_params(apply_overrides(self.base, overrides, source=source), source=source)

    def runtime(self, p: Params) -> Params:
        """The same params with every path absolute, so a trial finds the data whatever its cwd."""
        paths = {f"paths.{k}": absolute(v, self.root) for k, v in p.paths.model_dump().items()}
        return p.overridden(paths)


def open_child(ctx: TrialContext, trial_id: str, p: Params) -> str:
    """The trial's MLflow run: created on the first attempt, reopened on a retry or a resumed sweep.

    A trial that diverged before fails again at once: a non-finite loss is deterministic, retrying it
    would only spend the budget of max_failures.
    """
    match = {"mlflow.parentRunId": ctx.parent_run_id, "ray.trial_id": trial_id}
    found = tracking.find_runs(ctx.uri, ctx.experiment, tracking.tag_filter(match), max_results=1)
    if found:
        run = found[0]
        if run["tags"].get("diverged") == "true":
            raise NonFiniteLossError(f"trial {trial_id} diverged in an earlier attempt (MLflow run "
                                     f"{run['run_id']}), not retried: {run['tags'].get('error', '')}")
        tracking.reopen_run(run["run_id"])
        return run["run_id"]
    tags = {**ctx.lineage, "capline.kind": "trial", "capline.sweep": ctx.sweep_name, "family": ctx.family,
            "ray.trial_id": trial_id, "params_hash": tracking.params_hash(p.to_dict()), "seed": p.seed,
            "node_id": ray.get_runtime_context().get_node_id()}
    run_id = tracking.create_run(ctx.uri, ctx.experiment, f"trial-{trial_id}", tags, ctx.parent_run_id)
    tracking.log_params_flat(run_id, fit.run_params(p, ctx.family))  # the searched keys are among them
    for rid in (run_id, ctx.parent_run_id):  # the sweep's run reads what its trials read (each input kept once)
        tracking.log_data_inputs(rid, ctx.lineage, fit.data_paths(p, ctx.family))
    return run_id


@contextlib.contextmanager
def trial_run_ends(run_id: str) -> Iterator[None]:
    """The attempt ends the trial's MLflow run: FINISHED, or FAILED (a divergence also tagged diverged=true).

    Only the trainable ends it, never a worker's logger: a killed DDP attempt's surviving worker may tear
    down after the retry has finished, and must not turn the retried run FAILED.
    """
    try:
        yield
    except NonFiniteLossError as err:
        tracking.set_tags(run_id, {"diverged": "true", "error": str(err)})
        tracking.end_run("FAILED", run_id)
        raise
    except SystemExit as stop:
        # Tune stops a trial (ASHA, the sweep's end) with SystemExit(0) inside tune.report, and may not wait for
        # it: Lightning has just ended the run FAILED on the way out, possibly after the driver recorded the
        # outcome. A stop is not a failure, so the run ends as the driver records a stopped trial: FINISHED.
        tracking.end_run("FINISHED" if stop.code in (0, None) else "FAILED", run_id)
        raise
    except BaseException:
        tracking.end_run("FAILED", run_id)
        raise
    tracking.end_run("FINISHED", run_id)


def _finite(value: Any) -> float | None:
    value = float(value) if value is not None else None
    return value if value is not None and math.isfinite(value) else None


class EpochReport(pl.Callback):
    """After every epoch's validation: report the monitor, val_loss, epoch and a checkpoint.

    A missing or non-finite metric stops the trial with NonFiniteLossError instead of reaching Tune
    (ASHA cannot rank NaN, and a diverged trial must never look like the best). Under DDP every rank
    reports (Ray Train expects all of them); only rank 0 hands over the checkpoint it wrote.
    """

    def __init__(self, family: str, report: Report, rank: int, started: float) -> None:
        self.monitor = family_record(family).monitor
        self.report, self.rank, self.started = report, rank, started
        self.startup: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.startup is None:
            self.startup = time.time() - self.started

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1  # epochs completed: ASHA's time attribute
        out: dict[str, Any] = {"epoch": epoch, "node_id": ray.get_runtime_context().get_node_id(),
                               "final_epoch": int(trainer.should_stop or epoch >= trainer.max_epochs),
                               "startup_seconds": self.startup or 0.0, "started_at": self.started}
        for key in {self.monitor, "val/loss"}:
            value = _finite(metrics.get(key))
            if value is None:
                raise NonFiniteLossError(f"{key} is {metrics.get(key)} after epoch {epoch}: the trial diverged")
            out[metric_key(key)] = value
        with tempfile.TemporaryDirectory(prefix="capline-report-") as folder:
            trainer.save_checkpoint(Path(folder) / CKPT_NAME)  # every rank calls it; rank 0 writes
            self.report(out, folder if self.rank == 0 else None)


def restored(checkpoint: Any, scratch: str) -> str | None:
    """The Lightning checkpoint file of a Ray checkpoint, copied into scratch (None: a fresh start)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint.to_directory(str(Path(scratch) / "resume"))) / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint.path}: no {CKPT_NAME} in the trial's checkpoint")
    log.info("trial resumes from %s", checkpoint.path)
    return str(path)


def train_trial(ctx: TrialContext, p: Params, run_id: str, report: EpochReport, part: tuple[int, int],
                ckpt_path: str | None, scratch: str, prepare: Callable | None = None, **trainer_kwargs: Any) -> None:
    """Build data, module and Trainer exactly as `capline train` does, then fit (rank 0 logs to MLflow)."""
    rank, world = part
    p = ctx.runtime(p)
    torch.set_num_threads(max(1, int(ctx.cpus_per_worker)))  # the CPUs this worker holds, no more
    pl.seed_everything(p.seed, workers=True, verbose=False)
    vocab = fit.vocabulary(p, ctx.family)
    dm = fit.build_datamodule(p, ctx.family, vocab)
    if world > 1:
        dm.shard(rank, world)
    module = fit.build_module(p, ctx.family, vocab, dm)
    if p.train.compile:
        module.model.compile()
    logger = None
    if rank == 0:
        logger = tracking.lightning_logger(ctx.uri, ctx.experiment, f"trial-{run_id}",
                                           {"node_id": ray.get_runtime_context().get_node_id()}, run_id=run_id,
                                           ends_run=False)  # the trainable and the sweep's driver end it
    trainer = fit.build_trainer(p, ctx.family, logger=logger, callbacks=[report],
                                checkpoint_dir=Path(scratch) / "models", enable_progress_bar=False, **trainer_kwargs)
    if prepare is not None:
        trainer = prepare(trainer)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)


def single_worker_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: train in this process, report to Tune, resume from Tune's checkpoint."""
    started = time.time()
    trial_id = tune.get_context().get_trial_id()
    p = ctx.params(config)
    run_id = open_child(ctx, trial_id, p)

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    with tempfile.TemporaryDirectory(prefix="capline-trial-") as scratch, trial_run_ends(run_id):
        ckpt = restored(tune.get_checkpoint(), scratch)
        train_trial(ctx, p, run_id, EpochReport(ctx.family, report, 0, started), (0, 1), ckpt, scratch)


def ddp_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker of a multi-worker trial: Lightning DDP over the Ray worker group."""
    ctx: TrialContext = cfg["ctx"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    with tempfile.TemporaryDirectory(prefix="capline-worker-") as scratch:
        ckpt = restored(ray.train.get_checkpoint(), scratch)
        train_trial(ctx, ctx.params(cfg["config"]), cfg["run_id"], EpochReport(ctx.family, report, rank,
                    cfg["started"]), (rank, world), ckpt, scratch, prepare=prepare_trainer,
                    strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()], devices="auto",
                    use_distributed_sampler=False)  # the data module shards itself (see datamodules)


def _diverged(err: BaseException) -> BaseException | None:
    """The NonFiniteLossError behind a Ray Train failure, if that is what it was."""
    failures = getattr(err, "worker_failures", None) or {}
    for failure in failures.values():
        cause: BaseException | None = failure
        while cause is not None:
            if isinstance(cause, NonFiniteLossError) or "NonFiniteLossError" in type(cause).__name__:
                return cause
            cause = cause.__cause__
    return None


def multi_worker_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable driving a Ray Train V2 TorchTrainer; Train restores its own checkpoints.

    The run name is fixed per trial, so a retried trial (Tune's max_failures, a resumed sweep) continues
    the same Train run from its latest checkpoint.
    """
    started = time.time()
    trial_id = tune.get_context().get_trial_id()
    run_id = open_child(ctx, trial_id, ctx.params(config))
    fam = family_record(ctx.family)
    monitor, mode = fam.monitor, fam.mode
    resources = {"CPU": ctx.cpus_per_worker, **({"GPU": ctx.gpus_per_worker} if ctx.use_gpu else {})}
    trainer = TorchTrainer(
        ddp_worker, train_loop_config={"ctx": ctx, "config": config, "run_id": run_id, "started": started},
        torch_config=TorchConfig(backend="nccl" if ctx.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=ctx.num_workers, use_gpu=ctx.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"trial-{trial_id}", storage_path=ctx.train_storage, callbacks=[TuneReportCallback()],
            # retries are Tune's (max_failures); a worker group that cannot start fails instead of waiting forever
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric_key(
                monitor), checkpoint_score_order=mode)))
    with trial_run_ends(run_id):
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as err:
            cause = _diverged(err)
            if cause is None:
                raise
            raise NonFiniteLossError(str(cause)) from err
