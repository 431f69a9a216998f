"""capline: a DAG training pipeline for image captioning and sequence models."""
