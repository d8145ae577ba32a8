"""d1 / diffu-GRPO: the one-step mean-field estimator."""

from __future__ import annotations

from dataclasses import dataclass, field

from dare_mega.algorithms.estimators.base import Estimator, Rows, masked_prompt, new_stats, register
from dare_mega.algorithms.policy import LOSS_AGGREGATIONS, aggregation_weights, token_ppo_loss
from dare_mega.config import choices


@dataclass(frozen=True)
class D1Options:
    prompt_mask: float = 0.15  # probability of masking each prompt token (DARE's hard-coded p=0.15)
    loss_agg: str = field(default="token-mean", metadata=choices(*LOSS_AGGREGATIONS))  # DARE, d1: token-mean


@register
class OneStep(Estimator):
    """One row per sample: the whole response masked, prompt tokens masked with probability `prompt_mask`; one
    forward gives log p(y_i | prompt, all masked) per response token. Loss: token-level dual-clip PPO,
    aggregated by `loss_agg`."""

    name = "d1"
    Options = D1Options

    def describe(self, block_diffusion: bool) -> str:
        if block_diffusion:
            return ("d1 on block diffusion: every response token masked in the noisy stream; each block sees "
                    "itself fully masked and the clean stream's earlier blocks, so token i's log-prob is "
                    "log p(y_i | prompt, clean earlier blocks, its block masked): a per-block one-step "
                    "estimate, not the masked model's mean field over the whole response")
        return "d1: every response token masked, prompt tokens with p=%g; one forward" % self.options.prompt_mask

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        for i, s in enumerate(samples):
            prompt = masked_prompt(s, self.options.prompt_mask, generators[i])
            row = rows.add(i, s.clean(), prompt + s.response(), self.mask_id)
            plan.append((row, s.response()))
        return rows, plan

    def quantities(self, logp, plan):
        return [logp[row, positions] for row, positions in plan]

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        stats = new_stats()
        weights = aggregation_weights(self.options.loss_agg, samples, totals)
        return token_ppo_loss(self, q, q_old, samples, cfg, weights, stats, q_ref), stats
