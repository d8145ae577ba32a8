"""A toy estimator written as a researcher would add one: this file only. Importing it registers it; the
project's update trains with it (tests/test_rl_objectives.py) without any other file knowing its name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_mega.algorithms.estimators.base import Estimator, Rows, new_stats, register


@dataclass(frozen=True)
class ToyOptions:
    scale: float = 1.0


@register
class MeanMasked(Estimator):
    """One row per sample with the response fully masked; q = mean log p of the response; loss
    sum -A scale q / samples (REINFORCE on a one-step likelihood)."""

    name = "toy_mean_masked"
    level = "sequence"
    Options = ToyOptions
    uses_old = False
    random_rows = False

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        for i, s in enumerate(samples):
            plan.append((rows.add(i, s.clean(), s.response(), self.mask_id), s.response()))
        return rows, plan

    def quantities(self, logp, plan):
        return [logp[row, positions].mean() for row, positions in plan]

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        stats = new_stats()
        total = sum(-s.advantage * self.options.scale * value for s, value in zip(samples, q)) / totals.samples
        stats["units"] = len(samples)
        return total if torch.is_tensor(total) else torch.zeros(()), stats
