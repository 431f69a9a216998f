"""DDP inside sweep trials: each rank's share of the data, metrics reduced across ranks, one MLflow run per trial."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl

from pipeline import tracking
from pipeline.training import fit
from pipeline.training.checkpoints import load_module
from pipeline.training.datamodules import LanguageModelDataModule
from pipeline.training.datasets import EpochBatchSampler, EpochOrder, LazyArray, StreamBatches
from pipeline.tuning import run_sweep
from tests.conftest import ROOT
from tests.tuning.test_sweep import FAMILY, sweep_params, trial_params


def test_each_rank_gets_every_world_th_batch_and_the_same_number_of_steps() -> None:
    order = EpochOrder(50, seed=3, shuffle=True)
    full = EpochBatchSampler(order, 4).batches()  # 13 batches
    ranks = [EpochBatchSampler(order, 4, part=(r, 3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # the 13th batch is dropped: equal steps on every rank
    shares = [r.batches() for r in ranks]
    assert all(len(s) == 4 for s in shares)
    assert sorted(map(tuple, sum(shares, []))) == sorted(map(tuple, full[:12]))
    with pytest.raises(ValueError, match="part"):
        EpochBatchSampler(order, 4, part=(3, 3))


def _stream(tmp_path: Path, n: int = 1000) -> LazyArray:
    path = tmp_path / "stream.npy"
    np.save(path, np.arange(n, dtype=np.int32))
    return LazyArray(path)


def test_stream_rows_are_split_into_contiguous_blocks(tmp_path: Path) -> None:
    stream = _stream(tmp_path)
    full = StreamBatches(stream, rows=4, seq_len=10)
    halves = [StreamBatches(stream, rows=4, seq_len=10, part=(r, 2)) for r in range(2)]
    for k in (0, 5, len(full) - 1):
        joined = np.concatenate([h[k]["inputs"].numpy() for h in halves])  # (4, T): rank 0 rows, then rank 1
        assert (joined == full[k]["inputs"].numpy()).all()
    with pytest.raises(ValueError, match="equal share"):
        StreamBatches(stream, rows=3, seq_len=10, part=(0, 2))


@pytest.mark.parametrize("mode", ["stream", "windows"])
def test_sharded_evaluation_covers_every_token_once(tmp_path: Path, mode: str) -> None:
    for split in ("train", "val", "test"):
        np.save(tmp_path / f"text_{split}_char.npy", (np.arange(977) % 50).astype(np.int32))
    single = LanguageModelDataModule(tmp_path, "char", 4, 16, mode, seed=0, num_workers=0)

    def targets(dm: LanguageModelDataModule) -> np.ndarray:
        return np.concatenate([b["targets"].numpy().ravel() for b in dm.val_dataloader()])

    shards = []
    for rank in range(2):
        dm = LanguageModelDataModule(tmp_path, "char", 4, 16, mode, seed=0, num_workers=0)
        dm.shard(rank, 2)
        shards.append(targets(dm))
        # an epoch is shared too: each rank takes half the steps (a stream: half of twice the rows)
        assert len(dm.train_dataloader()) == len(single.train_dataloader()) // 2
    assert sorted(np.concatenate(shards)) == sorted(targets(single))


GATHER = textwrap.dedent("""
    import sys, torch.distributed as dist, torch.multiprocessing as mp
    from pipeline.training.modules import gather_dicts

    def run(rank, path):
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
        merged = gather_dicts({rank * 10 + i: f"hyp {rank}.{i}" for i in range(3)})
        assert merged == {r * 10 + i: f"hyp {r}.{i}" for r in range(2) for i in range(3)}, merged
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.start_processes(run, args=(sys.argv[1],), nprocs=2, start_method="fork")  # imports done once
        print("gathered")
""")


def test_validation_hypotheses_are_gathered_from_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(GATHER, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "pg")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "gathered" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_two_worker_ddp_trials_log_one_run_each_with_reduced_metrics(ray_with_dashboard, prepared_params,
                                                                     tmp_path):
    p = sweep_params(prepared_params, tmp_path, **{f"sweep.{FAMILY}.num_workers": 2,
                                                   f"sweep.{FAMILY}.cpus_per_worker": 1,
                                                   f"sweep.{FAMILY}.max_epochs": 1})
    result = run_sweep(p, FAMILY)

    assert result.completed == 2 and result.errored == 0
    children = tracking.child_runs(p.tracking.uri, p.tracking.experiment, result.parent_run_id)
    assert sorted(c["tags"]["ray.trial_id"] for c in children) == [t.trial_id for t in result.trials]
    for trial in result.trials:
        assert trial.cpu_seconds == pytest.approx(2 * trial.wall_seconds)  # two workers of one CPU each
        history = tracking.metric_history(p.tracking.uri, trial.run_id, "val/loss")
        assert len(history) == 1  # rank 0 logged, rank 1 did not
        assert history[0][1] == pytest.approx(trial.metric)
        # the reported loss is the whole validation stream's, not rank 0's half: validate it in one process
        tp = trial_params(p, trial.config)
        dm = fit.build_datamodule(tp, FAMILY, fit.vocabulary(tp, FAMILY))
        module = load_module(FAMILY, trial.checkpoint)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
        single = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
        assert trial.metric == pytest.approx(single, rel=1e-4)
