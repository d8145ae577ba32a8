"""Moving weights from the trainer's Megatron shards to a rollout engine (in process for the native engine)."""
