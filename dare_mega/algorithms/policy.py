"""Advantages and policy losses over estimator quantities (pure torch; formulas in docs/algorithms.md).

`policy_loss` returns the loss whose gradient the trainer applies, as a differentiable function of the
estimator's quantities, plus the numbers worth logging (clip fraction, KL, importance weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, groups: list[int], kind: str = "grpo", std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages within groups of completions of one prompt.

    grpo: (r - mean of the group) / (std of the group + eps) (std_normalize=False keeps the difference);
    rloo: r - mean of the other members of the group (leave-one-out)."""
    rewards = rewards.double()
    out = torch.zeros_like(rewards)
    ids = torch.tensor(groups)
    for g in ids.unique():
        idx = torch.nonzero(ids == g)[:, 0]
        r = rewards[idx]
        if kind == "rloo":
            n = len(idx)
            out[idx] = r - (r.sum() - r) / max(n - 1, 1) if n > 1 else torch.zeros_like(r)
        elif kind == "grpo":
            centered = r - r.mean()
            out[idx] = centered / (r.std(unbiased=False) + eps) if std_normalize else centered
        else:
            raise ValueError(f"advantage kind {kind!r}: expected 'grpo' or 'rloo'")
    return out.float()


def kl_penalty(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(pi || ref) estimators on delta = log pi - log ref: k1 = delta, k2 = delta^2 / 2,
    k3 = exp(-delta) - 1 + delta (non-negative, low variance). DARE's Taylor substitution log(1 + delta) for
    positive advantages is not applied (it is NaN for delta <= -1)."""
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta.pow(2)
    if kind == "k3":
        return torch.exp(-delta) - 1 + delta
    raise ValueError(f"kl kind {kind!r}: expected k1, k2 or k3")


def dual_clip_pg(ratio: torch.Tensor, advantage: torch.Tensor, eps_low: float, eps_high: float, dual: float | None):
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); for A < 0 also capped at -A * dual."""
    pg = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual is not None:
        pg = torch.where(advantage < 0, torch.minimum(pg, -advantage * dual), pg)
    clipped = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)
    return pg, clipped


@dataclass(frozen=True)
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    tis_cap: float | None = 2.0  # truncated importance weight for rollout/train mismatch (None: off)
    spg_mix: float = 0.5  # SPG: weight of the EUBO for negative advantages (1.0: EUBO only)


def policy_loss(estimator, q, q_old, samples, cfg: LossConfig, total_samples: int, q_ref=None, q_rollout=None,
                total_length: int | None = None):
    """The loss of this rank's samples, normalised by the global number of samples (sum over ranks = mean).

    SPG weighs each sequence by its length: sum_seq (-A logp_seq |y|) / sum |y| (`total_length`, global)."""
    stats = {"clipped": 0.0, "units": 0.0, "kl": 0.0, "tis_mean": 0.0, "tis_truncated": 0.0, "tis_tokens": 0.0,
             "rollout_gap": 0.0, "ratio_max_dev": 0.0}

    def track(ratio):
        if ratio.numel():
            stats["ratio_max_dev"] = max(stats["ratio_max_dev"], float((ratio.detach() - 1).abs().max()))

    total = q[0].new_zeros(()) if q else torch.zeros(())
    weights = estimator.token_weights(samples) if estimator.level == "token" else None
    for i, s in enumerate(samples):
        adv = torch.tensor(s.advantage, dtype=q[i].dtype, device=q[i].device)
        if estimator.name == "spg":
            elbo, eubo = q[i][0], q[i][1]
            logp_seq = elbo if s.advantage > 0 else cfg.spg_mix * eubo + (1 - cfg.spg_mix) * elbo
            scale = s.length * total_samples / total_length if total_length else 1.0
            loss = -adv * logp_seq * scale
            stats["units"] += 1
        elif estimator.level == "token":
            ratio = torch.exp(q[i] - q_old[i])
            track(ratio)
            pg, clipped = dual_clip_pg(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
            if q_rollout is not None and q_rollout[i] is not None and cfg.tis_cap is not None:
                gap = q_old[i] - q_rollout[i]
                tis = torch.exp(gap).clamp(max=cfg.tis_cap)
                pg = pg * tis
                stats["tis_mean"] += float(tis.sum())
                stats["tis_truncated"] += float((torch.exp(gap) > cfg.tis_cap).sum())
                stats["tis_tokens"] += len(tis)
                stats["rollout_gap"] += float(gap.abs().sum())
            w = weights[i].to(pg.device, pg.dtype)
            loss = (w * pg).sum()
            stats["clipped"] += float((w * clipped.to(w.dtype)).sum())
            stats["units"] += 1
            if q_ref is not None and cfg.kl_coef:
                kl = (w * kl_penalty(q[i] - q_ref[i], cfg.kl_kind)).sum()
                loss = loss + cfg.kl_coef * kl
                stats["kl"] += float(kl)
        elif estimator.name == "bgpo":
            delta = q[i] - q_old[i]
            ratio = 1 + delta if s.advantage > 0 else torch.exp(delta)
            track(ratio)
            pg, clipped = dual_clip_pg(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
            loss = pg.mean()
            stats["clipped"] += float(clipped.float().mean())
            stats["units"] += 1
        elif estimator.name == "ebpo":
            log_ratio = q[i] - q_old[i]
            track(torch.exp(log_ratio))
            bound = math.log(1 + cfg.eps_high) if s.advantage >= 0 else math.log(1 - cfg.eps_low)
            clipped_log = torch.minimum(log_ratio, log_ratio.new_tensor(bound)) if s.advantage >= 0 else \
                torch.maximum(log_ratio, log_ratio.new_tensor(bound))
            loss = -adv * torch.exp(clipped_log)
            stats["clipped"] += float(clipped_log != log_ratio)
            stats["units"] += 1
        else:  # espo: sequence-level PPO clip on the normalised ELBO
            ratio = torch.exp(q[i] - q_old[i])
            track(ratio)
            loss, clipped = dual_clip_pg(ratio, adv, cfg.eps_low, cfg.eps_high, None)
            stats["clipped"] += float(clipped)
            stats["units"] += 1
        if estimator.level == "sequence" and q_ref is not None and cfg.kl_coef:
            kl = kl_penalty((q[i] - q_ref[i]).mean(), cfg.kl_kind)
            loss = loss + cfg.kl_coef * kl
            stats["kl"] += float(kl)
        total = total + loss
    return total / total_samples, stats
