"""Callbacks: RNG state survives a weights_only checkpoint round trip and is restored on resume."""

import io
import random

import numpy as np
import torch

from pipeline.training.callbacks import RNGStateCallback


def draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_round_trip_through_a_weights_only_checkpoint():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    draw()  # advance a little from the seeds
    cb = RNGStateCallback()
    buffer = io.BytesIO()
    torch.save({"callbacks": {"rng": cb.state_dict()}}, buffer)
    expected = draw()
    draw()  # the process goes on and the generators move
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["callbacks"]["rng"]
    restored = RNGStateCallback()
    restored.load_state_dict(state)
    restored.on_train_batch_start(None, None, None, 0)  # applied at the first batch after a resume
    assert draw() == expected


def test_restore_happens_once():
    cb = RNGStateCallback()
    cb.load_state_dict(cb.state_dict())
    cb.on_train_batch_start(None, None, None, 0)
    first = torch.rand(1)
    cb.on_train_batch_start(None, None, None, 1)  # later batches leave the generator alone
    assert not torch.equal(torch.rand(1), first)
