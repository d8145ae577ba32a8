"""Coupled-GRPO (DiffuCoder): complementary masks, every response token masked exactly once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_mega.algorithms.estimators.base import Estimator, Rows, new_stats, register
from dare_mega.algorithms.policy import LOSS_AGGREGATIONS, aggregation_weights, token_ppo_loss
from dare_mega.config import choices


@dataclass(frozen=True)
class CoupledOptions:
    t_min: float = 0.2
    t_max: float = 0.8
    loss_agg: str = field(default="token-mean", metadata=choices(*LOSS_AGGREGATIONS))  # DARE, DiffuCoder


@register
class Coupled(Estimator):
    """Three rows per sample: the response fully masked (a), masked where u_i < t (b), and the complement (c),
    t ~ U(t_min, t_max); l_i = (a_i + 1[i in S] b_i / t + 1[i not in S] c_i / (1 - t)) / 2. Loss: token-level
    dual-clip PPO, aggregated by `loss_agg`."""

    name = "coupled"
    Options = CoupledOptions

    def describe(self, block_diffusion: bool) -> str:
        extra = (" (on block diffusion each block's masks are seen with the clean earlier blocks)"
                 if block_diffusion else "")
        return "coupled: full mask + complementary masks at t ~ U(%g, %g)%s" % (self.options.t_min,
                                                                              self.options.t_max, extra)

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        low, high = self.options.t_min, self.options.t_max
        for i, s in enumerate(samples):
            generator = generators[i]
            t = low + (high - low) * float(torch.rand((), generator=generator))
            u = torch.rand(s.length, generator=generator)
            response = s.response()
            chosen = [p for p, x in zip(response, u) if x < t]
            rest = [p for p, x in zip(response, u) if x >= t]
            clean = s.clean()
            a = rows.add(i, clean, response, self.mask_id)
            b = rows.add(i, clean, chosen, self.mask_id)
            c = rows.add(i, clean, rest, self.mask_id)
            plan.append((a, b, c, response, (u < t), t))
        return rows, plan

    def quantities(self, logp, plan):
        out = []
        for a, b, c, positions, in_s, t in plan:
            in_s = in_s.to(logp.device)
            la, lb, lc = logp[a, positions], logp[b, positions], logp[c, positions]
            out.append(0.5 * (la + torch.where(in_s, lb / t, lc / (1 - t))))
        return out

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        stats = new_stats()
        weights = aggregation_weights(self.options.loss_agg, samples, totals)
        return token_ppo_loss(self, q, q_old, samples, cfg, weights, stats, q_ref), stats
