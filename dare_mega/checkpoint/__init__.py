"""Checkpoints: streaming safetensors I/O, HF weights into Megatron shards (and, later, torch_dist)."""
