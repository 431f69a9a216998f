"""Word embeddings: skip-gram trained here, or GloVe aligned to the vocabulary, and probes."""
