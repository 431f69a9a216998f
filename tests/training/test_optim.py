"""Optimisers and learning-rate schedules: the formulas, warm-up, parameter groups."""

import math

import pytest
import torch

from pipeline.params import load_params
from pipeline.training.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps
from tests.conftest import ROOT


def cfg(**overrides):
    keys = {f"train.lstm_lm.{k}": v for k, v in overrides.items()}
    return load_params(ROOT / "params.yaml", keys).train.lstm_lm


def test_inverse_time_decay():
    f = lr_factor(cfg(schedule="inverse_time", decay_rate=0.5, warmup_fraction=0.0), steps_per_epoch=10)
    assert [f(s) for s in (0, 10, 20, 40)] == pytest.approx([1.0, 1 / 1.5, 1 / 2.0, 1 / 3.0])


def test_exponential_decay():
    f = lr_factor(cfg(schedule="exponential", gamma=0.9, warmup_fraction=0.0), steps_per_epoch=10)
    assert [f(s) for s in (0, 10, 25)] == pytest.approx([1.0, 0.9, 0.9 ** 2.5])


def test_cosine_with_warmup():
    c = cfg(schedule="cosine", warmup_fraction=0.1, max_epochs=2)
    f = lr_factor(c, steps_per_epoch=50)  # 100 steps in all: 10 of warm-up, then 90 of cosine
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)  # half-way through the cosine
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_constant_schedule_is_flat_after_warmup():
    f = lr_factor(cfg(schedule="constant", warmup_fraction=0.2, max_epochs=2), steps_per_epoch=10)
    assert [f(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])  # 4 of the 20 steps


@pytest.mark.parametrize(("steps_per_epoch", "max_epochs", "warm"), [(53, 1, 3), (1000, 3, 150), (10, 1, 0)])
def test_warmup_is_a_fraction_of_the_run(steps_per_epoch, max_epochs, warm):
    # the old fixed 50 steps warmed a 53-step run up for 50 of its steps; 5% of it is 3 steps
    c = cfg(schedule="constant", warmup_fraction=0.05, max_epochs=max_epochs)
    assert warmup_steps(c, steps_per_epoch * max_epochs) == warm
    f = lr_factor(c, steps_per_epoch)
    assert f(warm) == 1.0 and (warm == 0 or f(warm - 2) < 1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_warmup_fraction_outside_0_1_is_an_error_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"train\.lstm_lm\.warmup_fraction"):
        cfg(warmup_fraction=bad)


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                           ("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop)])
def test_optimizers_and_their_settings(name, cls):
    c = cfg(optimizer=name, lr=0.01, momentum=0.8, beta1=0.85, beta2=0.95, weight_decay=0.1)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer([{"params": list(model.parameters())}], c)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.01
    group = opt.param_groups[0]
    if name in ("adam", "adamw"):
        assert group["betas"] == (0.85, 0.95) and group["weight_decay"] == 0.1
    else:
        assert group["momentum"] == 0.8


def test_groups_keep_their_own_lr_and_frozen_groups_are_dropped():
    a, b, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    opt = build_optimizer([{"params": list(a.parameters())}, {"params": list(b.parameters()), "lr": 1e-5},
                           {"params": list(frozen.parameters())}], cfg(optimizer="adam", lr=1e-3))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-5]


def test_scheduler_steps_the_learning_rate():
    c = cfg(optimizer="sgd", lr=1.0, schedule="exponential", gamma=0.5, warmup_fraction=0.0)
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer([{"params": list(model.parameters())}], c)
    sched = build_scheduler(opt, c, steps_per_epoch=1)
    assert sched["interval"] == "step"
    for _ in range(3):
        opt.step()
        sched["scheduler"].step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    assert math.isfinite(opt.param_groups[0]["lr"])
