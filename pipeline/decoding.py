"""Decoding for any model with the incremental protocol (`init_state`, `step`, `select`).

Greedy, sampling (temperature, top-k), batched beam search with length normalisation, sequence
log-probabilities, the search-vs-model error analysis of beam search, and free LM text generation.
Every function runs under no_grad with the model temporarily in eval mode. No decoder ever emits <pad>,
<start> or <unk>; greedy, sampling and beam search can also block repeated n-grams (`no_repeat_ngram`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.tokens import END_ID, PAD_ID, START_ID, UNK_ID

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    """One caption of a beam: tokens (no <start>, cut before <end>), score, attention (T, N) or None."""

    tokens: list[int]
    score: float
    attention: Tensor | None = None


@dataclass
class DecodeResult:
    """Per item: tokens (no <start>, cut before <end>), score, attention (T, N) or None; with beam search's
    n_best, every hypothesis it ended with: the finished ones best first, then any still live at max_len."""

    tokens: list[list[int]]
    scores: list[float]
    attention: list[Tensor] | None = None
    candidates: list[list[Hypothesis]] | None = None


@contextlib.contextmanager
def _decoding(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration, restoring the caller's training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module, memory: Tensor | None) -> torch.device:
    if memory is not None:
        return memory.device
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _stack_attention(steps: list[Tensor | None], lengths: list[int]) -> list[Tensor] | None:
    """Per-step (B, N) weights -> per item (T_i, N) on the CPU; None if the model gives none."""
    if not steps or steps[0] is None:
        return None
    stacked = torch.stack(steps, dim=1).float().cpu()  # (B, steps, N)
    return [stacked[i, :n] for i, n in enumerate(lengths)]


# never outputs: <pad>/<start> are not words (an untrained model can still rank them high); <unk> is not a
# word either, but trained captioners learn it for every rare word (it was in a third of their COCO captions)
NEVER_GENERATED = (PAD_ID, START_ID, UNK_ID)


def _step(model: nn.Module, memory: Tensor | None, state, tokens: Tensor, suppress=NEVER_GENERATED):
    """model.step with the log-probs of `suppress`ed tokens set to -inf (they are never chosen)."""
    logp, state, att = model.step(memory, state, tokens)  # (B, V)
    logp = logp.clone()
    logp[:, list(suppress)] = float("-inf")
    return logp, state, att


def _check_ngram(no_repeat_ngram: int) -> None:
    if no_repeat_ngram < 0:
        raise ValueError(f"no_repeat_ngram must be >= 0 (0: off), got {no_repeat_ngram}")


def _block_repeats(logp: Tensor, history: Tensor, n: int, rows: Tensor | None = None) -> Tensor:
    """Set to -inf, in place, each token of logp (R, V) that would complete an n-gram already in its row's
    history (R, t); returns logp.

    n = 0 (off) or a history shorter than n leaves logp as it is; `rows` (R,) bool limits the block to those
    rows. Vectorised over rows, O(t * n) per row and step: nothing of size V but the write.
    """
    t = history.shape[1]
    if n == 0 or t < n:
        return logp
    windows = history.unfold(1, n, 1)  # (R, t-n+1, n): every n-gram of each row so far
    prefix = history[:, t - n + 1:]  # (R, n-1): the tokens the next n-gram starts with
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (R, t-n+1); n = 1: every window
    if rows is not None:
        match &= rows[:, None]
    fill = torch.where(match, float("-inf"), float("inf")).to(logp.dtype)  # (R, t-n+1)
    # min, not assignment: a token can end several windows, matching or not (scatter_ would pick one at random)
    return logp.scatter_reduce_(1, windows[:, :, -1], fill, reduce="amin")


def _run(model: nn.Module, memory: Tensor | None, batch_size: int, max_len: int,
         choose: Callable[[Tensor], Tensor], start_tokens: Tensor | None, no_repeat_ngram: int) -> DecodeResult:
    """Left-to-right decoding where `choose(log_probs (B, V)) -> tokens (B,)` picks each token."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    _check_ngram(no_repeat_ngram)
    device = _device(model, memory)
    tokens = (torch.full((batch_size,), START_ID, dtype=torch.long, device=device)
              if start_tokens is None else start_tokens.to(device))
    state = model.init_state(memory, batch_size)
    score = torch.zeros(batch_size, device=device)
    alive = torch.ones(batch_size, dtype=torch.bool, device=device)
    history = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # (B, steps) tokens chosen so far
    attn = []
    for _ in range(max_len):
        logp, state, att = _step(model, memory, state, tokens)  # (B, V)
        # finished rows are left alone: their history holds <end>, so the block could leave them no token
        logp = _block_repeats(logp, history, no_repeat_ngram, alive)
        tokens = choose(logp)  # (B,)
        score += torch.where(alive, logp.gather(1, tokens[:, None])[:, 0], 0.0)
        history = torch.cat([history, tokens[:, None]], dim=1)
        attn.append(att)
        alive &= tokens != END_ID
        if not alive.any():
            break
    rows = history.tolist()  # (B, steps)
    seqs = [row[: row.index(END_ID)] if END_ID in row else row for row in rows]
    return DecodeResult(seqs, score.tolist(), _stack_attention(attn, [len(s) for s in seqs]))


def greedy(model: nn.Module, memory: Tensor | None, batch_size: int, max_len: int,
           start_tokens: Tensor | None = None, *, no_repeat_ngram: int = 0) -> DecodeResult:
    """Argmax at each step, up to max_len tokens (incl. <end>); scores are summed log-probs.

    no_repeat_ngram n > 0: a token that would complete an n-gram already in the caption is never chosen.
    """
    with _decoding(model):
        return _run(model, memory, batch_size, max_len, lambda lp: lp.argmax(-1), start_tokens, no_repeat_ngram)


def _sampler(temperature: float, top_k: int | None,
             generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    """Token chooser for sampling; temperature 0 means argmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")

    def choose(logp: Tensor) -> Tensor:
        if temperature == 0:
            return logp.argmax(-1)
        logits = logp / temperature  # (B, V)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return choose


def sample(model: nn.Module, memory: Tensor | None, batch_size: int, max_len: int,
           temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None, *, no_repeat_ngram: int = 0) -> DecodeResult:
    """Ancestral sampling from softmax(log p / temperature), optionally among the top k tokens.

    Scores are the model's own log-probs of the sampled tokens (untempered). The generator must
    live on the model's device. no_repeat_ngram: as in greedy (blocked tokens get probability 0).
    """
    with _decoding(model):
        return _run(model, memory, batch_size, max_len,
                    _sampler(temperature, top_k, generator), None, no_repeat_ngram)


def _expand(memory: Tensor | None, index: Tensor) -> Tensor | None:
    return None if memory is None else memory.index_select(0, index)


def beam_search(model: nn.Module, memory: Tensor | None, batch_size: int, beam_size: int,
                max_len: int, alpha: float = 0.7, no_repeat_ngram: int = 0, n_best: bool = False) -> DecodeResult:
    """Batched beam search; returns per item the best hypothesis by log P / T^alpha.

    The whole batch x beam is one batch of B*K rows. Finished hypotheses take beam slots
    (Sutskever et al. 2014): at each step an item with f finished hypotheses keeps the best
    K - f extensions of its live ones by log-prob (all have the same length, so normalising would
    not change that ranking); extensions ending in <end> join its finished list. An item is done
    when it has K finished hypotheses, at which point it has no live one left, so nothing unseen
    can beat them; this needs no bound on future normalised scores and makes K = 1 exactly greedy.
    At max_len an item with no finished hypothesis returns its best live one (normalised by
    max_len^alpha). T counts generated tokens including <end>.

    no_repeat_ngram n > 0: each hypothesis never extends by a token that would complete an n-gram
    already in its own tokens (scores stay the model's log-probs, normalised as above).
    n_best: also return each item's hypotheses (`candidates`: finished, then live at max_len), e.g. to rerank.
    """
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
    _check_ngram(no_repeat_ngram)
    with _decoding(model):
        return _beam(model, memory, batch_size, beam_size, max_len, alpha, no_repeat_ngram, n_best)


def _beam(model: nn.Module, memory: Tensor | None, b: int, k: int, max_len: int,
          alpha: float, no_repeat_ngram: int, n_best: bool) -> DecodeResult:
    device = _device(model, memory)
    rows = torch.arange(b, device=device).repeat_interleave(k)  # (B*K,) item of each row
    memory = _expand(memory, rows)
    state = model.init_state(memory, b * k)
    tokens = torch.full((b * k,), START_ID, dtype=torch.long, device=device)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis per item at first, so beams do not duplicate
    finished: list[list[tuple[float, int, int]]] = [[] for _ in range(b)]  # (norm, step, slot)
    hist_tok: list[list[list[int]]] = []  # per step (B, K) token of each slot
    hist_parent: list[list[list[int]]] = []  # per step (B, K) slot it extended
    hist_att: list[Tensor | None] = []  # per step (B*K, N) attention of the parent rows
    seqs = torch.zeros(b * k, 0, dtype=torch.long, device=device)  # (B*K, t-1) each row's hypothesis so far
    live: list[list[tuple[float, int]]] = [[] for _ in range(b)]
    for t in range(1, max_len + 1):
        logp, state, att = _step(model, memory, state, tokens)  # (B*K, V)
        logp = _block_repeats(logp, seqs, no_repeat_ngram)  # each row by its own hypothesis
        v = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)  # (B, K*V)
        top, idx = cand.topk(k, dim=-1)  # (B, K), best first
        parent, tok = idx // v, idx % v
        quota = torch.tensor([k - len(f) for f in finished], device=device)[:, None]  # (B, 1)
        keep = (torch.arange(k, device=device)[None, :] < quota) & torch.isfinite(top)
        is_end = tok == END_ID
        scores = torch.where(keep & ~is_end, top, float("-inf"))
        hist_tok.append(tok.tolist())
        hist_parent.append(parent.tolist())
        hist_att.append(att)
        top_rows = top.tolist()
        for i, j in (keep & is_end).nonzero().tolist():
            finished[i].append((top_rows[i][j] / t ** alpha, t, j))
        live_rows = scores.tolist()
        live = [[(s / t ** alpha, j) for j, s in enumerate(r) if s != float("-inf")] for r in live_rows]
        if all(not lv for lv in live):
            break
        flat_parent = (parent + torch.arange(b, device=device)[:, None] * k).view(-1)  # (B*K,)
        state = model.select(state, flat_parent)
        tokens = tok.view(-1)
        seqs = torch.cat([seqs.index_select(0, flat_parent), tokens[:, None]], dim=1)  # (B*K, t)
    kept = hist_att if hist_att and hist_att[0] is not None else None
    ranked = [_ranked(done, live[i], t) for i, done in enumerate(finished)]
    candidates = [[_rebuild(hist_tok, hist_parent, kept, k, i, *end) for end in ends[: None if n_best else 1]]
                  for i, ends in enumerate(ranked)]  # per item: its best only, unless n_best
    best = [c[0] for c in candidates]
    return DecodeResult([h.tokens for h in best], [h.score for h in best],
                        [h.attention for h in best] if kept else None, candidates if n_best else None)


def _ranked(done: list, live: list, last_step: int) -> list[tuple[float, int, int]]:
    """One item's (score, step, slot): finished hypotheses best first, then those live at max_len, best first.

    The first is the beam's answer: its best finished hypothesis, or its best live one if none finished.
    """
    return (sorted(done, key=lambda h: -h[0])
            + [(norm, last_step, slot) for norm, slot in sorted(live, key=lambda h: -h[0])])


def _rebuild(hist_tok: list, hist_parent: list, hist_att: list | None, k: int, item: int, norm: float, step: int,
             slot: int) -> Hypothesis:
    """The hypothesis in `slot` at `step` via backpointers: tokens cut before <end>, attention (T, N) if kept."""
    toks, att = [], []
    for s in range(step - 1, -1, -1):
        toks.append(hist_tok[s][item][slot])
        parent = hist_parent[s][item][slot]
        if hist_att is not None:
            att.append(hist_att[s][item * k + parent])
        slot = parent
    toks.reverse()
    att.reverse()
    cut = toks.index(END_ID) if END_ID in toks else len(toks)
    attention = None
    if hist_att is not None:
        attention = torch.stack(att[:cut]).float().cpu() if cut else torch.zeros(0, hist_att[0].shape[-1])
    return Hypothesis(toks[:cut], float(norm), attention)


def sequence_logprob(model: nn.Module, memory: Tensor | None, seq: Tensor) -> Tensor:
    """seq (B, T) starting with <start> (or the first LM token), padded with <pad> ->
    (B,) sum over t >= 1 of log P(seq_t | seq_<t, memory), <end> included, pads skipped."""
    seq = seq.to(_device(model, memory))
    with _decoding(model):
        state = model.init_state(memory, seq.shape[0])
        total = torch.zeros(seq.shape[0], device=seq.device)
        for t in range(seq.shape[1] - 1):
            logp, state, _ = model.step(memory, state, seq[:, t])  # (B, V)
            target = seq[:, t + 1]
            picked = logp.gather(1, target[:, None])[:, 0]
            total += torch.where(target != PAD_ID, picked, 0.0)
        return total


def _caption_batch(captions: list[list[int]], device: torch.device) -> Tensor:
    """Token lists (no specials) -> (N, T) [<start>, ..., <end>, <pad>...]."""
    width = max(len(c) for c in captions) + 2
    seq = torch.full((len(captions), width), PAD_ID, dtype=torch.long)
    for i, c in enumerate(captions):
        seq[i, : len(c) + 2] = torch.tensor([START_ID, *c, END_ID], dtype=torch.long)
    return seq.to(device)


def _normalised(model: nn.Module, memory: Tensor | None, captions: list[list[int]],
                owners: list[int], alpha: float, device: torch.device) -> list[float]:
    """Length-normalised log P(caption | memory[owner]) / (len + 1)^alpha, like beam's score."""
    mem = _expand(memory, torch.tensor(owners, device=device))
    logp = sequence_logprob(model, mem, _caption_batch(captions, device)).tolist()
    return [lp / (len(c) + 1) ** alpha for lp, c in zip(logp, captions, strict=True)]


def beam_error_analysis(model: nn.Module, memory: Tensor | None, references: list,
                        outputs: list[list[int]], alpha: float = 0.7) -> dict:
    """Blame each beam output on search or model by length-normalised score log P / T^alpha.

    references[i] is one token list or a list of them (the best-scoring one is used); tokens are
    without <start>/<end>. Search error: the model scores the reference above the output (search
    missed a better sequence); otherwise (ties included) model error. Outputs are scored as
    complete captions (followed by <end>), T = tokens + 1, as beam_search scores finished ones.
    """
    if len(references) != len(outputs):
        raise ValueError(f"references ({len(references)}) and outputs ({len(outputs)}) differ in length")
    if not outputs:
        raise ValueError("beam_error_analysis: no items")
    device = _device(model, memory)
    refs, owners = [], []
    for i, ref in enumerate(references):
        group = ref if ref and isinstance(ref[0], (list, tuple)) else [ref]
        refs += [list(r) for r in group]
        owners += [i] * len(group)
    with _decoding(model):
        ref_scores = _normalised(model, memory, refs, owners, alpha, device)
        out_scores = _normalised(model, memory, outputs, list(range(len(outputs))), alpha, device)
    best_ref = [float("-inf")] * len(outputs)
    for owner, s in zip(owners, ref_scores, strict=True):
        best_ref[owner] = max(best_ref[owner], s)
    search = sum(r > o for r, o in zip(best_ref, out_scores, strict=True))
    n = len(outputs)
    return {"items": n, "search_errors": search, "model_errors": n - search,
            "search_error_fraction": search / n, "model_error_fraction": (n - search) / n,
            "mean_reference_score": sum(best_ref) / n, "mean_output_score": sum(out_scores) / n}


def generate_text(model: nn.Module, prompt_ids: list[int], max_new: int, temperature: float = 1.0,
                  top_k: int | None = None, generator: torch.Generator | None = None,
                  suppress: tuple[int, ...] = NEVER_GENERATED) -> list[int]:
    """Feed a non-empty prompt through `step`, then sample max_new tokens (never `suppress`); returns them.

    <unk> is suppressed at both levels: for words it is no word, for characters it stands for every rare
    character at once and would print as the five characters "<unk>". No n-gram block: character text
    repeats n-grams all the time.
    """
    if not prompt_ids:
        raise ValueError("generate_text: the prompt needs at least one token")
    choose = _sampler(temperature, top_k, generator)
    device = _device(model, None)
    with _decoding(model):
        state = model.init_state(None, 1)
        for tok in prompt_ids:
            logp, state, _ = _step(model, None, state, torch.tensor([tok], device=device), suppress)
        new: list[int] = []
        while len(new) < max_new:
            nxt = choose(logp)  # (1,)
            new.append(int(nxt))
            if len(new) < max_new:  # the last token needs no next-token distribution
                logp, state, _ = _step(model, None, state, nxt, suppress)
        return new
