"""Checkpoint in: config.json -> ModelConfig, weight files -> the model's runtime tensors, the tokenizer."""
