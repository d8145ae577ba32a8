"""One policy update on Megatron for any estimator, with exact gradients of any loss.

  rows   = estimator.rows(samples)                  # noisy/clean rows, noise from the step's generator
  lp_old = log p(clean | rows)  on Megatron         # forward only, vocab-parallel, any TP/PP/EP
  q_old  = estimator.quantities(lp_old)             # per token or per sequence
  loss   = estimator.loss(q(lp), q_old, ...)        # ratios, clipping, KL, importance weights
  c      = d loss / d lp                            # autograd on a [rows, length] tensor
  backward of sum(c * log p) on Megatron            # the same gradient as d loss / d theta, exactly

The first update after a synchronous rollout has ratio exactly 1 (lp = lp_old); later epochs over the
same rollout (`epochs` > 1) draw fresh noise (estimators whose rows are noise) and compare the updated
policy with the old quantities of their own rows, all taken under the weights that sampled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dare_mega.algorithms.estimators import Rows, Sample, Totals, build
from dare_mega.algorithms.layout import PackedBatch, lay_out
from dare_mega.algorithms.policy import LossConfig
from dare_mega.data.packing import pack_lengths
from dare_mega.models.routing import mismatch_counts, record_megatron_routing
from dare_mega.models.runner import Batch


def rows_to_batch(rows: Rows, block_size: int, multiple: int = 1, row_multiple: int = 1,
                  pack_tokens: int | None = None, at_least: tuple[int, int] = (0, 0),
                  two_stream: bool = True) -> PackedBatch:
    """Lay the rows out in the two-stream layout (block diffusion), or as the noisy stream alone with
    bidirectional attention within each row (`two_stream=False`: masked diffusion). With `pack_tokens`, rows
    are packed first-fit-decreasing
    into sequences of up to max(pack_tokens, longest row) tokens per stream (each row its own piece, with
    positions from 0, so no row sees another); without it each row is one sequence, padded to the longest.
    Lengths are rounded up to a multiple of `multiple` (sequence parallelism); empty sequences are added up to
    a multiple of `row_multiple`. `at_least` = (sequences, length) pads further, so that every rank runs the
    same number of micro-batches of one length (expert-parallel all-to-alls span data-parallel ranks)."""
    lengths = [len(r) for r in rows.clean]
    bins = pack_lengths(lengths, max(pack_tokens or 0, *lengths), "ffd" if pack_tokens else "none")
    return lay_out(rows.noisy, rows.clean, bins, block_size, min_length=at_least[1], multiple=multiple,
                   min_rows=at_least[0], row_multiple=row_multiple, two_stream=two_stream)


def two_stream(runner) -> bool:
    """Whether the runner's model trains on [x_t ; x_0] rows (block diffusion) or on x_t alone (masked
    diffusion: every position attends to the whole sequence)."""
    return runner.args.diffusion.attention != "full"


def noisy_log_probs(runner, rows: PackedBatch, micro_batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(clean token) in each estimator row's noisy stream: [estimator rows, width]."""
    return rows.unpack(runner.token_log_probs(rows.batch, micro_batch_size, temperature)[:, : rows.stream].float().cpu())


def _max_over_ranks(shape: tuple[int, int]) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return shape
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(shape, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]), int(t[1])


@dataclass
class Prepared:
    """One epoch's rows, laid out, with what the loss compares against: the old quantities (under the weights
    that sampled), the reference's and the rollout's."""

    laid: PackedBatch
    plan: object
    q_old: list
    q_ref: list | None
    q_rollout: list | None
    lp: torch.Tensor | None = None  # the old pass's log-probs: the current ones until the first update


def prepare(runner, estimator, samples, generators: list[torch.Generator], cfg: LossConfig, micro_batch_size: int = 1,
            ref_runner=None, sp_multiple: int = 1, temperature: float = 1.0, q_old=None, engine_routing=None,
            pack_tokens: int | None = None, replay: bool = False, log_mismatch: bool = True) -> tuple[Prepared, dict]:
    """Rows from `generators`, laid out at one shape on every rank, and the forward-only passes: the old
    quantities (unless given, or the estimator compares with nothing), the reference's (with a KL), the
    rollout's log-probs (when the estimator uses them). `engine_routing(batch)` (MoE): the rollout engine's
    experts for the rows; with `replay` every forward of these rows routes as the engine did, and with
    `log_mismatch` the old pass counts the (token, layer) pairs whose experts differ. Returns (prepared,
    routing stats)."""
    rows, plan = estimator.rows(samples, generators)
    streams = two_stream(runner)
    laid = rows_to_batch(rows, samples[0].block_size, sp_multiple, micro_batch_size, pack_tokens, two_stream=streams)
    shape = _max_over_ranks((laid.batch.size, laid.stream))
    if shape != (laid.batch.size, laid.stream):
        laid = rows_to_batch(rows, samples[0].block_size, sp_multiple, micro_batch_size, pack_tokens, shape,
                             two_stream=streams)
    if replay and engine_routing is None:
        raise ValueError("prepare(replay=True) needs engine_routing: the experts to replay")
    routing, lp, engine = {}, None, None
    if engine_routing is not None and runner.args.moe and (replay or log_mismatch):
        engine = engine_routing(laid.batch)
        if replay:
            laid.batch.experts = engine
    if q_old is None and estimator.uses_old:
        if engine is not None and log_mismatch:
            with record_megatron_routing(runner.chunks) as record:
                lp = noisy_log_probs(runner, laid, micro_batch_size, temperature)
            counted = torch.zeros(laid.batch.size, laid.batch.seq_len, dtype=torch.bool)  # noisy streams of rows
            counted[:, : laid.stream] = laid.pack(torch.ones(len(laid.places), laid.width)).bool()
            differ, total = mismatch_counts(record, engine, counted, micro_batch_size)
            routing.update(router_differ=differ, router_tokens=total)
        else:
            lp = noisy_log_probs(runner, laid, micro_batch_size, temperature)
        q_old = [q.detach() for q in estimator.quantities(lp, plan)]
    q_ref = None
    if ref_runner is not None and cfg.kl_coef:
        ref_lp = noisy_log_probs(ref_runner, laid, micro_batch_size, temperature)
        q_ref = [q.detach() for q in estimator.quantities(ref_lp, plan)]
    q_rollout = None
    if "rollout_logprobs" in estimator.needs:
        q_rollout = [torch.tensor(s.rollout_logprobs) if s.rollout_logprobs is not None else None for s in samples]
    return Prepared(laid, plan, q_old, q_ref, q_rollout, lp), routing


def policy_gradient(runner, estimator, samples, prepared: Prepared, cfg: LossConfig, totals: Totals,
                    micro_batch_size: int = 1, temperature: float = 1.0, unchanged: bool = False) -> dict:
    """Gradients of the estimator's loss into the model's main_grad (no optimizer step), exactly:
    lp under the current weights (forward-only; `unchanged`: the weights are those of the old pass, whose lp
    is reused), c = d loss / d lp, then backward of sum(c * log p)."""
    laid, plan = prepared.laid, prepared.plan
    if unchanged and prepared.lp is not None:
        lp = prepared.lp
    else:
        lp = noisy_log_probs(runner, laid, micro_batch_size, temperature)
    leaf = lp.detach().clone().requires_grad_(True)
    q = estimator.quantities(leaf, plan)
    q_old = prepared.q_old if prepared.q_old is not None else [v.detach() for v in q]
    loss, stats = estimator.loss(q, q_old, samples, cfg, totals, prepared.q_ref, prepared.q_rollout)
    coef = torch.autograd.grad(loss, leaf, allow_unused=True)[0] if loss.requires_grad else None
    if coef is None:
        coef = torch.zeros_like(leaf)
    batch = laid.batch
    weights = -laid.pack(coef)  # on the noisy stream; the clean stream (block diffusion) carries none
    weights = torch.cat([weights, torch.zeros(batch.size, batch.seq_len - laid.stream)], dim=1)
    surrogate = Batch(batch.input_ids, batch.position_ids, batch.mask, batch.labels, loss_weights=weights,
                      loss_normalizer=torch.zeros(batch.size, dtype=torch.long), experts=batch.experts)
    runner.loss_and_grads(surrogate, micro_batch_size, temperature)
    stats.update(loss=float(loss.detach()), rows=len(laid.places), packed_rows=batch.size,
                 padding=1.0 - sum(p[2] for p in laid.places) / (batch.size * laid.stream))
    return stats


def policy_update(runner, optimizer, estimator, samples, noise, cfg: LossConfig, totals: Totals,
                  micro_batch_size: int = 1, epochs: int = 1, ref_runner=None, sp_multiple: int = 1,
                  temperature: float = 1.0, engine_routing=None, pack_tokens: int | None = None,
                  replay: bool = False, log_mismatch: bool = True) -> dict:
    """Update the policy on this rank's samples: `epochs` optimizer steps over the same rollout. `noise(epoch)`
    gives the per-sample generators of an epoch: an estimator whose rows are noise draws a fresh mask set per
    epoch (DARE's inner iterations, ESPO's mu), and every epoch's old quantities are taken first, under the
    weights that sampled, so the ratio of a later epoch compares the updated policy with the one that
    sampled on that epoch's own masks. With `replay`, every forward routes as the engine did
    (`engine_routing`, per epoch's rows). Returns the loss (this rank's share) and statistics.

    `temperature` divides the logits of every likelihood (1.0: raw logits, DARE's block-diffusion actors)."""
    clock = time.perf_counter()
    draws = epochs if estimator.random_rows else 1
    prepared, routing = [], {}
    for epoch in range(draws):
        p, r = prepare(runner, estimator, samples, noise(epoch), cfg, micro_batch_size, ref_runner, sp_multiple,
                       temperature, engine_routing=engine_routing, pack_tokens=pack_tokens, replay=replay,
                       log_mismatch=log_mismatch and epoch == 0)
        prepared.append(p)
        routing = routing or r
    seconds_logprob = time.perf_counter() - clock
    stats = {}
    for epoch in range(epochs):
        optimizer.zero_grad()
        stats = policy_gradient(runner, estimator, samples, prepared[epoch % draws], cfg, totals, micro_batch_size,
                                temperature, unchanged=epoch == 0)
        ok, grad_norm, _ = optimizer.step()
        stats.update(grad_norm=float(grad_norm) if grad_norm is not None else None, skipped=not ok)
    return stats | routing | {"seconds_logprob": seconds_logprob}


def replay_log_probs(runner, completion, mask_token_id: int, micro_batch_size: int | None = None,
                     pack_tokens: int | None = None) -> list[float]:
    """The training-side log-prob of each generated token of a Completion, via a Runner (any layout).

    A rollout decodes block by block; the token at position p was revealed at denoising step s of its block,
    conditioned on the clean earlier blocks and on the tokens of its block revealed before s. The trajectory
    estimator's rows (one per step index, TraceRL / DARE) show each noisy block as it was at step s next to
    the clean earlier blocks, so one forward gives every token's log-prob; the check that this gives the
    rollout's log-probs back covers the code the trainer runs."""
    sample = Sample(completion.prompt_ids, completion.generated_ids, completion.generated_reveal_steps,
                    completion.block_size, masked_diffusion=not two_stream(runner))
    estimator = build("trajectory", mask_token_id)
    rows, plan = estimator.rows([sample], [torch.Generator()])
    # sequence parallelism splits each stream's tokens over the tensor-parallel ranks
    laid = rows_to_batch(rows, completion.block_size, multiple=_tensor_parallel_size(), pack_tokens=pack_tokens,
                         two_stream=not sample.masked_diffusion)
    log_probs = noisy_log_probs(runner, laid, micro_batch_size or laid.batch.size)
    return estimator.quantities(log_probs, plan)[0].tolist()


def _tensor_parallel_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
