"""Word vectors aligned row-by-row to words.json: skip-gram trained here, or GloVe 6B 50d.

DVC stage `embeddings`: params `seed`, `vocab.sources`, `embeddings`;
{paths.vocab}/words.json + {paths.encoded}/<source>_train_word.npy
-> {paths.embeddings}/words.npy, {paths.metrics}/embeddings.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.vocab import Vocabulary
from pipeline.embeddings.glove import align_glove
from pipeline.embeddings.probe import probe
from pipeline.embeddings.skipgram import SkipGramConfig, load_stream, train_skipgram
from pipeline.io import save_npy, write_metrics
from pipeline.params import Params, load_params
from pipeline.runtime import set_threads
from stages import entry

STREAMS = {"text": "text_train_word.npy", "captions": "captions_train_word.npy"}


def load_vocab(p: Params) -> Vocabulary:
    """The word vocabulary, with an error that says which stage makes it."""
    path = Path(p.paths.vocab) / "words.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the vocab stage first: dvc repro vocab)")
    return Vocabulary.load(path)


def skipgram(p: Params, vocab: Vocabulary) -> tuple[np.ndarray, dict]:
    """Train skip-gram on the training streams of every vocab source."""
    e = p.embeddings
    # Each stream ends every line with <end>, so concatenating them keeps sentence boundaries.
    stream = np.concatenate([load_stream(Path(p.paths.encoded) / STREAMS[s], len(vocab))
                             for s in p.vocab.sources])
    cfg = SkipGramConfig(dim=e.dim, window=e.window, negatives=e.negatives, subsample=e.subsample,
                         epochs=e.epochs, batch_size=e.batch_size, lr=e.lr)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = train_skipgram(stream, len(vocab), cfg, seed=p.seed, device=device)
    return result.vectors, {"training_pairs": result.pairs, "final_loss": round(result.final_loss, 6)}


def run(p: Params) -> dict:
    set_threads(p.runtime.threads)
    vocab = load_vocab(p)
    e = p.embeddings
    if e.pretrained is None:
        matrix, extra = skipgram(p, vocab)
        method = "skipgram"
    else:  # params validation admits only glove-6b-50d (and then dim == 50)
        matrix, found = align_glove(vocab, seed=p.seed)
        method, extra = e.pretrained, {"words_found": found}
    neighbours, missing = probe(matrix, vocab, e.probe_words, e.neighbours)
    metrics = {
        "method": method, "dim": int(matrix.shape[1]), "vocab_size": len(vocab), **extra,
        "probe": {w: [[n, round(s, 4)] for n, s in ns] for w, ns in neighbours.items()},
        "missing_probe_words": missing,
    }
    save_npy(Path(p.paths.embeddings) / "words.npy", matrix)
    write_metrics(Path(p.paths.metrics) / "embeddings.json", metrics)
    detail = (f"{extra['training_pairs']:,} pairs, loss {extra['final_loss']:.3f}" if method == "skipgram"
              else f"{extra['words_found']:,} words found")
    print(f"embeddings: {method} {matrix.shape[0]:,}x{matrix.shape[1]} ({detail}) -> {p.paths.embeddings}")
    return metrics


def main() -> None:
    entry(lambda: run(load_params()))


if __name__ == "__main__":
    main()
