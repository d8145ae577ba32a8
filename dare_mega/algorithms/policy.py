"""The pieces of RL losses that estimators share (pure torch; formulas in docs/algorithms.md): group
advantages, KL estimators, dual-clip PPO, truncated importance weights, verl's loss aggregations, and the
token-level PPO loss that d1, Coupled-GRPO and trajectory replay use. Each estimator's own loss lives in its
file (algorithms/estimators/)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def group_advantages(rewards: torch.Tensor, groups: list[int], kind: str = "grpo", std_normalize: bool = True,
                     eps: float = 1e-6, std: str = "unbiased", group_of_one: str = "reward") -> torch.Tensor:
    """Per-sample advantages within groups of completions of one prompt.

    grpo: (r - mean of the group) / (std of the group + eps) (std_normalize=False keeps the difference), std
    `unbiased` (n - 1, as torch.std, verl and DARE) or `population` (n);
    rloo: r - mean of the other members of the group (leave-one-out).
    A group of one has no baseline: `reward` gives r (verl: mean 0, std 1), `zero` gives 0."""
    if std not in ("unbiased", "population"):
        raise ValueError(f"std {std!r}: expected 'unbiased' or 'population'")
    if group_of_one not in ("reward", "zero"):
        raise ValueError(f"group_of_one {group_of_one!r}: expected 'reward' or 'zero'")
    rewards = rewards.double()
    out = torch.zeros_like(rewards)
    ids = torch.tensor(groups)
    for g in ids.unique():
        idx = torch.nonzero(ids == g)[:, 0]
        r = rewards[idx]
        if len(idx) == 1:
            out[idx] = r if group_of_one == "reward" else torch.zeros_like(r)
        elif kind == "rloo":
            out[idx] = r - (r.sum() - r) / (len(idx) - 1)
        elif kind == "grpo":
            centered = r - r.mean()
            out[idx] = centered / (r.std(unbiased=std == "unbiased") + eps) if std_normalize else centered
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
    """What every estimator's loss shares (the `algorithm` section); an estimator's own settings are its
    Options."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_kind: str = "auto"  # k1 | k2 | k3 | auto (the estimator's default: DARE's, k2 for ESPO, else k3)
    tis_cap: float | None = 2.0  # truncated importance weight for rollout/train mismatch (None: off)

    def kl(self, estimator) -> str:
        return estimator.default_kl if self.kl_kind == "auto" else self.kl_kind


def aggregation_weights(kind: str, samples, totals) -> list[torch.Tensor]:
    """Per-token weights whose sum over data-parallel ranks of sum(w * x) is verl's `loss_agg_mode` of x over
    the global batch: token-mean (every token of the batch alike: longer answers weigh more), seq-mean-token-mean
    (each sample's token mean, then the mean over samples), seq-mean-token-sum (each sample's token sum, then the
    mean over samples)."""
    if kind == "token-mean":
        return [torch.full((s.length,), 1.0 / max(totals.tokens, 1), dtype=torch.float64) for s in samples]
    if kind == "seq-mean-token-mean":
        return [torch.full((s.length,), 1.0 / max(s.length, 1) / totals.samples, dtype=torch.float64) for s in samples]
    if kind == "seq-mean-token-sum":
        return [torch.full((s.length,), 1.0 / totals.samples, dtype=torch.float64) for s in samples]
    raise ValueError(f"loss_agg {kind!r}: expected one of {', '.join(LOSS_AGGREGATIONS)}")


def token_ppo_loss(estimator, q, q_old, samples, cfg: LossConfig, weights, stats: dict, q_ref=None, q_rollout=None):
    """sum_i sum_t w_it [dual-clip PPO of exp(q - q_old), times the truncated importance weight
    min(exp(q_old - q_rollout), tis_cap) where rollout log-probs exist, + kl_coef KL(q || q_ref)]. Statistics
    count each sample's tokens alike (a per-sample clip fraction), whatever the weights."""
    from dare_mega.algorithms.estimators.base import track_ratio

    total = q[0].new_zeros(()) if q else torch.zeros(())
    for i, s in enumerate(samples):
        if not len(q[i]):
            continue
        adv = torch.tensor(s.advantage, dtype=q[i].dtype, device=q[i].device)
        ratio = torch.exp(q[i] - q_old[i])
        track_ratio(stats, ratio)
        pg, clipped = dual_clip_pg(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
        if q_rollout is not None and q_rollout[i] is not None and cfg.tis_cap is not None:
            gap = q_old[i] - q_rollout[i].to(q_old[i])
            tis = torch.exp(gap).clamp(max=cfg.tis_cap)
            pg = pg * tis
            stats["tis_mean"] += float(tis.sum())
            stats["tis_truncated"] += float((torch.exp(gap) > cfg.tis_cap).sum())
            stats["tis_tokens"] += len(tis)
            stats["rollout_gap"] += float(gap.abs().sum())
        w = weights[i].to(pg.device, pg.dtype)
        loss = (w * pg).sum()
        stats["clipped"] += float(clipped.to(pg.dtype).mean())
        stats["units"] += 1
        if q_ref is not None and cfg.kl_coef:
            kl = kl_penalty(q[i] - q_ref[i], cfg.kl(estimator))
            loss = loss + cfg.kl_coef * (w * kl).sum()
            stats["kl"] += float(kl.mean())
        total = total + loss
    return total
