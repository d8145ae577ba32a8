"""Checkpoints of models: Megatron torch_dist (save, load at any layout), export to HF, tiny checkpoints."""
