"""Neural network modules: image encoders, captioners and language models."""
