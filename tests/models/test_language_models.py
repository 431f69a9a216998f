"""Language models: shapes, causality, step == forward, carried state, tying, overfitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.language_models import (
    RNNLanguageModel,
    TransformerLanguageModel,
    build_language_model,
    detach_state,
    sinusoidal_positions,
)

V = 11


def rnn(cell: str = "lstm", **kw) -> RNNLanguageModel:
    torch.manual_seed(0)
    args = dict(vocab_size=V, embed_size=8, hidden_size=12, layers=2, dropout=0.1, cell=cell)
    return RNNLanguageModel(**{**args, **kw}).eval()


def transformer(**kw) -> TransformerLanguageModel:
    torch.manual_seed(0)
    args = dict(vocab_size=V, d_model=16, layers=2, heads=2, ff_size=32, dropout=0.1, context=10)
    return TransformerLanguageModel(**{**args, **kw}).eval()


def tokens(b: int = 3, t: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


ALL = [lambda: rnn("lstm"), lambda: rnn("gru"), transformer]
IDS = ["lstm", "gru", "transformer"]


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_forward_shapes(make):
    logits, _ = make()(None, tokens(3, 7))
    assert logits.shape == (3, 7, V)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_state_shapes_and_select(cell):
    model = rnn(cell)
    state = model.init_state(None, 4)
    h = state[0] if cell == "lstm" else state
    assert h.shape == (2, 4, 12) and not h.any()
    _, state, _ = model.step(None, state, torch.tensor([1, 2, 3, 4]))
    picked = model.select(state, torch.tensor([3, 0]))
    first = (lambda s: s[0]) if cell == "lstm" else (lambda s: s)
    assert torch.equal(first(picked), first(state)[:, [3, 0]])


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_step_reproduces_forward(make):
    model, seq = make(), tokens(3, 9)
    expected = F.log_softmax(model(None, seq)[0], dim=-1)  # (B, T, V)
    state = model.init_state(None, 3)
    for t in range(seq.shape[1]):
        logp, state, att = model.step(None, state, seq[:, t])
        assert att is None
        torch.testing.assert_close(logp, expected[:, t], atol=1e-5, rtol=1e-5)


def test_transformer_step_slides_over_the_last_context_tokens():
    model, seq = transformer(context=4), tokens(2, 9)
    state = model.init_state(None, 2)
    for t in range(seq.shape[1]):
        logp, state, _ = model.step(None, state, seq[:, t])
    assert state.shape == (2, 4) and torch.equal(state, seq[:, -4:])
    window = F.log_softmax(model(None, seq[:, -4:])[0][:, -1], dim=-1)
    torch.testing.assert_close(logp, window, atol=1e-5, rtol=1e-5)


def test_transformer_is_causal_exactly():
    model, seq = transformer(), tokens(2, 10)
    changed = seq.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    a, b = model(None, seq)[0], model(None, changed)[0]
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_transformer_rejects_sequences_longer_than_the_context():
    with pytest.raises(ValueError, match="longer than the context"):
        transformer(context=10)(None, tokens(1, 11))


def test_memory_is_rejected():
    with pytest.raises(ValueError, match="no memory"):
        rnn()(torch.zeros(1, 3), tokens(1, 2))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_carried_state_equals_one_pass(cell):
    model, seq = rnn(cell), tokens(3, 10)
    whole, _ = model(None, seq)
    first, state = model(None, seq[:, :4])
    second, _ = model(None, seq[:, 4:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-6, rtol=1e-5)


def test_detach_state_cuts_the_graph():
    model = rnn("lstm").train()
    _, state = model(None, tokens(2, 3))
    assert all(s.requires_grad for s in state)
    assert not any(s.requires_grad for s in detach_state(state))
    assert detach_state(None) is None


def test_weight_tying_shares_the_tensor():
    tied = rnn(embed_size=12, hidden_size=12, tie_weights=True)
    assert tied.head.weight is tied.embed.weight
    assert rnn().head.weight is not rnn().embed.weight
    tf = transformer()
    assert tf.head.weight is tf.embed.weight
    with pytest.raises(ValueError, match="embed_size == hidden_size"):
        rnn(tie_weights=True)


def test_gpt2_initialisation_scales_residual_projections():
    tf = transformer(d_model=64, ff_size=128, layers=4, heads=4)
    resid = tf.blocks[0].attn.proj.weight.std().item()
    plain = tf.blocks[0].attn.qkv.weight.std().item()
    assert abs(plain - 0.02) < 0.002
    assert abs(resid - 0.02 / math.sqrt(8)) < 0.001
    assert not tf.blocks[0].mlp[0].bias.any()


@pytest.mark.parametrize("make", [
    lambda: rnn("lstm", dropout=0.0), lambda: rnn("gru", dropout=0.0),
    lambda: transformer(dropout=0.0)], ids=IDS)
def test_overfits_a_small_batch(make):
    model, seq = make().train(), tokens(4, 10, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        logits, _ = model(None, seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("make", [lambda e: rnn(embeddings=e), lambda e: transformer(embeddings=e)],
                         ids=["rnn", "transformer"])
def test_pretrained_embeddings_are_copied_and_shape_checked(make):
    dim = make(None).embed.weight.shape[1]
    vectors = np.arange(V * dim, dtype=np.float32).reshape(V, dim)
    assert np.array_equal(make(vectors).embed.weight.detach().numpy(), vectors)
    with pytest.raises(ValueError, match=r"expected shape \(11, "):
        make(vectors[:, :-1])


def test_build_language_model_from_params(tiny_params):
    sections = tiny_params.models
    lstm = build_language_model("lstm_lm", sections.lstm_lm, vocab_size=V)
    assert isinstance(lstm, RNNLanguageModel) and lstm.cell == sections.lstm_lm.cell
    tf = build_language_model("transformer_lm", sections.transformer_lm, vocab_size=V)
    assert isinstance(tf, TransformerLanguageModel) and tf.context == sections.transformer_lm.context
    with pytest.raises(ValueError, match="models.captioner: a CaptionerParams section builds no language model"):
        build_language_model("captioner", sections.captioner, vocab_size=V)  # the section's type decides
    with pytest.raises(ValueError, match="pretrained_embeddings is False"):
        build_language_model("lstm_lm", sections.lstm_lm, V, np.zeros((V, 16), np.float32))
    pretrained = sections.transformer_lm.model_copy(update={"pretrained_embeddings": True})
    with pytest.raises(ValueError, match="pretrained_embeddings is True"):
        build_language_model("transformer_lm", pretrained, vocab_size=V)


def first_block_input(model: TransformerLanguageModel, seq: torch.Tensor) -> torch.Tensor:
    """What the first transformer block receives for `seq`: token embedding plus positions (eval: no dropout)."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model(None, seq)
    handle.remove()
    return seen[0]


def test_learned_positions_are_a_trained_table_added_to_unscaled_token_embeddings():
    model, seq = transformer(positions="learned"), tokens(3, 7)
    table = model.position.weight
    assert table.shape == (10, 16) and table.requires_grad  # (context, d_model)
    assert 0.01 < table.std().item() < 0.03  # N(0, 0.02) like the token embedding (GPT-2)
    expected = model.embed(seq) + table[:7]  # no sqrt(d) scale, no sinusoids
    torch.testing.assert_close(first_block_input(model, seq), expected)
    model(None, seq)[0].sum().backward()
    assert table.grad is not None and table.grad[:7].abs().sum() > 0 and not table.grad[7:].any()
    assert "position.weight" in model.state_dict()  # part of every checkpoint


def test_sinusoidal_positions_scale_the_tokens_by_sqrt_d():
    model, seq = transformer(positions="sinusoidal"), tokens(3, 7)
    assert not hasattr(model, "position") and "sinusoids" not in model.state_dict()  # a fixed buffer
    expected = model.embed(seq) * math.sqrt(16) + sinusoidal_positions(10, 16)[:7]
    torch.testing.assert_close(first_block_input(model, seq), expected)


def test_learned_positions_are_the_default_and_unknown_schemes_are_rejected():
    assert transformer().positions == "learned"
    with pytest.raises(ValueError, match="positions: expected one of"):
        transformer(positions="rotary")


def test_bias_false_leaves_no_bias_in_any_layer():
    model = transformer(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    with_bias = transformer(bias=True)
    assert sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in model.parameters()) == (
        2 * (3 * 16 + 16 + 32 + 16 + 2 * 16) + 16)  # per block: qkv, proj, MLP in and out, 2 LayerNorms; ln_f


@pytest.mark.parametrize(("positions", "bias"), [("learned", False), ("sinusoidal", True)])
def test_build_language_model_passes_positions_and_bias(tiny_params, positions, bias):
    section = tiny_params.models.transformer_lm.model_copy(update={"positions": positions, "bias": bias})
    model = build_language_model("transformer_lm", section, vocab_size=V)
    assert model.positions == positions and (model.blocks[0].attn.qkv.bias is not None) == bias


@pytest.mark.parametrize(("key", "value", "expected"), [("positions", "rotary", "'learned' or 'sinusoidal'"),
                                                        ("bias", "yes", "a valid boolean")])
def test_bad_positions_or_bias_params_name_the_key(key, value, expected):
    from pipeline.params import ParamsError, load_params
    from tests.conftest import ROOT

    with pytest.raises(ParamsError, match=rf"models\.transformer_lm\.{key}: Input should be {expected}"):
        load_params(ROOT / "params.yaml", {f"models.transformer_lm.{key}": value})
