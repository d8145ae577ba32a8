"""Launching on clusters: Ray placement of trainer ranks and rollout engines (torchrun needs nothing here)."""
