"""Rollout engines: the interface the RL loop talks to, and the native block-diffusion engine.

    engine.generate(prompts, SamplingParams(...)) -> [Completion]   # ids, text, log-probs, reveal steps
    engine.load_weights(named_tensors, version)                     # HF-named tensors from weight sync
    engine.weight_version                                           # stamped on every Completion
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from dare_mega.rollout.types import POLICIES, Completion, SamplingParams


class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list, params: SamplingParams = ...) -> list[Completion]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int: ...


__all__ = ["POLICIES", "Completion", "RolloutEngine", "SamplingParams"]
