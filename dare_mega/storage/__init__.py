"""Files on disk that know nothing of models: safetensors checkpoints (headers, tensors, atomic sharded writes)."""
