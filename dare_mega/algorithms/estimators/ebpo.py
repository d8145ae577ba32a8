"""EBPO (ELBO-based block PO, LLaDA2.1): stratified per-block noise, a composite ELBO, one clip in log space."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dare_mega.algorithms.estimators.base import Estimator, Rows, masked_subset, new_stats, register, track_ratio
from dare_mega.algorithms.policy import kl_penalty


@dataclass(frozen=True)
class EBPOOptions:
    mc: int = 16  # rows per sample (DARE: mc_num = n_l = 16)


def ebpo_counts(offset: float, block_lengths: list[int], rows: int) -> list[list[int]]:
    """EBPO's masked counts, [row][block]: cell (n, b) has noise level nu = (offset + (n B + b) / (rows B)) mod 1
    and masks min(floor(nu |b|) + 1, |b|) tokens; with offset ~ U(0, 1) each cell's count is uniform on 1..|b|."""
    cells = rows * len(block_lengths)
    out = []
    for n in range(rows):
        counts = []
        for b, size in enumerate(block_lengths):
            nu = (offset + (n * len(block_lengths) + b) / cells) % 1.0
            counts.append(min(int(nu * size) + 1, size))
        out.append(counts)
    return out


@register
class EBPO(Estimator):
    """N rows; in every block b of row n, c = min(floor(nu |b|) + 1, |b|) tokens masked (p = c / |b|);
    E = (1/N) sum_n sum_b sum_masked log p / p (no length normalisation). Loss: r = exp(E - E_old) clipped once
    in log space (min(log r, log(1 + eps_high)) for A >= 0, max(log r, log(1 - eps_low)) for A < 0),
    -A exp(clipped), the mean over samples; KL (optional) on E - E_ref."""

    name = "ebpo"
    level = "sequence"
    Options = EBPOOptions
    # one noise level per block is block diffusion's ELBO; on a model that sees the whole sequence the blocks'
    # masks condition each other and the sum is no ELBO of it (DARE runs EBPO on SDAR and LLaDA2 only)
    masked_diffusion = False

    def describe(self, block_diffusion: bool) -> str:
        return "ebpo: composite ELBO over %d stratified per-block masks per sample" % self.options.mc

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        mc = self.options.mc
        for i, s in enumerate(samples):
            generator = generators[i]
            blocks = s.blocks()
            offset = float(torch.rand((), generator=generator))
            entries = []
            for counts in ebpo_counts(offset, [len(b) for b in blocks], mc):
                masked, weights = [], []
                for positions, count in zip(blocks, counts):
                    chosen = masked_subset(positions, count, generator)
                    masked += chosen
                    weights += [len(positions) / count] * count
                entries.append((rows.add(i, s.clean(), masked, self.mask_id), masked, torch.tensor(weights)))
            plan.append((entries, mc))
        return rows, plan

    def quantities(self, logp, plan):
        return [sum((logp[row, masked] * w.to(logp.device)).sum() for row, masked, w in entries) / mc
                for entries, mc in plan]

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        stats = new_stats()
        total = q[0].new_zeros(()) if q else torch.zeros(())
        for i, s in enumerate(samples):
            adv = torch.tensor(s.advantage, dtype=q[i].dtype, device=q[i].device)
            log_ratio = q[i] - q_old[i]
            track_ratio(stats, torch.exp(log_ratio))
            bound = math.log(1 + cfg.eps_high) if s.advantage >= 0 else math.log(1 - cfg.eps_low)
            clipped_log = torch.minimum(log_ratio, log_ratio.new_tensor(bound)) if s.advantage >= 0 else \
                torch.maximum(log_ratio, log_ratio.new_tensor(bound))
            value = -adv * torch.exp(clipped_log)
            if q_ref is not None and cfg.kl_coef:
                kl = kl_penalty(q[i] - q_ref[i], cfg.kl(self))
                value = value + cfg.kl_coef * kl
                stats["kl"] += float(kl)
            total = total + value / totals.samples
            stats["clipped"] += float(clipped_log != log_ratio)
            stats["units"] += 1
        return total, stats
