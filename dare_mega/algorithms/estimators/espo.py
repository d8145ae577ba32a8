"""ESPO (ELBO-based sequence-level PO): stratified whole-response masked counts, a sequence-level PPO clip."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_mega.algorithms.estimators.base import (
    Estimator,
    Rows,
    new_stats,
    register,
    stratified_counts,
    track_ratio,
)
from dare_mega.algorithms.policy import dual_clip_pg, kl_penalty


@dataclass(frozen=True)
class ESPOOptions:
    mc: int = 2  # draws per sample (DARE: mc_num = 2)
    reduce_var: bool = True  # a complementary row per draw (DARE's default)


@register
class ESPO(Estimator):
    """M rows with masked counts x in {0..L} stratified over the sample's draws (DARE stratifies over the
    samples of a worker batch), p = x / (L + 1); with `reduce_var` a complementary row per draw,
    ELBO = (sum_masked log p / p + sum_complement log p / (L / (L + 1) - p)) / 2; the sequence ELBO is the
    mean over the M draws, and the quantity is ELBO / L. Loss: sequence-level PPO clip on exp(q - q_old), the
    mean over samples; KL (DARE's `compute_espo_kl`) on the raw ELBO, ELBO - ELBO_ref = L (q - q_ref), then
    divided by L (k2 by default)."""

    name = "espo"
    level = "sequence"
    Options = ESPOOptions
    default_kl = "k2"

    def describe(self, block_diffusion: bool) -> str:
        extra = (" (on block diffusion each block's masks are seen with the clean earlier blocks)"
                 if block_diffusion else "")
        return "espo: %d stratified whole-response draws per sample%s" % (self.options.mc, extra)

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        for i, s in enumerate(samples):
            generator = generators[i]
            L = s.length
            response = s.response()
            k = int(torch.randint(0, L + 1, (), generator=generator))
            entries = []
            for x in stratified_counts(k, L + 1, self.options.mc, low=0):
                order = torch.randperm(L, generator=generator).tolist()
                masked = sorted(response[j] for j in order[:x])
                complement = sorted(response[j] for j in order[x:])
                p = x / (L + 1)
                first = rows.add(i, s.clean(), masked, self.mask_id)
                second = rows.add(i, s.clean(), complement, self.mask_id) if self.options.reduce_var else None
                entries.append((first, masked, p, second, complement, L / (L + 1) - p))
            plan.append((entries, L))
        return rows, plan

    def quantities(self, logp, plan):
        out = []
        for entries, L in plan:
            values = []
            for first, masked, p, second, complement, q in entries:
                elbo = logp[first, masked].sum() / p if masked else logp.new_zeros(())
                if second is not None:
                    rest = logp[second, complement].sum() / q if complement else logp.new_zeros(())
                    elbo = 0.5 * (elbo + rest)
                values.append(elbo)
            out.append(torch.stack(values).mean() / L)
        return out

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        stats = new_stats()
        total = q[0].new_zeros(()) if q else torch.zeros(())
        for i, s in enumerate(samples):
            adv = torch.tensor(s.advantage, dtype=q[i].dtype, device=q[i].device)
            ratio = torch.exp(q[i] - q_old[i])
            track_ratio(stats, ratio)
            value, clipped = dual_clip_pg(ratio, adv, cfg.eps_low, cfg.eps_high, None)
            if q_ref is not None and cfg.kl_coef:
                kl = kl_penalty(s.length * (q[i] - q_ref[i]), cfg.kl(self)) / s.length
                value = value + cfg.kl_coef * kl
                stats["kl"] += float(kl)
            total = total + value / totals.samples
            stats["clipped"] += float(clipped)
            stats["units"] += 1
        return total, stats
