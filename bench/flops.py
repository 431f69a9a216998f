"""Model FLOPs of one training step (forward + backward), for MFU.

Language models are counted analytically: 6 FLOPs per weight of every matrix a token is multiplied by
(2 forward, 4 backward: the input and the weight gradients), plus 12 * layers * d_model * context for the
attention scores and the weighted sums of a transformer (PaLM's convention: the full T x T product, though
causal kernels skip half). Biases, norms and activations are left out. Captioners, whose encoders and
attention do not reduce to "params x tokens", are counted by torch's FlopCounterMode on one CPU step of a
copy at batch 2; it does not see inside a whole-sequence nn.LSTM/nn.GRU (one opaque aten call), so those are
added by a forward hook with the same 6-per-weight rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.language_models import RNNLanguageModel, TransformerLanguageModel


def rnn_weights(rnn: nn.RNNBase) -> int:
    """Weights of the input and recurrent matrices of every layer (and direction)."""
    return sum(w.numel() for name, w in rnn.named_parameters() if name.startswith(("weight_ih", "weight_hh")))


def matmul_weights(model: nn.Module) -> int:
    """Weights of the matrices a token is multiplied by: Linear layers and RNN matrices, shared ones once.

    An embedding table is a lookup, not a product, so it only counts when tied to an output Linear.
    """
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            seen[id(module.weight)] = module.weight.numel()
        elif isinstance(module, nn.RNNBase):
            for name, w in module.named_parameters():
                if name.startswith(("weight_ih", "weight_hh")):
                    seen[id(w)] = w.numel()
    return sum(seen.values())


def lm_flops_per_token(model: nn.Module, context: int) -> float:
    """Training FLOPs per token of a language model: 6 x matmul weights (+ attention for a transformer)."""
    flops = 6.0 * matmul_weights(model)
    if isinstance(model, TransformerLanguageModel):
        flops += 12.0 * len(model.blocks) * model.d_model * context
    elif not isinstance(model, RNNLanguageModel):
        raise TypeError(f"lm_flops_per_token: expected a capline language model, got {type(model).__name__}")
    return flops


def counted_flops(model: nn.Module, step: Callable[[nn.Module], torch.Tensor]) -> float:
    """FLOPs of step(model) (returns the loss) plus its backward, counted on a CPU copy of the model."""
    cpu = copy.deepcopy(model).float().cpu()
    counter = FlopCounterMode(display=False)
    added, before = [0.0], {}

    def pre(module: nn.RNNBase, args: tuple) -> None:
        before[id(module)] = counter.get_total_flops()

    def post(module: nn.RNNBase, args: tuple, output: object) -> None:
        if counter.get_total_flops() > before[id(module)]:
            return  # this build decomposed the RNN into counted matmuls: nothing to add
        x = args[0]  # (B, T, E) batch-first or (T, B, E): B * T tokens either way
        tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        added[0] += 6.0 * rnn_weights(module) * tokens

    rnns = [m for m in cpu.modules() if isinstance(m, nn.RNNBase)]
    hooks = [h for m in rnns for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with counter:
            step(cpu).backward()
    finally:
        for h in hooks:
            h.remove()
    return counter.get_total_flops() + added[0]


def mfu(flops_per_second: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the device's bf16 peak (None when unknown)."""
    return None if not peak_tflops else flops_per_second / (peak_tflops * 1e12)
