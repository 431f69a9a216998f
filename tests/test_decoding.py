"""Decoding: greedy, sampling, batched beam search, sequence scores, error analysis, LM text, n-gram blocking."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.decoding import (
    beam_error_analysis,
    beam_search,
    generate_text,
    greedy,
    sample,
    sequence_logprob,
)
from pipeline.models.language_models import RNNLanguageModel, TransformerLanguageModel
from pipeline.tokens import END_ID, PAD_ID, START_ID, UNK_ID

V, N, D = 12, 5, 8
A, B = 4, 5  # the two ordinary words of the hand-built bigram models


class AttnDecoder(nn.Module):
    """Test-only captioner: memory (B, N, D) -> LSTMCell decoder with dot attention.

    <end> grows likelier with each step, from a memory-dependent start, so lengths vary.
    """

    def __init__(self):
        super().__init__()
        self.init_h, self.embed = nn.Linear(D, 16), nn.Embedding(V, 8)
        self.key, self.cell, self.out = nn.Linear(D, 16), nn.LSTMCell(8 + D, 16), nn.Linear(16, V)

    def init_state(self, memory, batch_size):
        h = torch.tanh(self.init_h(memory.mean(1)))  # (B, 16)
        return h, torch.zeros_like(h), -5.0 + 2 * memory.mean((1, 2))  # (B,) <end> logit shift

    def step(self, memory, state, tokens):
        h, c, shift = state
        att = torch.softmax(torch.einsum("bnk,bk->bn", self.key(memory), h), dim=-1)  # (B, N)
        ctx = torch.einsum("bn,bnd->bd", att, memory)
        h, c = self.cell(torch.cat([self.embed(tokens), ctx], dim=-1), (h, c))
        end = F.one_hot(torch.tensor(END_ID, device=h.device), V)  # (V,)
        logits = self.out(h) + end * shift[:, None]  # (B, V)
        return F.log_softmax(logits, dim=-1), (h, c, shift + 1.0), att

    def select(self, state, index):
        return tuple(s.index_select(0, index) for s in state)


class Bigram(nn.Module):
    """Hand-built model: the next-token log-probs depend only on the previous token."""

    def __init__(self, rows: dict[int, dict[int, float]], vocab: int = 6):
        super().__init__()
        table = torch.empty(vocab, vocab)
        for prev in range(vocab):
            given = rows.get(prev, {END_ID: 0.9})
            rest = (1.0 - sum(given.values())) / (vocab - len(given))
            table[prev] = torch.tensor([given.get(tok, rest) for tok in range(vocab)])
        self.register_buffer("logp", table.log())

    def init_state(self, memory, batch_size):
        return torch.zeros(batch_size, dtype=torch.long)

    def step(self, memory, state, tokens):
        return self.logp[tokens], tokens, None

    def select(self, state, index):
        return state.index_select(0, index)

    def score(self, words: list[int], alpha: float = 0.0) -> float:
        """log P(words, <end>) / T^alpha computed straight from the table."""
        seq = [START_ID, *words, END_ID]
        total = sum(self.logp[p, n].item() for p, n in zip(seq[:-1], seq[1:], strict=True))
        return total / (len(seq) - 1) ** alpha

    def brute_force(self, max_len: int, alpha: float) -> list[int]:
        """The best finished sequence of at most max_len tokens, by exhaustive enumeration."""
        words = [t for t in range(self.logp.shape[0]) if t != END_ID]
        every = (list(p) for n in range(max_len) for p in itertools.product(words, repeat=n))
        return max(every, key=lambda w: self.score(w, alpha))


LOOKAHEAD = {START_ID: {A: 0.5, B: 0.4}, A: {END_ID: 0.35, A: 0.2, B: 0.2}, B: {END_ID: 0.9}}
LENGTHS = {START_ID: {END_ID: 0.368, A: 0.55}, A: {B: 0.75}, B: {END_ID: 0.75}}


@pytest.fixture
def model():
    torch.manual_seed(1)  # a seed whose beam outputs differ from greedy and between items
    return AttnDecoder()


@pytest.fixture
def memory():
    return 3 * torch.randn(6, N, D, generator=torch.Generator().manual_seed(3))


def teacher_forced(model, memory, tokens: list[int]):
    """Step through <start> + tokens; (summed log-probs incl. <end>, attention (T, N))."""
    state, prev, total, atts = model.init_state(memory, 1), START_ID, 0.0, []
    with torch.no_grad():
        for tok in [*tokens, END_ID]:
            logp, state, att = model.step(memory, state, torch.tensor([prev]))
            total, prev = total + logp[0, tok].item(), tok
            atts.append(att[0])
    return total, torch.stack(atts[: len(tokens)]) if tokens else torch.zeros(0, N)


def test_greedy_equals_argmax_by_hand(model, memory):
    result = greedy(model, memory, 6, max_len=10)
    for i in range(6):
        state, tok, expected = model.init_state(memory[i : i + 1], 1), START_ID, []
        with torch.no_grad():
            for _ in range(10):
                logp, state, _ = model.step(memory[i : i + 1], state, torch.tensor([tok]))
                tok = int(logp.argmax())
                if tok == END_ID:
                    break
                expected.append(tok)
        assert result.tokens[i] == expected


def test_greedy_scores_and_attention_match_teacher_forcing(model, memory):
    result = greedy(model, memory, 6, max_len=10)
    for i, toks in enumerate(result.tokens):
        score, att = teacher_forced(model, memory[i : i + 1], toks)
        assert result.attention[i].shape == (len(toks), N)
        torch.testing.assert_close(result.attention[i], att)
        if len(toks) < 10:  # finished: the score includes <end>
            assert result.scores[i] == pytest.approx(score, abs=1e-5)


def test_beam_width_one_is_greedy(model, memory):
    for alpha in (0.0, 0.7, 2.0):
        assert beam_search(model, memory, 6, 1, 10, alpha).tokens == greedy(model, memory, 6, 10).tokens
    truncated = beam_search(model, memory, 6, 1, 3).tokens  # nothing finishes within 3 tokens
    assert truncated == greedy(model, memory, 6, 3).tokens and all(len(t) == 3 for t in truncated)
    torch.manual_seed(1)
    lm = TransformerLanguageModel(V, 16, 1, 2, 32, 0.0, context=8)
    assert beam_search(lm, None, 3, 1, 12).tokens == greedy(lm, None, 3, 12).tokens


def test_batched_beam_equals_item_by_item(model, memory):
    batched = beam_search(model, memory, 6, beam_size=3, max_len=10)
    assert len({tuple(t) for t in batched.tokens}) >= 3  # varied outputs
    for i in range(6):
        alone = beam_search(model, memory[i : i + 1], 1, beam_size=3, max_len=10)
        assert alone.tokens[0] == batched.tokens[i]
        assert alone.scores[0] == pytest.approx(batched.scores[i], abs=1e-5)
        torch.testing.assert_close(alone.attention[0], batched.attention[i])


def test_beam_scores_and_attention_follow_the_backpointers(model, memory):
    result = beam_search(model, memory, 6, beam_size=4, max_len=10, alpha=0.7)
    for i, toks in enumerate(result.tokens):
        score, att = teacher_forced(model, memory[i : i + 1], toks)
        torch.testing.assert_close(result.attention[i], att)
        if len(toks) < 10:
            assert result.scores[i] == pytest.approx(score / (len(toks) + 1) ** 0.7, abs=1e-5)


def test_n_best_lists_every_finished_hypothesis_best_first_with_its_teacher_forced_score(model, memory):
    result = beam_search(model, memory, 6, beam_size=4, max_len=12, alpha=0.7, n_best=True)
    assert beam_search(model, memory, 6, beam_size=4, max_len=12, alpha=0.7).candidates is None
    for i, candidates in enumerate(result.candidates):
        best = candidates[0]
        assert (best.tokens, best.score) == (result.tokens[i], result.scores[i])
        torch.testing.assert_close(best.attention, result.attention[i])
        assert [h.score for h in candidates] == sorted((h.score for h in candidates), reverse=True)
        assert len({tuple(h.tokens) for h in candidates}) == len(candidates) <= 4
        for h in candidates:
            if len(h.tokens) < 12:  # finished: scored with its <end>, like the beam
                score, att = teacher_forced(model, memory[i : i + 1], h.tokens)
                assert h.score == pytest.approx(score / (len(h.tokens) + 1) ** 0.7, abs=1e-5)
                torch.testing.assert_close(h.attention, att)
    assert max(len(c) for c in result.candidates) > 1
    cut = beam_search(model, memory, 6, beam_size=3, max_len=2, n_best=True)  # few finish within 2 tokens
    assert [c[0].tokens for c in cut.candidates] == cut.tokens
    for candidates in cut.candidates:
        finished = [h for h in candidates if len(h.tokens) < 2]
        assert candidates[: len(finished)] == finished  # finished first, then the live ones cut at max_len
        live = candidates[len(finished):]
        assert [h.score for h in live] == sorted((h.score for h in live), reverse=True)
    assert any(len(c) > 1 and len(c[-1].tokens) == 2 for c in cut.candidates)


def test_beam_finds_the_optimum_where_greedy_fails():
    bigram = Bigram(LOOKAHEAD)
    best = bigram.brute_force(max_len=4, alpha=0.0)
    assert greedy(bigram, None, 1, 4).tokens[0] != best
    result = beam_search(bigram, None, 1, beam_size=2, max_len=4, alpha=0.0)
    assert result.tokens[0] == best
    assert result.scores[0] == pytest.approx(bigram.score(best), abs=1e-6)
    assert result.attention is None


def test_finished_hypotheses_take_beam_slots():
    c = 6  # after <end> fills one of two slots, only A's best extension (A C) stays live
    bigram = Bigram({START_ID: {END_ID: 0.2, A: 0.6}, A: {c: 0.5, B: 0.45},
                     c: {END_ID: 0.1}, B: {END_ID: 0.95}}, vocab=7)
    assert bigram.brute_force(max_len=4, alpha=0.0) == [A, B]  # needs the pruned extension
    assert beam_search(bigram, None, 1, beam_size=2, max_len=4, alpha=0.0).tokens[0] == []
    assert beam_search(bigram, None, 1, beam_size=3, max_len=4, alpha=0.0).tokens[0] == [A, B]


def test_length_normalisation_changes_the_winner():
    bigram = Bigram(LENGTHS)
    winners = []
    for alpha in (0.0, 1.0):
        result = beam_search(bigram, None, 1, beam_size=3, max_len=5, alpha=alpha)
        assert result.tokens[0] == bigram.brute_force(max_len=5, alpha=alpha)
        winners.append(result.tokens[0])
    assert winners[0] != winners[1]


def test_sampling_limits_reach_greedy(model, memory):
    expected = greedy(model, memory, 6, 10).tokens
    gen = torch.Generator().manual_seed(0)
    assert sample(model, memory, 6, 10, temperature=1e-4, generator=gen).tokens == expected
    assert sample(model, memory, 6, 10, top_k=1, generator=gen).tokens == expected


def test_sampling_is_reproducible_with_a_seeded_generator(model, memory):
    runs = [sample(model, memory, 6, 10, generator=torch.Generator().manual_seed(s)).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_only_draws_among_the_k_most_likely():
    bigram = Bigram(LOOKAHEAD)
    result = sample(bigram, None, 200, 1, top_k=2, generator=torch.Generator().manual_seed(0))
    first = {toks[0] for toks in result.tokens}
    assert first == {A, B}


def test_sequence_logprob_sums_step_logprobs(model, memory):
    seq = torch.tensor([[START_ID, 4, 5, 6, END_ID], [START_ID, 7, END_ID, PAD_ID, PAD_ID],
                        [START_ID, END_ID, PAD_ID, PAD_ID, PAD_ID]])
    got = sequence_logprob(model, memory[:3], seq)
    for i in range(3):
        words = [t for t in seq[i, 1:].tolist() if t not in (END_ID, PAD_ID)]
        assert got[i].item() == pytest.approx(teacher_forced(model, memory[i : i + 1], words)[0], abs=1e-5)


def test_beam_error_analysis_blames_search_or_model():
    bigram = Bigram(LOOKAHEAD)
    output = greedy(bigram, None, 1, 4).tokens[0]  # [A]: beam 1 misses [B]
    refs = [[B], [A, A, A], [[A, A, A], [B]], output]
    report = beam_error_analysis(bigram, None, refs, [output] * 4, alpha=0.7)
    expected = sum(max(bigram.score(r, 0.7) for r in ([g] if isinstance(g[0], int) else g))
                   > bigram.score(output, 0.7) for g in refs)
    assert report["search_errors"] == expected == 2 and report["model_errors"] == 2
    assert report["search_error_fraction"] == pytest.approx(0.5)
    assert report["model_error_fraction"] == pytest.approx(0.5)


def test_beam_error_analysis_uses_the_length_normalised_objective():
    bigram = Bigram(LENGTHS)  # [] scores -1.0 raw; [A, B] -1.17 raw but -0.39 at alpha 1
    plain = beam_error_analysis(bigram, None, [[A, B]], [[]], alpha=0.0)
    normalised = beam_error_analysis(bigram, None, [[A, B]], [[]], alpha=1.0)
    assert plain["model_errors"] == 1 and normalised["search_errors"] == 1


@pytest.mark.parametrize("make", [
    lambda: RNNLanguageModel(V, 8, 12, 1, 0.0, "gru"),
    lambda: TransformerLanguageModel(V, 16, 1, 2, 32, 0.0, context=6)], ids=["gru", "transformer"])
def test_generate_text(make):
    torch.manual_seed(0)
    lm, prompt = make(), [5, 6, 7]
    seeded = [generate_text(lm, prompt, 15, 1.0, None, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert seeded[0] == seeded[1] and len(seeded[0]) == 15
    state, expected = lm.init_state(None, 1), []
    with torch.no_grad():
        for tok in prompt:
            logp, state, _ = lm.step(None, state, torch.tensor([tok]))
        for _ in range(15):
            expected.append(int(logp.argmax()))
            logp, state, _ = lm.step(None, state, torch.tensor(expected[-1:]))
    assert generate_text(lm, prompt, 15, 1.0, top_k=1) == expected
    with pytest.raises(ValueError, match="at least one token"):
        generate_text(lm, [], 5)


class PrefersSpecials(nn.Module):
    """A model whose favourite next tokens are <pad>, <start> and <unk> (as an untrained one may be)."""

    def init_state(self, memory, batch_size):
        return torch.zeros(batch_size)

    def step(self, memory, state, tokens):
        logits = torch.tensor([5.0, 4.0, 0.0, 3.0, 1.0, 2.0]).expand(len(state), 6)  # pad, start, end, unk, a, b
        return torch.log_softmax(logits, -1), state, None

    def select(self, state, index):
        return state[index]


def test_pad_start_and_unk_are_never_generated():
    model = PrefersSpecials()
    assert greedy(model, None, 2, 4).tokens == [[5, 5, 5, 5]] * 2  # b: the best of the rest
    assert all(t not in (0, 1, 3) for seq in beam_search(model, None, 2, 3, 4).tokens for t in seq)
    drawn = sample(model, None, 50, 4, generator=torch.Generator().manual_seed(0)).tokens
    assert {t for seq in drawn for t in seq} == {4, 5}  # <end> ends them
    new = generate_text(model, [4], 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert set(new) <= {2, 4, 5}  # in free text too (a char vocabulary's <unk> would print as "<unk>")


# ---- n-gram blocking ----------------------------------------------------------------------------------------
TABLE, WITH, DOT = 5, 6, 7  # with A: "a table with a table ."; 8 is a spare word


class Looper(nn.Module):
    """Test-only captioner that loops "a table with a table with ..." and would rather say <unk> than anything.

    Next-token logits depend on the previous token only; <end> is impossible before step `ends` and near
    certain from then on, so every caption has `ends` tokens and the loop is also beam search's best.
    """

    def __init__(self, ends: int = 9):
        super().__init__()
        logits = torch.zeros(9, 9)  # (previous token, next token)
        logits[:, UNK_ID] = 6.0
        for prev, nxt in {START_ID: A, A: TABLE, TABLE: WITH, WITH: A}.items():
            logits[prev, nxt] = 4.0
        logits[TABLE, DOT] = 2.0
        logits[DOT, END_ID] = 10.0
        self.register_buffer("logits", logits)
        self.ends = ends

    def init_state(self, memory, batch_size):
        return torch.zeros(batch_size, dtype=torch.long)  # (B,) steps taken

    def step(self, memory, state, tokens):
        end = F.one_hot(torch.tensor(END_ID), 9) * torch.where(state >= self.ends, 8.0, -30.0)[:, None]  # (B, V)
        return torch.log_softmax(self.logits[tokens] + end, dim=-1), state + 1, None

    def select(self, state, index):
        return state.index_select(0, index)


def repeats(tokens: list[int], n: int) -> bool:
    """Whether some n-gram occurs twice in tokens."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def banned(tokens: list[int], n: int) -> set[int]:
    """The rule from plain lists: tokens that would complete an n-gram already in `tokens` (n = 0: none)."""
    if n == 0:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}


ALLOWED = set(range(V)) - {PAD_ID, START_ID, UNK_ID}


@torch.no_grad()
def reference_greedy(model, memory, max_len: int, n: int) -> list[int]:
    """One item's greedy decoding, argmax over the allowed tokens, one step at a time."""
    state, out, prev = model.init_state(memory, 1), [], START_ID
    for _ in range(max_len):
        logp, state, _ = model.step(memory, state, torch.tensor([prev]))
        prev = max(ALLOWED - banned(out, n), key=lambda t: logp[0, t].item())
        if prev == END_ID:
            break
        out.append(prev)
    return out


@torch.no_grad()
def reference_beam(model, memory, k: int, max_len: int, alpha: float, n: int) -> tuple[list[int], float]:
    """One item's beam search hypothesis by hypothesis (lists, no batching): best tokens, normalised score."""
    live, finished = [(0.0, [], model.init_state(memory, 1))], []
    for t in range(1, max_len + 1):
        cands = []
        for score, toks, state in live:
            logp, after, _ = model.step(memory, state, torch.tensor([toks[-1] if toks else START_ID]))
            cands += [(score + logp[0, tok].item(), [*toks, tok], after) for tok in ALLOWED - banned(toks, n)]
        kept = sorted(cands, key=lambda c: -c[0])[:k][: k - len(finished)]  # finished ones hold slots
        finished += [(s / t**alpha, toks[:-1]) for s, toks, _ in kept if toks[-1] == END_ID]
        live = [c for c in kept if c[1][-1] != END_ID]
        if not live:
            break
    score, toks = max(finished) if finished else max((s / t**alpha, toks) for s, toks, _ in live)
    return toks, score


def test_the_looper_says_unk_and_repeats_itself_without_the_block():
    looper = Looper()
    logp, _, _ = looper.step(None, looper.init_state(None, 1), torch.tensor([START_ID]))
    assert int(logp.argmax()) == UNK_ID  # its favourite word
    loop = [A, TABLE, WITH] * 3
    assert greedy(looper, None, 2, 12).tokens == [loop] * 2
    assert beam_search(looper, None, 2, 3, 12, no_repeat_ngram=0).tokens == [loop] * 2
    drawn = sample(looper, None, 64, 12, generator=torch.Generator().manual_seed(0)).tokens
    assert sum(repeats(seq, 3) for seq in drawn) > 32


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_unk_and_no_repeated_ngram_with_the_block(n):
    looper = Looper()
    outputs = {"greedy": greedy(looper, None, 2, 12, no_repeat_ngram=n).tokens,
               "beam": beam_search(looper, None, 2, 3, 12, no_repeat_ngram=n).tokens,
               "sample": sample(looper, None, 64, 12, generator=torch.Generator().manual_seed(0),
                                no_repeat_ngram=n).tokens}
    for name, seqs in outputs.items():
        for seq in seqs:
            assert seq and UNK_ID not in seq and not repeats(seq, n), (name, seq)
    if n == 3:  # the loop is cut where it would repeat "a table with"; "." is the next best after "table"
        assert outputs["greedy"][0][:6] == [A, TABLE, WITH, A, TABLE, DOT]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_block_picks_the_best_allowed_token(model, memory, n):
    blocked = greedy(model, memory, 6, 10, no_repeat_ngram=n).tokens
    assert blocked == [reference_greedy(model, memory[i : i + 1], 10, n) for i in range(6)]
    assert blocked != greedy(model, memory, 6, 10).tokens  # this model repeats itself: the block changes it
    assert beam_search(model, memory, 6, 1, 10, no_repeat_ngram=n).tokens == blocked  # beam 1 is still greedy


@pytest.mark.parametrize("n", [2, 3])
def test_batched_beam_blocks_each_hypothesis_by_its_own_history(model, memory, n):
    batched = beam_search(model, memory, 6, beam_size=3, max_len=10, alpha=0.7, no_repeat_ngram=n)
    assert batched.tokens != beam_search(model, memory, 6, 3, 10, 0.7).tokens
    for i in range(6):
        tokens, score = reference_beam(model, memory[i : i + 1], 3, 10, 0.7, n)
        assert batched.tokens[i] == tokens and not repeats(tokens, n)
        assert batched.scores[i] == pytest.approx(score, abs=1e-5)


def test_blocked_beam_scores_are_still_length_normalised(model, memory):
    result = beam_search(model, memory, 6, beam_size=4, max_len=10, alpha=0.7, no_repeat_ngram=2)
    for i, toks in enumerate(result.tokens):
        score, att = teacher_forced(model, memory[i : i + 1], toks)  # the model's own log-probs
        torch.testing.assert_close(result.attention[i], att)
        if len(toks) < 10:
            assert result.scores[i] == pytest.approx(score / (len(toks) + 1) ** 0.7, abs=1e-5)


def test_a_negative_no_repeat_ngram_is_an_error(model, memory):
    for decode in (lambda: greedy(model, memory, 6, 10, no_repeat_ngram=-1),
                   lambda: sample(model, memory, 6, 10, no_repeat_ngram=-1),
                   lambda: beam_search(model, memory, 6, 3, 10, no_repeat_ngram=-1)):
        with pytest.raises(ValueError, match="no_repeat_ngram must be >= 0"):
            decode()
