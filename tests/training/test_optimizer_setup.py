"""How the LightningModules set their optimizer up: weight decay on weight matrices only (biases, norm gains and
embedding tables, a tied head's included, are exempt), and transformer_lm's cosine ending at min_lr_fraction x lr."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.language_models import RNNLanguageModel
from pipeline.params import ParamsError, load_params
from pipeline.training.modules import (
    LanguageModelModule,
    exempt_from_weight_decay,
    floored_factor,
    split_weight_decay,
)
from pipeline.training.optim import build_optimizer, lr_factor
from tests.conftest import ROOT

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", *"abcdefg"]
MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.0.weight", "mlp.2.weight")  # per transformer block


def lm_module(params, family: str = "transformer_lm", **train) -> LanguageModelModule:
    section = getattr(params.train, family).model_copy(update=train).model_dump()
    return LanguageModelModule(family, getattr(params.models, family).model_dump(), section, VOCAB)


def names(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_the_transformer_decays_its_weight_matrices_and_nothing_else(tiny_params):
    module = lm_module(tiny_params, weight_decay=0.1)
    groups = module.optimizer_groups()
    assert [g.get("weight_decay") for g in groups] == [None, 0.0]  # None: train.transformer_lm.weight_decay
    decayed, exempt = (names(module, g["params"]) for g in groups)
    layers = tiny_params.models.transformer_lm.layers
    assert decayed == {f"model.blocks.{i}.{m}" for i in range(layers) for m in MATRICES}
    # the token table is the tied output head: exempt once, as one tensor
    assert {"model.embed.weight", "model.position.weight", "model.ln_f.weight"} <= exempt
    assert all(n.endswith((".bias", "ln1.weight", "ln2.weight")) for n in exempt - {
        "model.embed.weight", "model.position.weight", "model.ln_f.weight"})
    assert len(decayed) + len(exempt) == len(list(module.parameters()))  # every parameter, once


def test_an_adamw_step_shrinks_the_decayed_weights_only(tiny_params):
    module = lm_module(tiny_params, optimizer="adamw", lr=0.1, weight_decay=0.5)
    optimizer = build_optimizer(module.optimizer_groups(), module.train_cfg)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decoupled decay moves a weight
    optimizer.step()
    for n, p in module.named_parameters():
        factor = 1 - 0.1 * 0.5 if n.endswith(MATRICES) else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_without_weight_decay_the_groups_are_left_as_they_are(tiny_params):
    module = lm_module(tiny_params, "lstm_lm", weight_decay=0.0)
    groups = module.optimizer_groups()
    assert len(groups) == 1 and "weight_decay" not in groups[0]
    assert names(module, groups[0]["params"]) == {n for n, _ in module.named_parameters()}


def test_recurrent_weights_decay_but_embeddings_and_biases_do_not():
    model = RNNLanguageModel(11, 8, 8, 2, 0.0, "lstm", tie_weights=True)
    exempt = exempt_from_weight_decay(model)
    decayed = {n for n, p in model.named_parameters() if id(p) not in exempt}
    assert decayed == {f"rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in (0, 1)}


def test_a_split_group_keeps_its_own_learning_rate():
    conv, norm, head = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)
    encoder, decoder = [*conv.parameters(), *norm.parameters()], list(head.parameters())
    exempt = exempt_from_weight_decay(torch.nn.ModuleList([conv, norm, head]))
    groups = split_weight_decay([{"params": decoder}, {"params": encoder, "lr": 1e-5}], exempt)
    assert [(len(g["params"]), g.get("lr"), g.get("weight_decay")) for g in groups] == [
        (1, None, None), (1, None, 0.0), (1, 1e-5, None), (3, 1e-5, 0.0)]
    assert groups[0]["params"][0] is head.weight and groups[2]["params"][0] is conv.weight
    assert split_weight_decay([{"params": [head.bias]}], exempt) == [{"params": [head.bias], "weight_decay": 0.0}]


@pytest.mark.parametrize("family", ["lstm_lm", "transformer_lm"])
def test_the_configured_optimizer_uses_the_split_groups(tiny_params, family):
    module = lm_module(tiny_params, family, optimizer="adamw", weight_decay=0.01)
    optimizer = build_optimizer(module.optimizer_groups(), module.train_cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_the_cosine_ends_at_min_lr_fraction_after_an_unchanged_warmup(tiny_params):
    cfg = tiny_params.train.transformer_lm.model_copy(update={"schedule": "cosine", "warmup_fraction": 0.1,
                                                              "max_epochs": 2, "min_lr_fraction": 0.1})
    floored, plain = floored_factor(cfg, 50, 0.1), lr_factor(cfg, 50)  # 100 steps: 10 of warm-up, 90 of cosine
    assert [floored(s) for s in range(10)] == [plain(s) for s in range(10)] == pytest.approx(
        [(s + 1) / 10 for s in range(10)])
    assert floored(10) == pytest.approx(1.0) and floored(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert floored(100) == pytest.approx(0.1) and floored(1000) == pytest.approx(0.1)  # nanoGPT's min_lr = lr/10
    assert all(floored(s) >= floored(s + 1) for s in range(10, 100))


@pytest.mark.parametrize(("floor", "schedule", "last"), [(0.1, "cosine", 0.1), (0.0, "cosine", 0.0),
                                                          (0.1, "constant", 1.0)])
def test_the_module_schedules_with_its_floor(tiny_params, floor, schedule, last):
    module = lm_module(tiny_params, schedule=schedule, min_lr_fraction=floor, warmup_fraction=0.0, max_epochs=1)
    optimizer = build_optimizer(module.optimizer_groups(), module.train_cfg)
    scheduler = module.scheduler(optimizer, steps_per_epoch=10)["scheduler"]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([last * module.train_cfg.lr] * 2, abs=1e-12)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "low"])
def test_min_lr_fraction_outside_0_1_is_an_error_naming_the_key(bad):
    with pytest.raises(ParamsError, match=r"train\.transformer_lm\.min_lr_fraction: Input should be "):
        load_params(ROOT / "params.yaml", {"train.transformer_lm.min_lr_fraction": bad})
