"""Block-diffusion decoding on the trainer's own Megatron model (`rollout.backend=megatron`), at its layout.

The engine holds no weights of its own: each forward goes through the trainer's chunks (models/runner.py,
Megatron's pipeline schedule, TP with SP, PP with VPP, EP / ETP), so what generated the tokens is exactly what
the trainer scores, and there is nothing to copy or sync after an update. Every rank of one data-parallel
replica runs the same decoding loop on the same requests with the same seeds; the logits of each row's current
block come back, full-vocabulary, to every rank of the replica, so all of them sample the same tokens. Replicas
decode their own requests. When expert-parallel all-to-alls span replicas (MoE at EP > 1), all ranks run each
forward together (one all-reduce per forward says whether any replica still decodes, and a replica that is
done runs a one-row forward meanwhile); otherwise each replica decodes on its own.

The block KV cache (`cache=True`, the default) lives in the attention of each rank's own layers: a forward's
mask is a `CachedBlocks` (diffusion/kv_cache.py) that Megatron hands, sliced per micro-batch, to the core
attention of every layer (models/spec.py), which attends to its rows' cached keys and writes the committing
tokens' keys and values, with the local heads only (tensor parallelism) and on the stage that owns the layer
(pipeline parallelism): the native engine's cached loop (rollout/decoder.py) and attention rule, on shards.
Masked diffusion models take Fast-dLLM's prefix or dual cache the same way (rollout/masked_cache.py: the same
loop and `CachedBlocks`, with the dual cache's replaced block, and Dream's shift in the model's last stage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dare_mega.diffusion.kv_cache import CachedBlocks
from dare_mega.models.runner import Batch, Runner
from dare_mega.rollout.decoder import BlockDecoder


class MegatronEngine(BlockDecoder):
    supports_cache = True
    lockstep = True  # every replica calls generate, with [] when it has nothing to decode

    """generate(prompts, params, cache=False) on `runner`'s chunks; every rank calls it with its replica's
    prompts (the same on every tensor / pipeline rank of a replica)."""

    def __init__(self, runner: Runner, tokenizer=None, micro_batches: int | None = None):
        """`micro_batches`: how many micro-batches each forward's rows are split into (default: the number of
        pipeline stages, so that stages work on different rows at once)."""
        from megatron.core import parallel_state as ps

        super().__init__(runner.args, tokenizer, next(runner.chunks[0].parameters()).device)
        self.runner = runner
        self.micro_batches = micro_batches or ps.get_pipeline_model_parallel_world_size()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.sequence_parallel = runner.config.sequence_parallel
        # only expert-parallel all-to-alls span replicas; without them each replica decodes on its own
        self.across_replicas = bool(runner.args.moe) and ps.get_expert_model_parallel_world_size() > 1

    def generate(self, prompts, params=None, cache: bool | str = True):
        """As BlockDecoder.generate; a replica with no prompts this round (`[]`) still runs its share of the
        other replicas' forwards and returns []."""
        from dare_mega.rollout.types import SamplingParams

        params = params or SamplingParams()
        if not prompts:
            params.check()
            while self._another_forward(False):
                self._idle_forward(params.block_size or self.args.diffusion.block_size)
            return []
        return super().generate(prompts, params, cache)

    def _block_logits(self, tokens, positions, mask, starts, width):
        rows = tokens.shape[0]
        tokens, positions, mask, extra = self._padded(tokens, positions, mask)
        starts = torch.cat([starts, torch.zeros(extra, dtype=starts.dtype)])
        return self._logits(Batch(tokens, positions, mask[:, None]), starts, width)[:rows]

    def _cached_forward(self, cache, slots, lengths, tokens, positions, new_mask, write, logits, starts=None,
                        width=None, replaced=None):
        rows, length = tokens.shape
        tokens, positions, new_mask, extra = self._padded(tokens, positions, new_mask)
        pad_cols = tokens.shape[1] - length
        # padding rows read and write the spare cache row (none of theirs is written); padding positions write
        # nothing
        slots = torch.tensor(list(slots) + [cache.rows - 1] * extra)
        lengths = torch.cat([lengths, torch.zeros(extra, dtype=lengths.dtype)])
        write = torch.nn.functional.pad(write, (0, pad_cols, 0, extra), value=False)
        if replaced is not None:
            replaced = torch.cat([replaced, torch.zeros(extra, 2, dtype=replaced.dtype)])
        blocks = CachedBlocks(cache, slots, lengths, positions, new_mask, write, replaced=replaced)
        if starts is None:
            starts, width = torch.zeros(rows, dtype=torch.long), length
        out = self._logits(Batch(tokens, positions, blocks), torch.cat([starts, torch.zeros(extra, dtype=torch.long)]),
                           width if logits else 1)
        return out[:rows] if logits else None

    def _logits(self, batch: Batch, starts, width):
        micro = max(1, min(self.micro_batches, batch.size))
        return self.runner.logits_at(batch, starts, width, micro_batch_size=batch.size // micro).cpu()

    def _padded(self, tokens, positions, mask):
        """Rows to a multiple of the micro-batches (at least one each), positions to a multiple of the tensor-parallel size under
        sequence parallelism; padding attends only to itself. Returns (tokens, positions, mask, extra rows)."""
        rows, length = tokens.shape
        # the interleaved (virtual-pipeline) schedule needs at least one micro-batch per stage
        micro = self.micro_batches if len(self.runner.chunks) > 1 else max(1, min(self.micro_batches, rows))
        extra_rows = -rows % micro if rows >= micro else micro - rows
        extra_len = -length % self.tp if self.sequence_parallel else 0
        if extra_rows or extra_len:
            tokens, positions, mask = _pad(tokens, positions, mask, extra_rows, extra_len)
        return tokens, positions, mask, extra_rows

    def _another_forward(self, active: bool) -> bool:
        if not self.across_replicas:
            return active
        flag = torch.tensor([int(active)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _idle_forward(self, block: int) -> None:
        tokens = torch.full((1, block), self.args.diffusion.mask_token_id, dtype=torch.long)
        positions = torch.arange(block)[None]
        mask = torch.ones(1, block, block, dtype=torch.bool)
        self._block_logits(tokens, positions, mask, torch.zeros(1, dtype=torch.long), block)


def _pad(tokens, positions, mask, extra_rows: int, extra_len: int):
    rows, length = tokens.shape
    total_rows, total_len = rows + extra_rows, length + extra_len
    new_tokens = torch.zeros(total_rows, total_len, dtype=tokens.dtype, device=tokens.device)
    new_tokens[:rows, :length] = tokens
    new_positions = torch.arange(total_len, device=positions.device).expand(total_rows, total_len).clone()
    new_positions[:rows, :length] = positions
    new_mask = torch.eye(total_len, dtype=torch.bool, device=mask.device).expand(total_rows, -1, -1).clone()
    new_mask[:rows, :length, :length] = mask
    return new_tokens, new_positions, new_mask
