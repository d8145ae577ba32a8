"""One policy update on Megatron for any estimator, with exact gradients of any loss.

  rows   = estimator.rows(samples)                  # two-stream rows, noise from the step's generator
  lp_old = log p(clean | rows)  on Megatron         # forward only, vocab-parallel, any TP/PP/EP
  q_old  = estimator.quantities(lp_old)             # per token or per sequence
  loss   = policy_loss(q(lp), q_old, advantages)    # ratios, clipping, KL, importance weights
  c      = d loss / d lp                            # autograd on a [rows, length] tensor
  backward of sum(c * log p) on Megatron            # the same gradient as d loss / d theta, exactly

The first update after a synchronous rollout has ratio exactly 1 (lp = lp_old); later epochs over the
same rollout (`epochs` > 1) recompute lp with the updated weights and the same noise.
"""

from __future__ import annotations

import torch

from dare_mega.algorithms.estimators import Rows
from dare_mega.algorithms.policy import LossConfig, policy_loss
from dare_mega.diffusion.masks import packed_position_ids, two_stream_inputs, two_stream_mask
from dare_mega.models.routing import mismatch_counts, record_megatron_routing
from dare_mega.models.runner import Batch


def rows_to_batch(rows: Rows, block_size: int, multiple: int = 1, row_multiple: int = 1) -> Batch:
    """Pad the rows to one length (a multiple of `multiple`, for sequence parallelism) in the two-stream layout;
    each row's padding is a separate sample that nothing attends to. Empty rows are added up to a multiple of
    `row_multiple` (the micro-batch size: Megatron's schedules want equal micro-batches)."""
    rows = Rows(list(rows.noisy), list(rows.clean), list(rows.sample))
    while len(rows.clean) % max(1, row_multiple):
        rows.noisy.append(torch.zeros(1, dtype=torch.long))
        rows.clean.append(torch.zeros(1, dtype=torch.long))
        rows.sample.append(-1)
    lengths = [len(r) for r in rows.clean]
    n = max(lengths)
    n += -n % max(1, multiple)
    noisy = torch.zeros(len(lengths), n, dtype=torch.long)
    clean = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, (a, b) in enumerate(zip(rows.noisy, rows.clean)):
        noisy[i, : len(a)], clean[i, : len(b)] = a, b
    positions = packed_position_ids([[length] for length in lengths], n)
    input_ids, position_ids = two_stream_inputs(noisy, clean, positions)
    return Batch(input_ids, position_ids, two_stream_mask(positions, block_size), labels=torch.cat([clean, clean], 1),
                 loss_weights=torch.zeros(len(lengths), 2 * n), loss_normalizer=torch.zeros(len(lengths), dtype=torch.long))


def noisy_log_probs(runner, batch: Batch, micro_batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    n = batch.seq_len // 2
    return runner.token_log_probs(batch, micro_batch_size, temperature)[:, :n].float().cpu()


def policy_gradient(runner, estimator, samples, generators: list[torch.Generator], cfg: LossConfig,
                    total_samples: int, total_length: int, micro_batch_size: int = 1, ref_runner=None,
                    sp_multiple: int = 1, temperature: float = 1.0, q_old=None, prepared=None, engine_routing=None):
    """Gradients of the policy loss into the model's main_grad (no optimizer step).

    `engine_routing(batch)` (MoE only): the rollout engine's experts for the rows, {layer: [B, S, topk]}; when
    given, stats get `router_differ` / `router_tokens` (models/routing.py) from the first forward.

    Returns (stats, prepared): `prepared` (rows, batch, plan, q_old, q_ref, q_rollout) lets further epochs over
    the same rollout reuse the noise and the old quantities."""
    if prepared is None:
        rows, plan = estimator.rows(samples, generators)
        batch = rows_to_batch(rows, samples[0].block_size, sp_multiple, micro_batch_size)
        routing = {}
        if engine_routing is not None and runner.args.moe:
            with record_megatron_routing(runner.chunks) as record:
                lp = noisy_log_probs(runner, batch, micro_batch_size, temperature)
            counted = torch.zeros(batch.size, batch.seq_len, dtype=torch.bool)  # the noisy stream of real rows
            for i, clean in enumerate(rows.clean):
                counted[i, : len(clean)] = rows.sample[i] >= 0
            differ, total = mismatch_counts(record, engine_routing(batch), counted, micro_batch_size)
            routing = {"router_differ": differ, "router_tokens": total}
        else:
            lp = noisy_log_probs(runner, batch, micro_batch_size, temperature)
        if q_old is None:
            q_old = [q.detach() for q in estimator.quantities(lp, plan)]
        q_ref = None
        if ref_runner is not None and cfg.kl_coef:
            ref_lp = noisy_log_probs(ref_runner, batch, micro_batch_size, temperature)
            q_ref = [q.detach() for q in estimator.quantities(ref_lp, plan)]
        q_rollout = None
        if estimator.name == "trajectory":
            q_rollout = [torch.tensor(s.rollout_logprobs) if s.rollout_logprobs is not None else None for s in samples]
    else:
        batch, plan, q_old, q_ref, q_rollout = prepared
        lp = noisy_log_probs(runner, batch, micro_batch_size, temperature)
        routing = {}
    leaf = lp.detach().clone().requires_grad_(True)
    q = estimator.quantities(leaf, plan)
    loss, stats = policy_loss(estimator, q, q_old, samples, cfg, total_samples, q_ref, q_rollout, total_length)
    coef = torch.autograd.grad(loss, leaf, allow_unused=True)[0] if loss.requires_grad else None
    if coef is None:
        coef = torch.zeros_like(leaf)
    surrogate = Batch(batch.input_ids, batch.position_ids, batch.mask, batch.labels,
                      loss_weights=torch.cat([-coef, torch.zeros_like(coef)], dim=1),
                      loss_normalizer=torch.zeros(batch.size, dtype=torch.long))
    runner.loss_and_grads(surrogate, micro_batch_size, temperature)
    stats.update(loss=float(loss.detach()), rows=batch.size, **routing)
    return stats, (batch, plan, q_old, q_ref, q_rollout)


def policy_update(runner, optimizer, estimator, samples, generators: list[torch.Generator], cfg: LossConfig,
                  total_samples: int, total_length: int, micro_batch_size: int = 1, epochs: int = 1,
                  ref_runner=None, sp_multiple: int = 1, temperature: float = 1.0, engine_routing=None) -> dict:
    """Update the policy on this rank's samples (`epochs` optimizer steps over the same rollout and noise);
    returns the loss (this rank's share) and statistics.

    Log-probs are taken at the rollout's sampling temperature, so that the policy trained is the one that
    sampled (and the rollout's own log-probs are comparable)."""
    prepared, stats, routing = None, {}, {}
    for _ in range(epochs):
        optimizer.zero_grad()
        stats, prepared = policy_gradient(runner, estimator, samples, generators, cfg, total_samples, total_length,
                                          micro_batch_size, ref_runner, sp_multiple, temperature, prepared=prepared,
                                          engine_routing=engine_routing if prepared is None else None)
        routing = routing or {k: stats[k] for k in ("router_differ", "router_tokens") if k in stats}
        ok, grad_norm, _ = optimizer.step()
        stats.update(grad_norm=float(grad_norm) if grad_norm is not None else None, skipped=not ok)
    return stats | routing
