"""The benchmark suite's plumbing: a --quick run writes the results schema; FLOP counts; the recipe children.

No timing is asserted: the figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.coco_quality import member_params, split_params
from bench.common import Figure, merge_results, time_runs
from bench.flops import counted_flops, lm_flops_per_token, matmul_weights
from bench.recipes import RECIPES, _figures, child
from pipeline.models.language_models import RNNLanguageModel, TransformerLanguageModel
from pipeline.training.modules import sequence_loss
from tests.conftest import ROOT, tiny_corpus


def test_quick_run_of_one_case_writes_the_results_json_and_table(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "prepare", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert results["schema"] == 1 and results["command"].startswith("python -m bench prepare --quick")
    assert {"cpu_model", "cpu_cores", "gpu", "torch", "load_average_1m"} <= set(results["machine"])
    record = results["cases"]["prepare"]
    assert record["status"] == "ok" and record["quick"] is True
    names = [f["name"] for f in record["figures"]]
    assert "S=256: 1 process" in names and any("speed-up" in n for n in names)
    for f in record["figures"]:
        assert set(f) == {"name", "value", "unit", "spread", "target", "ok", "note"}
        assert isinstance(f["value"], float) and f["value"] >= 0 and f["unit"]
        assert (f["target"] is None) == (f["ok"] is None)
    assert "| prepare | S=256: 1 process |" in path.with_suffix(".md").read_text()
    assert "prepare" in done.stdout  # the printed table


def test_a_rerun_replaces_only_its_own_cases() -> None:
    old = {"schema": 1, "cases": {"a": {"status": "ok", "v": 1}, "b": {"status": "ok", "v": 2}}}
    new = {"schema": 1, "date": "now", "cases": {"b": {"status": "ok", "v": 3}}}
    assert merge_results(old, new)["cases"] == {"a": {"status": "ok", "v": 1}, "b": {"status": "ok", "v": 3}}
    assert merge_results({**old, "schema": 0}, new)["cases"] == new["cases"]  # another schema is dropped


def test_warm_up_runs_are_not_timed_and_targets_are_checked() -> None:
    calls = []
    timing = time_runs(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing.seconds) == 3
    assert Figure.check("x", 2.0, "s", "<=", 1.0).ok is False
    assert Figure.check("x", 2.0, "1/s", ">=", 1.0).ok is True


def test_transformer_flops_match_torchs_counter() -> None:
    model = TransformerLanguageModel(50, 32, 2, 2, 64, 0.0, 16)
    x = torch.randint(0, 50, (3, 16))
    counted = counted_flops(model, lambda m: sequence_loss(m(None, x)[0], x))
    analytic = lm_flops_per_token(model, 16) * x.numel()
    attention = 12 * 2 * 32 * 16 * x.numel()
    # the counter sees every matmul; whether it counts the attention kernel depends on the build
    assert min(abs(counted - analytic), abs(counted - (analytic - attention))) < 1e-6 * analytic


def test_lstm_flops_count_every_gate_matrix_and_a_tied_head() -> None:
    v, e, h = 40, 16, 24
    model = RNNLanguageModel(v, e, h, layers=2, dropout=0.0)
    forward = 2 * 4 * h * (e + h) + 2 * 4 * h * (h + h) + 2 * h * v  # per token: both layers' gates, the head
    assert lm_flops_per_token(model, 8) == 3 * forward
    tied = RNNLanguageModel(v, h, h, layers=1, dropout=0.0, tie_weights=True)
    assert matmul_weights(tied) == 4 * h * (h + h) + v * h  # the shared embedding counted once, as the head
    x = torch.randint(0, v, (2, 5))
    assert counted_flops(tied, lambda m: sequence_loss(m(None, x)[0], x)) == pytest.approx(
        lm_flops_per_token(tied, 5) * x.numel())  # the opaque LSTM call is added by the hook


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_children_train_and_report_finite_losses(name, tmp_path: Path, capsys) -> None:
    small = {"layers": 1, "d_model": 16, "heads": 2, "ff_size": 32, "context": 16, "hidden": 16, "bptt": 16,
             "batch": 4, "max_steps": 6, "eval_every": 3, "warmup": 2, "compile": False, "target": 0.0}
    cfg = {**RECIPES[name], **{k: v for k, v in small.items() if k in RECIPES[name]}}
    child(name, tiny_corpus(tmp_path, 4000), cfg)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and records[-1]["event"] == "done"
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in evals)
    [figure] = _figures(name, cfg, records[0]["wall"], records)
    assert figure.value is None and figure.ok is False and "not reached" in figure.note  # target 0 never met


def test_coco_quality_ensemble_members_differ_from_the_first_model_only_in_seed_and_models_folder(tmp_path):
    first = split_params(tmp_path, 2, {})
    members = [member_params(first, i) for i in (1, 2)]
    assert [m.seed for m in members] == [first.seed + 100, first.seed + 200]
    assert [m.paths.models for m in members] == [str(tmp_path / "split-2" / f"models-member-{i}") for i in (1, 2)]
    for member in members:  # the same prepared split, vocabulary, features and recipe
        same = {**member.to_dict(), "seed": first.seed}
        same["paths"] = {**same["paths"], "models": first.paths.models}
        assert same == first.to_dict()
