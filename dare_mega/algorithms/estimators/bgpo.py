"""BGPO (boundary-guided PO): stratified whole-response masks, a linear lower bound for positive advantages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_mega.algorithms.estimators.base import (
    Estimator,
    Rows,
    masked_subset,
    new_stats,
    register,
    stratified_counts,
    track_ratio,
)
from dare_mega.algorithms.policy import LOSS_AGGREGATIONS, aggregation_weights, dual_clip_pg, kl_penalty
from dare_mega.config import choices


@dataclass(frozen=True)
class BGPOOptions:
    mc: int = 16  # rows per sample (DARE: mc_num = n_l = 16)
    # the sample's value is every one of its tokens' value; token-mean (DARE) weighs longer answers more
    loss_agg: str = field(default="token-mean", metadata=choices(*LOSS_AGGREGATIONS))


@register
class BGPO(Estimator):
    """mc rows with stratified masked counts x_j in 1..L over the whole response (not per block), p_j = x_j / L;
    l_j = (sum over masked of log p / p_j) / L. Loss per row: ratio 1 + (l_j - l_j_old) for A > 0 (the linear
    bound), exp(l_j - l_j_old) otherwise, dual-clip PPO, the mean over rows; KL (optional) per row on
    l_j - l_j_ref, the same way."""

    name = "bgpo"
    level = "sequence"
    Options = BGPOOptions

    def describe(self, block_diffusion: bool) -> str:
        return "bgpo: %d stratified whole-response masks per sample%s" % (
            self.options.mc, " (each block scored with the clean earlier blocks)" if block_diffusion else "")

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        for i, s in enumerate(samples):
            generator = generators[i]
            response = s.response()
            entries = []
            k = int(torch.randint(1, s.length + 1, (), generator=generator))
            for x in stratified_counts(k, s.length, self.options.mc, low=1):
                masked = masked_subset(response, x, generator)
                entries.append((rows.add(i, s.clean(), masked, self.mask_id), masked, x / s.length))
            plan.append((entries, s.length))
        return rows, plan

    def quantities(self, logp, plan):
        return [torch.stack([logp[row, masked].sum() / p / length for row, masked, p in entries])
                for entries, length in plan]

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        stats = new_stats()
        total = q[0].new_zeros(()) if q else torch.zeros(())
        scales = [float(w.sum()) for w in aggregation_weights(self.options.loss_agg, samples, totals)]
        for i, s in enumerate(samples):
            adv = torch.tensor(s.advantage, dtype=q[i].dtype, device=q[i].device)
            delta = q[i] - q_old[i]
            ratio = 1 + delta if s.advantage > 0 else torch.exp(delta)
            track_ratio(stats, ratio)
            pg, clipped = dual_clip_pg(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
            value = pg.mean()
            if q_ref is not None and cfg.kl_coef:
                kl = kl_penalty(q[i] - q_ref[i], cfg.kl(self)).mean()
                value = value + cfg.kl_coef * kl
                stats["kl"] += float(kl)
            total = total + value * scales[i]
            stats["clipped"] += float(clipped.float().mean())
            stats["units"] += 1
        return total, stats
