"""Training: the trainer, its data, the exact-model conversion, training-set tools."""
