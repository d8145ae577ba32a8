"""Replaying a rollout trajectory through the training layout: the log-probs RL optimises.

A rollout decodes block by block; the token at position p was revealed at denoising step s of its block,
conditioned on the clean earlier blocks and on the tokens of its own block revealed at steps < s. In the
two-stream layout [x_t ; x_0] a noisy block sees exactly that: itself and the clean blocks before it. So one
row per step index s, whose noisy copy shows each block as it was at step s, gives in a single forward the
log-prob of every token revealed at step s, in every block at once (TraceRL / DARE's trajectory estimator).
"""

from __future__ import annotations

import torch

from dare_mega.diffusion.masks import packed_position_ids, two_stream_inputs, two_stream_mask
from dare_mega.models.runner import Batch


def replay_batch(prompt_ids: list[int], generated_ids: list[int], reveal_steps: list[int], block_size: int,
                 mask_token_id: int, length: int | None = None) -> tuple[Batch, list[tuple[int, int]]]:
    """Rows for one completion and, per generated token, (row, position) where its log-prob is read.

    `generated_ids` / `reveal_steps` cover every decoded position (the Completion's generated_* fields,
    which include the tokens after a stop inside the last block). `length` pads the sequence (for batching
    several completions); the padding is a separate sample, attended by nothing.
    """
    if len(generated_ids) != len(reveal_steps):
        raise ValueError(f"{len(generated_ids)} generated tokens but {len(reveal_steps)} reveal steps")
    prompt_len = len(prompt_ids)
    n = prompt_len + len(generated_ids)
    length = length or n
    if length < n:
        raise ValueError(f"length {length} is shorter than the sequence ({n})")
    steps = max(reveal_steps) + 1 if reveal_steps else 1
    clean = torch.tensor(prompt_ids + generated_ids + [0] * (length - n), dtype=torch.long)
    revealed_at = torch.full((length,), -1, dtype=torch.long)
    revealed_at[prompt_len:n] = torch.tensor(reveal_steps, dtype=torch.long)
    rows_noisy, rows_weights = [], []
    for s in range(steps):
        still_masked = revealed_at >= s
        rows_noisy.append(torch.where(still_masked, torch.full_like(clean, mask_token_id), clean))
        rows_weights.append((revealed_at == s).float())
    noisy = torch.stack(rows_noisy)
    clean_rows = clean.expand(steps, length)
    positions = packed_position_ids([[n]] * steps, length)
    input_ids, position_ids = two_stream_inputs(noisy, clean_rows, positions)
    batch = Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        mask=two_stream_mask(positions, block_size),
        labels=torch.cat([clean_rows, clean_rows], dim=1),
        loss_weights=torch.cat([torch.stack(rows_weights), torch.zeros(steps, length)], dim=1),
    )
    where = [(int(step), prompt_len + k) for k, step in enumerate(reveal_steps)]
    return batch, where


def replay_log_probs(runner, completion, mask_token_id: int, micro_batch_size: int | None = None) -> list[float]:
    """The training-side log-prob of each generated token of a Completion, via a Runner (any layout)."""
    batch, where = replay_batch(completion.prompt_ids, completion.generated_ids, completion.generated_reveal_steps,
                                completion.block_size, mask_token_id)
    tp = _tp_size()
    if batch.seq_len % tp:  # sequence parallelism splits the sequence: pad it to a multiple of tp
        pad = tp - batch.seq_len % tp
        n = len(completion.prompt_ids) + len(completion.generated_ids)
        batch, where = replay_batch(completion.prompt_ids, completion.generated_ids, completion.generated_reveal_steps,
                                    completion.block_size, mask_token_id, length=n + (pad + 1) // 2)
    log_probs = runner.token_log_probs(batch, micro_batch_size)
    return [float(log_probs[row, position]) for row, position in where]


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
