"""Caption metrics (coco-caption's BLEU, METEOR, ROUGE-L, CIDEr), NLTK BLEU-4 and LM loss conversions.

Inputs are already tokenised: each caption is one string of space-joined lower-case tokens, so
pycocoevalcap's PTB tokenizer (Java, slow) is skipped and the dicts go to the scorers directly.

Empty hypotheses: pycocoevalcap 1.2's BLEU, METEOR, ROUGE-L and CIDEr all accept "" and score it 0
(tests/test_metrics.py checks this), so they are passed through unchanged; a placeholder token would
change BLEU's length statistics. Whitespace is normalised and "|||" removed because METEOR reads
one line per request with "|||" as separator: a newline would desynchronise it and hang.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import warnings

import numpy as np
from nltk.translate.bleu_score import corpus_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

log = logging.getLogger(__name__)

JAVA_MISSING = "METEOR needs Java 8+ on PATH (java not found); other metrics are unaffected"
METEOR_TIMEOUT_S = 600.0  # the whole METEOR call (JVM start ~10 s + scoring); then it is killed


def _clean(text: str) -> str:
    """Single spaces, no newlines, no METEOR separator."""
    return " ".join(text.replace("|||", " ").split())


def _check_inputs(references: dict[int, list[str]], hypotheses: dict[int, str]) -> None:
    """Same ids on both sides, at least one reference per id, strings everywhere."""
    if not hypotheses:
        raise ValueError("caption metrics: no hypotheses to score")
    missing = sorted(set(hypotheses) - set(references), key=str)
    extra = sorted(set(references) - set(hypotheses), key=str)
    if missing or extra:
        raise ValueError(f"caption metrics: ids differ between references and hypotheses "
                         f"(no references for {missing[:5]}, no hypothesis for {extra[:5]})")
    for key, refs in references.items():
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"caption metrics: references[{key!r}]: expected a non-empty list of "
                             f"strings, got {refs!r:.80}")
        if not isinstance(hypotheses[key], str):
            raise ValueError(f"caption metrics: hypotheses[{key!r}]: expected a string, "
                             f"got {type(hypotheses[key]).__name__}")


class _Meteor(Meteor):
    """pycocoevalcap's METEOR wrapper with a close() that kills the JVM and never blocks."""

    def close(self) -> str:
        """Kill the Java process, reap it, close its pipes; return the tail of its stderr."""
        proc = getattr(self, "meteor_p", None)
        self.meteor_p = None
        if proc is None:
            return ""
        proc.kill()  # a reader blocked on stdout now sees EOF
        proc.wait()
        err = b""
        try:
            err = proc.stderr.read()[-500:]
        except (OSError, ValueError):
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:  # stdin's flush fails once the process is gone
                pass
        return err.decode(errors="replace").strip()

    def __del__(self) -> None:
        # The parent's __del__ takes a lock that a failed compute_score never releases: it would hang.
        self.close()


def _meteor_score(gts: dict, res: dict, timeout: float = METEOR_TIMEOUT_S) -> tuple[float | None, str | None]:
    """Corpus METEOR 1.5 via its Java jar: (score, None) or (None, why it is unavailable)."""
    if shutil.which("java") is None:
        return None, JAVA_MISSING
    try:
        scorer = _Meteor()
    except OSError as err:
        return None, (f"METEOR could not start java ({err}); it needs Java 8+ on PATH; "
                      "other metrics are unaffected")
    result: dict = {}

    def work() -> None:
        try:
            result["score"] = float(scorer.compute_score(gts, res)[0])
        except Exception as err:  # reported, never raised: METEOR is optional
            result["error"] = err

    thread = threading.Thread(target=work, name="meteor", daemon=True)
    thread.start()
    thread.join(timeout)
    timed_out = thread.is_alive()
    stderr = scorer.close()  # the blocked reader gets EOF, so the thread ends too
    thread.join(10.0)
    if "score" in result and not timed_out:
        return result["score"], None
    why = (f"no answer within {timeout:g} s" if timed_out
           else f"{type(result['error']).__name__}: {result['error']}")
    detail = f"; java said: {stderr}" if stderr else ""
    log.warning("METEOR failed: %s%s", why, detail)
    return None, f"METEOR failed ({why}{detail}); it needs Java 8+ on PATH; other metrics are unaffected"


def caption_scores(
    references: dict[int, list[str]], hypotheses: dict[int, str], meteor: bool = True
) -> dict:
    """coco-caption metrics: bleu_1..bleu_4, meteor (or None + meteor_error), rouge_l, cider.

    CIDEr's idf comes from the references being scored, so it is only meaningful on a set of
    images (on a single image every n-gram has idf 0 and CIDEr is 0).
    """
    _check_inputs(references, hypotheses)
    gts = {k: [_clean(r) for r in references[k]] for k in hypotheses}
    res = {k: [_clean(h)] for k, h in hypotheses.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    if meteor:
        scores["meteor"], error = _meteor_score(gts, res)
    else:
        scores["meteor"], error = None, "METEOR not computed (meteor=False)"
    if error is not None:
        scores["meteor_error"] = error
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def caption_flaws(hypotheses: dict[int, str], n: int = 3) -> dict[str, int]:
    """How many captions contain <unk>, and how many repeat an n-gram (what a reader notices first)."""
    def repeats(words: list[str]) -> bool:
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return len(grams) != len(set(grams))

    words = [h.split() for h in hypotheses.values()]
    return {"captions_with_unk": sum("<unk>" in w for w in words),
            f"captions_with_repeated_{n}gram": sum(repeats(w) for w in words)}


def consensus_captions(references: dict[int, list[str]]) -> dict[int, str]:
    """Per image, the reference with the highest CIDEr against the image's other references.

    Document frequencies come from every image's other references; an image with one reference keeps it.
    """
    refs = {k: [_clean(r) for r in v] for k, v in references.items()}
    best: dict[int, tuple[float, str]] = {k: (-1.0, v[0]) for k, v in refs.items() if v}
    for j in range(max(map(len, refs.values()), default=0)):
        keys = [k for k, v in refs.items() if len(v) > 1 and j < len(v)]
        if not keys:
            continue
        gts = {k: refs[k][:j] + refs[k][j + 1:] for k in keys}
        _, per_image = Cider().compute_score(gts, {k: [refs[k][j]] for k in keys})
        for key, score in zip(keys, per_image, strict=True):  # pycocoevalcap scores in gts' key order
            if score > best[key][0]:
                best[key] = (float(score), refs[key][j])
    return {k: caption for k, (_, caption) in best.items()}


def nltk_bleu4(references: dict[int, list[str]], hypotheses: dict[int, str]) -> float:
    """Corpus BLEU-4 by NLTK: uniform 4-gram weights, no smoothing, closest reference length.

    Without smoothing an n-gram order with no match anywhere in the corpus makes BLEU-4 ~0
    (NLTK's warning about it is silenced). It agrees with pycocoevalcap's bleu_4 to ~1e-9 when
    every hypothesis has at least 4 tokens: see tests/test_metrics.py for the one difference.
    """
    _check_inputs(references, hypotheses)
    keys = list(hypotheses)
    refs = [[r.split() for r in references[k]] for k in keys]
    hyps = [hypotheses[k].split() for k in keys]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*0 counts of .*-gram overlaps", category=UserWarning)
        return float(corpus_bleu(refs, hyps, weights=(0.25, 0.25, 0.25, 0.25)))


def perplexity(loss_nats: float) -> float:
    """exp(mean cross-entropy in nats); inf when it overflows."""
    try:
        return math.exp(loss_nats)
    except OverflowError:
        return math.inf


def bits(loss_nats: float) -> float:
    """Nats to bits (e.g. cross-entropy per character -> bits per character)."""
    return loss_nats / math.log(2)


def _as_ids(ids: np.ndarray, vocab_size: int, name: str) -> np.ndarray:
    """Flat int64 ids, each in [0, vocab_size)."""
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"unigram_cross_entropy: {name}: expected integer token ids, got {ids.dtype}")
    ids = ids.reshape(-1).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"unigram_cross_entropy: {name}: ids must lie in [0, {vocab_size}), "
                         f"got range [{ids.min()}, {ids.max()}]")
    return ids


def unigram_cross_entropy(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Nats per eval token under an add-one-smoothed unigram model estimated on train_ids."""
    if vocab_size < 1:
        raise ValueError(f"unigram_cross_entropy: vocab_size must be >= 1, got {vocab_size}")
    train = _as_ids(train_ids, vocab_size, "train_ids")
    evals = _as_ids(eval_ids, vocab_size, "eval_ids")
    if evals.size == 0:
        raise ValueError("unigram_cross_entropy: eval_ids is empty")
    counts = np.bincount(train, minlength=vocab_size)  # (V,)
    log_p = np.log(counts + 1.0) - math.log(train.size + vocab_size)  # (V,) add-one smoothing
    eval_counts = np.bincount(evals, minlength=vocab_size)  # (V,)
    return float(-(eval_counts @ log_p) / evals.size)
