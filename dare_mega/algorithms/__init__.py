"""RL and SFT objectives, estimators and losses (pure tensor functions) and the Megatron policy update."""
