"""Score trained models on a held-out split: caption metrics with beam search, LM loss and bits.

Beside the scores, what the report shows of the same run (pipeline/report/examples.py): the first test images'
captions from the very beam search that was scored, with their attention maps, or a language model's samples.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.baselines import nearest_images, nearest_neighbour_scores, pooled_features
from pipeline.data.coco import read_captions
from pipeline.data.tokenize import detokenize
from pipeline.decoding import Hypothesis, beam_error_analysis, beam_search
from pipeline.families import family as family_record
from pipeline.inference import generate
from pipeline.metrics import bits, caption_flaws, caption_scores, nltk_bleu4, perplexity, unigram_cross_entropy
from pipeline.models.ensemble import CaptionerEnsemble
from pipeline.params import EvaluateParams, Params
from pipeline.report.examples import CaptionExample, CaptionExamples, Examples, LanguageModelSamples
from pipeline.rerank import rerank
from pipeline.training.checkpoints import captioner_ensemble, load_module
from pipeline.training.datamodules import CaptionDataModule, LanguageModelDataModule
from pipeline.training.fit import build_datamodule, vocabulary
from pipeline.training.modules import CaptioningModule, LanguageModelModule, sequence_loss
from pipeline.training.scst import CiderD


def device_for(p: Params) -> str:
    """The evaluation device: the GPU when training would use one."""
    return "cuda" if p.train.accelerator != "cpu" and torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Evaluation:
    """A model's scores on a split, and what the report shows of that same evaluation."""

    metrics: dict
    examples: Examples


@dataclasses.dataclass
class Decoded:
    """One image's beam-search words, and its attention (T, N) float16 when kept for the report."""

    words: list[str]
    attention: np.ndarray | None


@torch.no_grad()
def evaluate_captioner(module: CaptioningModule, dm: CaptionDataModule, split: str, e: EvaluateParams,
                       shown: int, attended: int, neighbours: dict[int, list[int]] | None = None,
                       model: nn.Module | None = None) -> Evaluation:
    """Beam-search captions (n-gram block e.no_repeat_ngram) of `model` (default: the module's; or an ensemble of
    it) for every image of `split`, consensus-reranked over `neighbours` (each image's nearest training images)
    when e.rerank_neighbours > 0; coco-caption metrics, NLTK BLEU-4, error split; the first `shown` images'
    captions (`attended` with attention maps) as examples."""
    model, vocab = (model if model is not None else module.model), module.vocab_tokens
    members = len(model.members) if isinstance(model, CaptionerEnsemble) else 1
    refs = dm.references(split)
    beams: dict[int, list[Hypothesis]] = {}
    search_errors = items = 0
    attends = False  # whether beam search gives per-word attention (show_attend_tell)
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    for batch in loader:
        images = batch["images"].to(module.device)
        memory = model.encode(images)
        result = beam_search(model, memory, len(images), e.beam_size, module.model_cfg.max_len, e.alpha,
                             e.no_repeat_ngram, n_best=e.rerank_neighbours > 0)
        attends = result.attention is not None
        keys = batch["image_index"].tolist()
        attention = result.attention or [None] * len(keys)
        beams.update(zip(keys, result.candidates or [[Hypothesis(*best)] for best in zip(
            result.tokens, result.scores, attention, strict=True)], strict=True))  # the best alone unless reranking
        ref_ids = [[module.vocab.encode(r.split()) for r in refs[k]] for k in keys]
        analysis = beam_error_analysis(model, memory, ref_ids, result.tokens, e.alpha)  # of the beam's best
        search_errors += analysis["search_errors"]
        items += analysis["items"]
    words = {k: [[vocab[t] for t in h.tokens] for h in hyps] for k, hyps in beams.items()}
    chosen = {k: 0 for k in beams}
    extra = {}
    if e.rerank_neighbours > 0:
        if neighbours is None:
            raise ValueError("evaluate.rerank_neighbours > 0 needs each image's nearest training images")
        extra = {"beam_cider": caption_scores({k: refs[k] for k in words}, {k: " ".join(w[0]) for k, w in
                                                                             words.items()}, meteor=False)["cider"]}
        options = {k: [(" ".join(w), h.score) for w, h in zip(words[k], beams[k], strict=True)] for k in beams}
        chosen = rerank(options, neighbours, CiderD(dm.references("train")), e.rerank_weight)
        extra["reranked_fraction"] = sum(i > 0 for i in chosen.values()) / max(1, len(chosen))
    decoded = {k: Decoded(words[k][i], _kept_attention(beams[k][i], k < attended)) for k, i in chosen.items()}
    hyps = {k: " ".join(d.words) for k, d in decoded.items()}
    scores = caption_scores({k: refs[k] for k in hyps}, hyps, meteor=e.meteor)
    metrics = {**scores, "nltk_bleu_4": nltk_bleu4({k: refs[k] for k in hyps}, hyps),
               "beam_size": e.beam_size, "alpha": e.alpha, "no_repeat_ngram": e.no_repeat_ngram,
               "rerank_neighbours": e.rerank_neighbours, "ensemble_members": members, **extra, "images": len(hyps),
               "search_error_fraction": search_errors / max(1, items),
               "model_error_fraction": (items - search_errors) / max(1, items), **caption_flaws(hyps)}
    images = [caption_example(rec, decoded[rec["image_index"]])
              for rec in read_captions(dm.coco_dir / split / "captions.jsonl")[:shown]]
    decoding = {k: metrics[k] for k in ("beam_size", "alpha", "no_repeat_ngram", "rerank_neighbours",
                                        "ensemble_members")}
    return Evaluation(metrics, CaptionExamples(module.model_cfg.arch, attends, decoding, images))


def _kept_attention(hypothesis: Hypothesis, kept: bool) -> np.ndarray | None:
    """A caption's attention (T, N) as float16 for the report: maps in [0, 1], half precision draws them."""
    if not kept or hypothesis.attention is None:
        return None
    return hypothesis.attention.float().cpu().numpy().astype(np.float16)


def caption_example(record: dict, decoded: Decoded) -> CaptionExample:
    """A captions.jsonl record beside its decoded caption, as the report shows it."""
    return CaptionExample(record["image_index"], record["image_id"], record["file_name"], decoded.words,
                          [detokenize(c) for c in record["captions"]], detokenize(decoded.words), decoded.attention)


@torch.no_grad()
def lm_loss(module: LanguageModelModule, dm: LanguageModelDataModule, split: str) -> tuple[float, int]:
    """Mean nats per token over a split (state carried across batches for RNNs) and the token count."""
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    total, tokens, state = 0.0, 0, None
    for batch in loader:
        inputs, targets = batch["inputs"].to(module.device), batch["targets"].to(module.device)
        logits, state = module.model(None, inputs, state if module.carry_state else None)
        total += float(sequence_loss(logits, targets)) * targets.numel()
        tokens += targets.numel()
    return total / max(1, tokens), tokens


def evaluate_language_model(module: LanguageModelModule, dm: LanguageModelDataModule, split: str,
                            text_dir: Path) -> dict:
    """Test loss, perplexity, bits per char (per token for chars), and the unigram baseline."""
    loss, tokens = lm_loss(module, dm, split)
    vocab_size = len(module.vocab_tokens)
    baseline = unigram_cross_entropy(dm.stream("train").array, dm.stream(split).array, vocab_size)
    # Bits per character = bits per token / characters per token (1 for char models; for word
    # models the split's characters, spaces and newlines included, over its tokens).
    chars_per_token = 1.0
    if dm.level == "word":
        chars_per_token = len((text_dir / f"{split}.txt").read_text("utf-8")) / max(1, dm.num_tokens(split))
    return {"level": dm.level, "tokens": tokens, "test_loss": loss, "perplexity": perplexity(loss),
            "bits_per_token": bits(loss), "bits_per_char": bits(loss) / chars_per_token,
            "unigram_bits_per_char": bits(baseline) / chars_per_token,
            "unigram_perplexity": perplexity(baseline)}


def lm_samples(module: LanguageModelModule, prompt: str, length: int, temperatures: list[float],
               seed: int) -> LanguageModelSamples:
    """One sample per temperature continuing `prompt` for `length` tokens, each seeded with `seed`."""
    return LanguageModelSamples(prompt, length, seed, [(t, generate(module, prompt, length, t, seed=seed))
                                                        for t in temperatures])


def run_evaluation(p: Params, family: str, checkpoint: str | Path, split: str = "test") -> Evaluation:
    """Load a checkpoint and score it on `split` with the `evaluate` params; what the report shows beside."""
    module = load_module(family, checkpoint, device_for(p))
    dm = build_datamodule(p, family, vocabulary(p, family), use_features=False)  # raw images through the encoder
    dm.setup("test")
    e, r = p.evaluate, p.report
    if family_record(family).captions:
        encoder = module.model.encoder
        train = pooled_features(encoder, dm.images_dataloader("train"), module.device)
        queries = pooled_features(encoder, dm.images_dataloader(split), module.device)
        neighbours = nearest_images(train, queries, e.rerank_neighbours) if e.rerank_neighbours else None
        result = evaluate_captioner(module, dm, split, e, r.test_images, r.attention_images, neighbours,
                                    captioner_ensemble(module, e.captioner_ensemble, checkpoint))
        result.metrics.update(nearest_neighbour_scores(train, queries, dm.references("train"), dm.references(split),
                                                       e.meteor))
    else:
        result = Evaluation(evaluate_language_model(module, dm, split, Path(p.paths.text)),
                            lm_samples(module, r.prompt, e.sample_length, e.temperatures, p.seed))
    result.metrics = {"family": family, "checkpoint": str(checkpoint), "split": split, **result.metrics}
    return result


def evaluate(p: Params, family: str, checkpoint: str | Path, split: str = "test") -> dict:
    """Load a checkpoint and score it on `split` with the `evaluate` params (the scores only)."""
    return run_evaluation(p, family, checkpoint, split).metrics
