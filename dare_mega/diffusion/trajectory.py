"""Replaying a rollout trajectory through the training layout: the log-probs RL optimises.

A rollout decodes block by block; the token at position p was revealed at denoising step s of its block,
conditioned on the clean earlier blocks and on the tokens of its own block revealed at steps < s. In the
two-stream layout [x_t ; x_0] a noisy block sees exactly that: itself and the clean blocks before it. So one
row per step index s, whose noisy copy shows each block as it was at step s, gives in a single forward the
log-prob of every token revealed at step s, in every block at once (TraceRL / DARE's trajectory estimator).

The rows are built by the RL trainer's own estimator (algorithms/estimators/trajectory.py), so the check
that replay gives the rollout's log-probs back covers the code the trainer runs.
"""

from __future__ import annotations

import torch


def replay_log_probs(runner, completion, mask_token_id: int, micro_batch_size: int | None = None,
                     pack_tokens: int | None = None) -> list[float]:
    """The training-side log-prob of each generated token of a Completion, via a Runner (any layout)."""
    from dare_mega.algorithms.estimators import Sample, build
    from dare_mega.algorithms.rl import noisy_log_probs, rows_to_batch

    sample = Sample(completion.prompt_ids, completion.generated_ids, completion.generated_reveal_steps,
                    completion.block_size)
    estimator = build("trajectory", mask_token_id)
    rows, plan = estimator.rows([sample], [torch.Generator()])
    # sequence parallelism splits each stream's tokens over the tensor-parallel ranks
    laid = rows_to_batch(rows, completion.block_size, multiple=_tp_size(), pack_tokens=pack_tokens)
    log_probs = noisy_log_probs(runner, laid, micro_batch_size or laid.batch.size)
    return estimator.quantities(log_probs, plan)[0].tolist()


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
