"""Neural network modules: image encoders and captioners (see notes/issue3-interfaces.md), language models."""
