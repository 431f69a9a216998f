"""Soft attention scores, the doubly stochastic penalty and the position codes."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.attention import (
    SCORES,
    SoftAttention,
    doubly_stochastic_penalty,
    sinusoid_1d,
    sinusoid_2d,
)

B, N, FEAT, HID, ATT = 3, 5, 12, 8, 6


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, N, F) and a query (B, H)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, FEAT, generator=g), torch.randn(B, HID, generator=g)


@pytest.mark.parametrize("score", SCORES)
def test_shapes_weights_sum_to_one_and_context_is_weighted_mean(score):
    torch.manual_seed(0)
    att = SoftAttention(score, FEAT, HID, ATT)
    feats, hidden = inputs()
    context, alpha = att(feats, hidden)
    assert context.shape == (B, FEAT) and alpha.shape == (B, N)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B))
    torch.testing.assert_close(context, (alpha.unsqueeze(-1) * feats).sum(1))


@pytest.mark.parametrize("score", SCORES)
def test_weights_depend_on_the_query_and_precomputed_keys_agree(score):
    torch.manual_seed(0)
    att = SoftAttention(score, FEAT, HID, ATT)
    feats, hidden = inputs()
    _, alpha = att(feats, hidden)
    _, other = att(feats, inputs(seed=1)[1])
    assert not torch.allclose(alpha, other)
    _, cached = att(feats, hidden, keys=att.keys(feats))
    torch.testing.assert_close(cached, alpha)


def test_scores_follow_their_formulas():
    torch.manual_seed(0)
    feats, hidden = inputs()
    add = SoftAttention("additive", FEAT, HID, ATT)
    w_f, b_f, w_h, v = add.key.weight, add.key.bias, add.query.weight, add.v.weight
    expected = (torch.tanh(feats @ w_f.T + b_f + (hidden @ w_h.T).unsqueeze(1)) @ v.T).squeeze(-1)
    torch.testing.assert_close(add.scores(add.keys(feats), hidden), expected)

    gen = SoftAttention("general", FEAT, HID, ATT)
    expected = torch.einsum("bnf,fh,bh->bn", feats, gen.query.weight, hidden)
    torch.testing.assert_close(gen.scores(gen.keys(feats), hidden), expected)

    dot = SoftAttention("dot", FEAT, HID, ATT)  # sizes differ: features are projected to H
    expected = torch.einsum("bnf,hf,bh->bn", feats, dot.key.weight, hidden)
    torch.testing.assert_close(dot.scores(dot.keys(feats), hidden), expected)
    same = SoftAttention("dot", HID, HID, ATT)  # same size: a plain dot product, no parameters
    assert not list(same.parameters())
    f = torch.randn(B, N, HID)
    torch.testing.assert_close(same.scores(same.keys(f), hidden), torch.einsum("bnh,bh->bn", f, hidden))


def test_unknown_score_is_rejected():
    with pytest.raises(ValueError, match="additive, dot, general"):
        SoftAttention("cosine", FEAT, HID, ATT)


def test_doubly_stochastic_penalty_counts_only_real_steps():
    alphas = torch.full((2, 2, 2), 0.5)  # (B, T, N): uniform over 2 regions at 2 steps
    full = torch.ones(2, 2, dtype=torch.bool)
    assert doubly_stochastic_penalty(alphas, full).item() == pytest.approx(0.0)  # every region its share
    focused = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # region 0 twice, region 1 never: shares 2 and 0
    assert doubly_stochastic_penalty(focused, torch.ones(1, 2)).item() == pytest.approx((1.0 + 1.0) / 2)
    half = torch.tensor([[True, False], [False, False]])  # item 0: one real step (even); item 1: none
    skewed = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    assert doubly_stochastic_penalty(skewed, half).item() == pytest.approx(0.0)  # padded steps never count


def test_doubly_stochastic_penalty_reads_the_same_at_any_resolution():
    # attention on a quarter of the grid for a whole caption, at 2x2, 7x7-ish (8x8) and 16x16 regions
    values = []
    for side in (2, 8, 16):
        n = side * side
        alphas = torch.zeros(1, 12, n)
        alphas[..., : n // 4] = 4.0 / n  # (1, T, N): even over the first quarter
        values.append(doubly_stochastic_penalty(alphas, torch.ones(1, 12)).item())
    assert values == pytest.approx([3.0] * 3)  # shares 4 on a quarter, 0 elsewhere: (9 + 3 * 1) / 4
    even = torch.full((1, 12, 49), 1 / 49)
    assert doubly_stochastic_penalty(even, torch.ones(1, 12)).item() == pytest.approx(0.0, abs=1e-10)


def test_position_codes():
    codes = sinusoid_1d(7, 9)
    assert codes.shape == (7, 9)
    torch.testing.assert_close(codes[0, 0::2], torch.zeros(5))  # sin(0)
    torch.testing.assert_close(codes[0, 1::2], torch.ones(4))  # cos(0)
    grid = sinusoid_2d(3, 4, 10)
    assert grid.shape == (12, 10)
    assert len({tuple(row.tolist()) for row in grid}) == 12  # every region has its own code
    torch.testing.assert_close(grid[0, :5], grid[3, :5])  # same row -> same row half
    torch.testing.assert_close(grid[1, 5:], grid[5, 5:])  # same column -> same column half
