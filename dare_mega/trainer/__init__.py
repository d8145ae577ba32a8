"""The SFT and RL trainers: configs, checkpoints, metrics and the loops."""
