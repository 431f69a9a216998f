"""Score trained models on a held-out split: caption metrics with beam search, LM loss and bits."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.baselines import nearest_neighbour_scores
from pipeline.decoding import beam_error_analysis, beam_search
from pipeline.metrics import bits, caption_flaws, caption_scores, nltk_bleu4, perplexity, unigram_cross_entropy
from pipeline.params import Params
from pipeline.training.datamodules import CaptionDataModule, LanguageModelDataModule
from pipeline.training.fit import build_datamodule, load_module, vocabulary
from pipeline.training.modules import CaptioningModule, LanguageModelModule, sequence_loss


def device_for(p: Params) -> str:
    """The evaluation device: the GPU when training would use one."""
    return "cuda" if p.train.accelerator != "cpu" and torch.cuda.is_available() else "cpu"


@torch.no_grad()
def evaluate_captioner(module: CaptioningModule, dm: CaptionDataModule, split: str, beam_size: int,
                       alpha: float, meteor: bool, no_repeat_ngram: int) -> dict:
    """Beam-search captions (n-gram block no_repeat_ngram) for every image of `split`; coco-caption metrics,
    NLTK BLEU-4, error split."""
    model, vocab = module.model, module.vocab_tokens
    refs = dm.references(split)
    hyps: dict[int, str] = {}
    search_errors = items = 0
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    for batch in loader:
        images = batch["images"].to(module.device)
        memory = model.encode(images)
        result = beam_search(model, memory, len(images), beam_size, module.model_cfg.max_len, alpha,
                             no_repeat_ngram)
        keys = batch["image_index"].tolist()
        for key, tokens in zip(keys, result.tokens, strict=True):
            hyps[key] = " ".join(vocab[t] for t in tokens)
        ref_ids = [[module.vocab.encode(r.split()) for r in refs[k]] for k in keys]
        analysis = beam_error_analysis(model, memory, ref_ids, result.tokens, alpha)
        search_errors += analysis["search_errors"]
        items += analysis["items"]
    scores = caption_scores({k: refs[k] for k in hyps}, hyps, meteor=meteor)
    return {**scores, "nltk_bleu_4": nltk_bleu4({k: refs[k] for k in hyps}, hyps),
            "beam_size": beam_size, "alpha": alpha, "no_repeat_ngram": no_repeat_ngram, "images": len(hyps),
            "search_error_fraction": search_errors / max(1, items),
            "model_error_fraction": (items - search_errors) / max(1, items), **caption_flaws(hyps)}


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


def evaluate(p: Params, family: str, checkpoint: str | Path, split: str = "test") -> dict:
    """Load a checkpoint and score it on `split` with the `evaluate` params."""
    module = load_module(family, checkpoint, device_for(p))
    dm = build_datamodule(p, family, vocabulary(p, family), use_features=False)  # raw images through the encoder
    dm.setup("test")
    if family == "captioner":
        e = p.evaluate
        result = evaluate_captioner(module, dm, split, e.beam_size, e.alpha, e.meteor, e.no_repeat_ngram)
        result.update(nearest_neighbour_scores(module.model.encoder, dm.images_dataloader("train"),
                                               dm.images_dataloader(split), dm.references("train"),
                                               dm.references(split), module.device, e.meteor))
    else:
        result = evaluate_language_model(module, dm, split, Path(p.paths.text))
    return {"family": family, "checkpoint": str(checkpoint), "split": split, **result}
