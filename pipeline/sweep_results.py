"""What a sweep produced: one record per trial, the sweep's summary and its figure (no Ray here)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pipeline.params import LOG_DOMAINS

STATUSES = ("completed", "early_stopped", "errored")


@dataclasses.dataclass
class TrialRecord:
    """One trial: its config (dotted params key -> value), best metric, compute and where it is logged."""

    trial_id: str
    run_id: str | None
    status: str  # completed | early_stopped (by ASHA) | errored
    config: dict[str, Any]  # the value itself (beta, not its exponent, for one_minus_loguniform)
    metric: float | None  # best value of the family's monitor over the epochs; None when errored
    epochs: int
    seed: int
    node_id: str | None
    checkpoint: str | None  # Lightning checkpoint of the best epoch (local path or storage URI)
    error: str | None
    cpu_seconds: float  # resources the trial held x its running time
    gpu_seconds: float
    wall_seconds: float
    startup_seconds: float | None = None  # trial start -> first training step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SweepResult:
    """A finished sweep: every trial, the best (never an errored one) and the compute it took."""

    family: str
    monitor: str
    mode: str
    experiment_path: str
    parent_run_id: str | None
    trials: list[TrialRecord]
    best: TrialRecord | None
    wall_seconds: float
    completed: int
    early_stopped: int
    errored: int
    cpu_seconds: float
    gpu_seconds: float
    epochs_run: int
    epochs_budget: int  # num_samples * max_epochs: what running every trial to the end would cost

    @property
    def asha_savings(self) -> float:
        """Share of the epoch budget that early stopping (and errors) did not spend."""
        return 1.0 - self.epochs_run / self.epochs_budget if self.epochs_budget else 0.0

    def to_metrics(self) -> dict[str, Any]:
        """The metrics file of the sweep stage (plain JSON)."""
        best = self.best
        return {"family": self.family, "monitor": self.monitor, "trials": len(self.trials),
                "completed": self.completed, "early_stopped": self.early_stopped, "errored": self.errored,
                "best_metric": best.metric if best else None, "best_config": best.config if best else None,
                "best_trial_id": best.trial_id if best else None, "best_run_id": best.run_id if best else None,
                "wall_seconds": round(self.wall_seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3),
                "gpu_seconds": round(self.gpu_seconds, 3), "epochs_run": self.epochs_run,
                "epochs_budget": self.epochs_budget, "asha_savings": round(self.asha_savings, 4),
                "parent_run_id": self.parent_run_id, "experiment_path": self.experiment_path}


def best_trial(trials: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The trial with the best finite metric that did not error (ties: the earlier trial id)."""
    ok = [t for t in trials if t.status != "errored" and t.metric is not None and math.isfinite(t.metric)]
    if not ok:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(ok, key=lambda t: (sign * t.metric, t.trial_id))


def summarise(family: str, monitor: str, mode: str, trials: list[TrialRecord], *, experiment_path: str,
              parent_run_id: str | None, wall_seconds: float, epochs_budget: int) -> SweepResult:
    """Counts, compute totals and the best trial of a list of trial records."""
    count = {s: sum(t.status == s for t in trials) for s in STATUSES}
    return SweepResult(family, monitor, mode, experiment_path, parent_run_id, trials, best_trial(trials, mode),
                       wall_seconds, count["completed"], count["early_stopped"], count["errored"],
                       sum(t.cpu_seconds for t in trials), sum(t.gpu_seconds for t in trials),
                       sum(t.epochs for t in trials), epochs_budget)


def metric_figure(result: SweepResult, space: dict[str, dict]) -> Any:
    """One panel per hyperparameter: each scored trial's best metric against its value.

    loguniform keys get a log x-axis; one_minus_loguniform keys plot 1 - value on a log axis (the scale
    they were drawn on); choice keys are categories. Errored trials have no metric and are left out.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    keys = list(space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    scored = [t for t in result.trials if t.metric is not None]
    for ax, key in zip(axes[0], keys, strict=True):
        kind, args = next(iter(space[key].items()))
        for status, marker in (("completed", "o"), ("early_stopped", "x")):
            pts = [(t.config.get(key), t.metric) for t in scored if t.status == status]
            xs = [_x(kind, args, x) for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], marker=marker, label=status.replace("_", " "))
        if kind in LOG_DOMAINS:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap within a decade
        if kind == "choice":
            ax.set_xticks(range(len(args)), [str(a) for a in args])
            ax.set_xlim(-0.5, len(args) - 0.5)
        else:  # the whole searched range, so clustering is visible
            low, high = args
            pad = 0.0 if kind in LOG_DOMAINS else 0.03 * (high - low)
            ax.set_xlim(low - pad, high + pad)
        ax.set_xlabel(f"1 - {key}" if kind == "one_minus_loguniform" else key)
        ax.set_ylabel(f"best {result.monitor}")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{result.family} sweep: {result.monitor} ({result.mode}) against each hyperparameter")
    fig.tight_layout()
    return fig


def _x(kind: str, args: Any, value: Any) -> Any:
    """Where a value sits on its panel's x-axis."""
    if kind == "one_minus_loguniform":
        return 1.0 - value
    if kind == "choice":
        return args.index(value) if value in args else -1
    return value
