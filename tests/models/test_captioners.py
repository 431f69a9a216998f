"""Captioners: shapes, step-by-step decoding == teacher forcing, state selection, overfitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.attention import SCORES
from pipeline.models.captioners import (
    ARCHS,
    ShowAttendTell,
    ShowTell,
    TransformerCaptioner,
    build_captioner,
)
from pipeline.tokens import END_ID, PAD_ID, START_ID

V = 13


def images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (n, 3, size, size)."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def tokens(n: int = 3, t: int = 6, seed: int = 0) -> torch.Tensor:
    """Teacher-forcing inputs (n, t): <start> then random words (ids 3..V-1)."""
    words = torch.randint(3, V, (n, t - 1), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((n, 1), START_ID), words], dim=1)


def make(tiny_params, arch: str, **update):
    """A tiny captioner of `arch` from the real params (TINY sizes), small_cnn encoder."""
    p = tiny_params.models.captioner.model_copy(update={"arch": arch, "encoder": "small_cnn", **update})
    torch.manual_seed(0)
    return build_captioner(p, V)


def stepwise(model, memory, inputs):
    """Feed inputs one token at a time: log-probs (B, T, V) and attention (B, T, N) or None."""
    state = model.init_state(memory, inputs.size(0))
    logps, alphas = [], []
    for t in range(inputs.size(1)):
        logp, state, alpha = model.step(memory, state, inputs[:, t])
        logps.append(logp)
        alphas.append(alpha)
    return torch.stack(logps, 1), (None if alphas[0] is None else torch.stack(alphas, 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes(tiny_params, arch):
    model = make(tiny_params, arch)
    memory = model.encode(images(3, 32))
    assert memory.size(0) == 3
    logits, aux = model(memory, tokens(3, 6))
    assert logits.shape == (3, 6, V)
    if arch == "show_attend_tell":
        alphas = aux["alphas"]
        assert alphas.shape == (3, 6, 4)  # small_cnn: 32 px -> 2 x 2 regions
        torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 6))
    else:
        assert aux == {}


@pytest.mark.parametrize("score", SCORES)
def test_show_attend_tell_each_score(tiny_params, score):
    model = make(tiny_params, "show_attend_tell", attention=score)
    logits, aux = model(model.encode(images(2, 64)), tokens(2, 4))
    assert logits.shape == (2, 4, V) and aux["alphas"].shape == (2, 4, 16)
    penalty = model.doubly_stochastic_penalty(aux["alphas"], torch.ones(2, 4, dtype=torch.bool))
    assert penalty.ndim == 0 and penalty.item() >= 0


@pytest.mark.parametrize("arch", ARCHS)
def test_step_reproduces_teacher_forcing(tiny_params, arch):
    model = make(tiny_params, arch, dropout=0.3).eval()  # eval: dropout must not matter
    with torch.no_grad():
        memory = model.encode(images(3, 32))
        inputs = tokens(3, 7)
        logits, aux = model(memory, inputs)
        logp, alphas = stepwise(model, memory, inputs)
    torch.testing.assert_close(logp, F.log_softmax(logits, -1), atol=1e-5, rtol=1e-5)
    if arch == "show_attend_tell":
        torch.testing.assert_close(alphas, aux["alphas"], atol=1e-6, rtol=1e-5)
    else:
        assert alphas is None


@pytest.mark.parametrize("arch", ARCHS)
def test_select_reorders_and_expands_state(tiny_params, arch):
    model = make(tiny_params, arch).eval()
    with torch.no_grad():
        memory = model.encode(images(2, 32))
        first = torch.full((2,), START_ID)
        _, state, _ = model.step(memory, model.init_state(memory, 2), first)
        words = torch.tensor([5, 9])
        logp, _, _ = model.step(memory, state, words)
        for index in (torch.tensor([1, 0]), torch.tensor([1, 1, 0])):
            picked, _, _ = model.step(memory.index_select(0, index), model.select(state, index),
                                      words.index_select(0, index))
            torch.testing.assert_close(picked, logp.index_select(0, index), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(logp[0], logp[1])  # the two items differ, so a mix-up would show


def shapes_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 distinct generated 32 px images (one coloured square each) and 5-token captions."""
    imgs = torch.full((4, 3, 32, 32), 20, dtype=torch.uint8)
    for i, (colour, (y, x)) in enumerate(zip(
            [(250, 30, 30), (30, 250, 30), (30, 30, 250), (250, 250, 30)],
            [(2, 2), (2, 16), (16, 2), (16, 16)], strict=True)):
        imgs[i, :, y:y + 14, x:x + 14] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    captions = torch.tensor([[START_ID, 4, 5, 6, END_ID], [START_ID, 4, 7, 8, END_ID],
                             [START_ID, 9, 5, 10, END_ID], [START_ID, 9, 7, 11, END_ID]])
    return imgs, captions


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_one_batch(tiny_params, arch):
    model = make(tiny_params, arch, dropout=0.0)
    imgs, seq = shapes_batch()
    inputs, targets = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        logits, _ = model(model.encode(imgs), inputs)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        memory = model.encode(imgs)
        logits, _ = model(memory, inputs)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        assert loss.item() < 0.05
        state, tok, out = model.init_state(memory, 4), torch.full((4,), START_ID), []
        for _ in range(4):  # greedy decoding through step() recovers every caption
            logp, state, _ = model.step(memory, state, tok)
            tok = logp.argmax(-1)
            out.append(tok)
    assert torch.equal(torch.stack(out, 1), targets)


def test_parameter_groups_split_encoder_and_decoder(tiny_params):
    model = make(tiny_params, "show_attend_tell")
    enc, dec = model.encoder_parameters(), model.decoder_parameters()
    assert {id(p) for p in enc} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in enc}.isdisjoint(id(p) for p in dec)
    assert len(enc) + len(dec) == len(list(model.parameters()))
    frozen = make(tiny_params, "show_tell", freeze_encoder=True, finetune_blocks=1)
    assert {id(p) for p in frozen.encoder_parameters()} == \
        {id(p) for p in frozen.encoder.blocks[3].parameters()}


def test_pretrained_embeddings(tiny_params):
    e = tiny_params.models.captioner.embed_size
    vectors = np.random.default_rng(0).normal(size=(V, e)).astype(np.float32)
    update = {"encoder": "small_cnn", "pretrained_embeddings": True}
    p = tiny_params.models.captioner.model_copy(update=update)
    model = build_captioner(p, V, vectors)
    torch.testing.assert_close(model.embed.weight[1:], torch.from_numpy(vectors[1:]))
    assert model.embed.padding_idx == PAD_ID and not model.embed.weight[PAD_ID].any()
    with pytest.raises(ValueError, match=rf"expected shape \({V}, {e}\)"):
        build_captioner(p, V, vectors[:, :-1])
    with pytest.raises(ValueError, match="no embedding matrix"):
        build_captioner(p, V, None)
    with pytest.raises(ValueError, match="pretrained_embeddings is false"):
        build_captioner(tiny_params.models.captioner.model_copy(update={"encoder": "small_cnn"}), V, vectors)


def test_factory_builds_each_arch(tiny_params):
    kinds = {"show_tell": ShowTell, "show_attend_tell": ShowAttendTell, "transformer": TransformerCaptioner}
    for arch, cls in kinds.items():
        model = make(tiny_params, arch)
        assert type(model) is cls and model.vocab_size == V
    transformer = make(tiny_params, "transformer")
    assert transformer.d_model == tiny_params.models.captioner.hidden_size
    assert len(transformer.decoder.layers) == tiny_params.models.captioner.layers


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_attention_keys_are_computed_once_per_search(tiny_params, score):
    from pipeline.decoding import beam_search

    model = make(tiny_params, "show_attend_tell", attention=score)
    keys, steps = [], []
    model.attention.key.register_forward_hook(lambda *_: keys.append(1))
    model.cell.register_forward_hook(lambda *_: steps.append(1))
    beam_search(model, model.encode(images(2, 32)), 2, beam_size=3, max_len=6)
    assert len(steps) > 1 and len(keys) == 1  # once in init_state, not at every step


def test_show_attend_tell_skips_padding_without_changing_real_positions(tiny_params):
    model = make(tiny_params, "show_attend_tell").eval()
    memory = model.encode(images(3, 32))
    inputs = tokens(3, 7)
    lengths = [4, 7, 2]  # real inputs per row; the rest is <pad>
    for row, n in enumerate(lengths):
        inputs[row, n:] = PAD_ID
    logits, aux = model(memory, inputs)
    for row, n in enumerate(lengths):
        alone, alone_aux = model(memory[row: row + 1], inputs[row: row + 1, :n])  # no padding at all
        torch.testing.assert_close(logits[row, :n], alone[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(aux["alphas"][row, :n], alone_aux["alphas"][0], atol=1e-6, rtol=1e-5)
        assert not logits[row, n:].any() and not aux["alphas"][row, n:].any()
