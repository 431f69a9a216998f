"""Captioner ensembles: the members' mean probability at every step, through the decoders unchanged."""

from __future__ import annotations

import pytest
import torch

from pipeline.decoding import NEVER_GENERATED, beam_search, greedy
from pipeline.models.captioners import ARCHS
from pipeline.models.ensemble import CaptionerEnsemble
from pipeline.tokens import END_ID, START_ID
from tests.models.test_captioners import V, images, make, stepwise, tokens


def members(tiny_params, arch: str, n: int = 2) -> list[torch.nn.Module]:
    """n captioners of one arch with different decoder weights (seeds 0..n-1)."""
    out = []
    for seed in range(n):
        model = make(tiny_params, arch)
        torch.manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if not name.startswith("encoder."):
                torch.nn.init.normal_(param, std=0.3)  # members that disagree, so averaging shows
        out.append(model.eval())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_step_is_the_log_of_the_members_mean_probability(tiny_params, arch):
    models = members(tiny_params, arch)
    ensemble = CaptionerEnsemble(models).eval()
    pics, inputs = images(3, 32), tokens(3, 5)
    with torch.no_grad():
        mixed, alphas = stepwise(ensemble, ensemble.encode(pics), inputs)  # (B, T, V)
        each = [stepwise(m, m.encode(pics), inputs) for m in models]
    expected = torch.log(sum(lp.exp() for lp, _ in each) / len(models))
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(each[0][0], each[1][0], atol=1e-3)  # the members do differ
    if arch == "show_attend_tell":
        torch.testing.assert_close(alphas, (each[0][1] + each[1][1]) / 2)
    else:
        assert alphas is None


def test_an_ensemble_of_one_decodes_as_its_member(tiny_params):
    (model,) = members(tiny_params, "show_attend_tell", 1)
    ensemble = CaptionerEnsemble([model])
    pics = images(4, 32, seed=3)
    alone = beam_search(model, model.encode(pics), 4, 3, 7, no_repeat_ngram=3)
    together = beam_search(ensemble, ensemble.encode(pics), 4, 3, 7, no_repeat_ngram=3)
    assert together.tokens == alone.tokens
    assert together.scores == pytest.approx(alone.scores, abs=1e-5)


def test_members_sharing_a_frozen_encoder_run_it_once(tiny_params):
    models = members(tiny_params, "show_attend_tell", 3)
    for m in models[1:]:
        m.encoder.load_state_dict(models[0].encoder.state_dict())
    copies = [m.encoder for m in models]
    ensemble = CaptionerEnsemble(models)
    assert ensemble.shared_encoder and all(m.encoder is copies[0] for m in models)  # one copy kept in memory
    calls = []
    for encoder in copies:
        encoder.register_forward_hook(lambda *_: calls.append(1))
    memory = ensemble.encode(images(2, 32))
    assert len(calls) == 1 and memory.shape[:2] == (2, 3)
    others = members(tiny_params, "show_attend_tell", 3)
    next(others[2].encoder.parameters()).data.add_(1.0)  # one member's own encoder: each encodes for itself
    own = [m.encoder for m in others]
    assert not CaptionerEnsemble(others).shared_encoder and [m.encoder for m in others] == own


def test_select_keeps_each_member_on_its_rows(tiny_params):
    ensemble = CaptionerEnsemble(members(tiny_params, "transformer"))
    with torch.no_grad():
        memory = ensemble.encode(images(2, 32))
        _, state, _ = ensemble.step(memory, ensemble.init_state(memory, 2), torch.full((2,), START_ID))
        words = torch.tensor([5, 9])
        logp, _, _ = ensemble.step(memory, state, words)
        index = torch.tensor([1, 1, 0])
        picked, _, _ = ensemble.step(memory.index_select(0, index), ensemble.select(state, index),
                                     words.index_select(0, index))
    torch.testing.assert_close(picked, logp.index_select(0, index), atol=1e-6, rtol=1e-5)


def test_greedy_decoding_of_an_ensemble_picks_the_word_of_highest_mean_probability(tiny_params):
    models = members(tiny_params, "show_tell", 3)
    pics = images(4, 32, seed=5)
    with torch.no_grad():
        probs = [m.step(mem, m.init_state(mem, 4), torch.full((4,), START_ID))[0].exp()
                 for m, mem in ((m, m.encode(pics)) for m in models)]  # each (B, V)
    ensemble = CaptionerEnsemble(models).eval()
    first_word = [t[0] if t else END_ID for t in greedy(ensemble, ensemble.encode(pics), 4, 3).tokens]
    mean = torch.stack(probs).mean(0)
    mean[:, list(NEVER_GENERATED)] = 0  # greedy never emits <pad>, <start> or <unk>
    assert first_word == mean.argmax(-1).tolist()
    each = [p.clone() for p in probs]
    for p in each:
        p[:, list(NEVER_GENERATED)] = 0
    assert any(p.argmax(-1).tolist() != first_word for p in each)  # the mean is not just one member's choice


def test_members_must_share_vocabulary_and_memory_shape(tiny_params):
    small = make(tiny_params, "show_tell")
    other = make(tiny_params, "show_tell")
    other.vocab_size = V + 1
    with pytest.raises(ValueError, match="one vocabulary: vocabulary sizes"):
        CaptionerEnsemble([small, other])
    mixed = CaptionerEnsemble([make(tiny_params, "show_tell"), make(tiny_params, "show_attend_tell")])
    with pytest.raises(ValueError, match="share arch and sizes"):
        mixed.encode(images(1, 32))
    with pytest.raises(ValueError, match="at least one"):
        CaptionerEnsemble([])
