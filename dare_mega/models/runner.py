"""Run a batch through this rank's Megatron chunks at any layout, with Megatron's pipeline schedules.

One entry for every caller (parity checks, log-prob estimation, training): the batch is split into
micro-batches, pushed through `get_forward_backward_func()` (no pipelining, 1F1B, or interleaved VPP), and
the result comes back the same whatever the layout:

- `logits(batch)`: full-vocabulary float32 logits [B, S, vocab] (padding stripped) on every rank;
- `loss_and_grads(batch)`: the per-token mean of a weighted NLL over the global batch, with gradients left in
  each parameter's `main_grad` after Megatron's DDP and `finalize_model_grads` reductions (DP, SP, PP).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.distributed as dist

from dare_mega.diffusion.kv_cache import CachedBlocks
from dare_mega.diffusion.masks import BlockDiffusionMask
from dare_mega.errors import ConfigError
from dare_mega.models.args import ModelArgs
from dare_mega.models.routing import replay_routing


@dataclass
class Batch:
    """One batch in the model's layout (for SDAR training: the two-stream [x_t ; x_0] sequence)."""

    input_ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    # per-token groups, or a dense bool [B, 1, S, S] (True = attend), or a rollout forward's cache (CachedBlocks)
    mask: BlockDiffusionMask | torch.Tensor | CachedBlocks
    labels: torch.Tensor | None = None  # [B, S] target token at each position (no shift for SDAR)
    loss_weights: torch.Tensor | None = None  # [B, S] float weight per position (0 = not in the loss)
    loss_normalizer: torch.Tensor | None = None  # [B] int: what each row adds to the loss denominator
    # (default: its number of weighted positions); the loss is sum(w * nll) / sum(normalizer), globally
    experts: dict | None = None  # MoE routing replay: {global layer: [B, S, topk] expert ids}

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, start: int, stop: int) -> "Batch":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, BlockDiffusionMask):
                kv = None if value.kv is None else value.kv[start:stop]
                value = BlockDiffusionMask(value.q[start:stop], kv)
            elif isinstance(value, CachedBlocks):
                value = value.select(start, stop)
            elif isinstance(value, torch.Tensor):
                value = value[start:stop]
            elif isinstance(value, dict):
                value = {k: v[start:stop] for k, v in value.items()}
            out[f.name] = value
        return Batch(**out)

    def to(self, device) -> "Batch":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):  # replayed experts travel once per micro-batch, not once per layer
                out[f.name] = {k: v.to(device) for k, v in value.items()}
            else:
                out[f.name] = value.to(device) if value is not None else None
        return Batch(**out)

    def micro_batches(self, micro_batch_size: int) -> list["Batch"]:
        if self.size % micro_batch_size:
            raise ConfigError(f"batch of {self.size} rows is not divisible by micro_batch_size={micro_batch_size}")
        return [self.rows(i, i + micro_batch_size) for i in range(0, self.size, micro_batch_size)]


def vocab_parallel_log_probs(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                             temperature: float = 1.0) -> torch.Tensor:
    """log p(target) from TP-sharded logits [..., V/tp] without gathering the vocabulary.

    Megatron pads the vocabulary; the padded columns are excluded (set to -inf) so that the softmax is over
    the real vocabulary only, exactly as in the HF model.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits_shard.float()
    if temperature != 1.0:  # the policy that sampled at temperature T: softmax(logits / T)
        logits = logits / temperature
    per_rank = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank > vocab_size:
        column = torch.arange(start, start + per_rank, device=logits.device)
        logits = logits.masked_fill(column >= vocab_size, float("-inf"))
    return -vocab_parallel_cross_entropy(logits, targets)


def gather_vocab(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits_shard)[..., :vocab_size]


class Runner:
    def __init__(self, chunks: list, args: ModelArgs):
        from megatron.core.utils import get_model_config

        self.chunks = chunks
        self.args = args
        self.config = get_model_config(chunks[0])

    # ----------------------------------------------------------------------------------------------------
    def _run(self, batch: Batch, micro_batch_size: int, loss_func, forward_only: bool):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tp = ps.get_tensor_model_parallel_world_size()
        if self.config.sequence_parallel and batch.seq_len % tp:
            raise ConfigError(
                f"sequence length {batch.seq_len} is not divisible by tp={tp}, which sequence parallelism needs"
            )
        micro = batch.micro_batches(micro_batch_size)
        device = next(self.chunks[0].parameters()).device

        def forward_step(data_iterator, model):
            mb = next(data_iterator).to(device)
            with replay_routing(model, mb.experts, self.config.sequence_parallel):
                output = model(mb.input_ids, mb.position_ids, mb.mask)
            return output, partial(loss_func, mb)

        iterators = [iter(micro) for _ in self.chunks]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro),
            seq_length=batch.seq_len,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    def _broadcast_from_last_stage(self, tensor: torch.Tensor | None, shape, dtype=torch.float32):
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return tensor
        if not ps.is_pipeline_last_stage():
            tensor = torch.empty(shape, dtype=dtype, device=next(self.chunks[0].parameters()).device)
        dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return tensor

    # ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _collect(self, batch: Batch, micro_batch_size: int | None, per_micro_batch, shape) -> torch.Tensor:
        """Forward only; `per_micro_batch(mb, output)` on the last stage, concatenated and sent to every rank."""
        for chunk in self.chunks:
            chunk.eval()
        pieces: list[torch.Tensor] = []

        def collect(mb, output):
            pieces.append(per_micro_batch(mb, output))
            return output.sum() * 0.0, {}

        self._run(batch, micro_batch_size or batch.size, collect, forward_only=True)
        full = torch.cat(pieces, dim=0) if pieces else None
        return self._broadcast_from_last_stage(full, shape)

    def logits(self, batch: Batch, micro_batch_size: int | None = None) -> torch.Tensor:
        """Full-vocabulary float32 logits [B, S, vocab] on every rank."""
        vocab = self.args.vocab_size
        return self._collect(batch, micro_batch_size, lambda mb, out: gather_vocab(out, vocab).float(),
                             (batch.size, batch.seq_len, vocab))

    def logits_at(self, batch: Batch, starts: torch.Tensor, width: int,
                  micro_batch_size: int | None = None) -> torch.Tensor:
        """Full-vocabulary float32 logits [B, width, vocab] of positions starts[b] .. starts[b] + width - 1 of each
        row, on every rank (the window is cut before the vocabulary is gathered: a rollout's current block)."""
        vocab = self.args.vocab_size
        size = micro_batch_size or batch.size
        windows = iter(starts.split(size))

        def window(mb, out):  # micro-batches reach the last stage in order
            index = next(windows).to(out.device)[:, None] + torch.arange(width, device=out.device)
            return gather_vocab(out.gather(1, index[..., None].expand(-1, -1, out.shape[-1])), vocab).float()

        return self._collect(batch, size, window, (batch.size, width, vocab))

    def token_log_probs(self, batch: Batch, micro_batch_size: int | None = None,
                        temperature: float = 1.0) -> torch.Tensor:
        """log p(labels) [B, S] (float32) on every rank, computed vocab-parallel (at `temperature`)."""
        vocab = self.args.vocab_size
        return self._collect(batch, micro_batch_size,
                             lambda mb, out: vocab_parallel_log_probs(out, mb.labels, vocab, temperature),
                             (batch.size, batch.seq_len))

    def loss_and_grads(self, batch: Batch, micro_batch_size: int | None = None, temperature: float = 1.0) -> float:
        """Weighted NLL summed over the global batch / the global normalizer; grads in main_grad.

        Each data-parallel rank passes its own rows; the chunks must be wrapped by `wrap_for_training`.
        """
        if batch.labels is None or batch.loss_weights is None:
            raise ValueError("loss_and_grads needs batch.labels and batch.loss_weights")
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        vocab = self.args.vocab_size

        def loss(mb, output):
            logp = vocab_parallel_log_probs(output, mb.labels, vocab, temperature)
            weights = mb.loss_weights.to(logp.dtype)
            total = -(logp * weights).sum()
            if mb.loss_normalizer is not None:
                count = mb.loss_normalizer.sum().to(torch.int)
            else:
                count = (weights != 0).sum().to(torch.int)
            return total, count, {"loss_sum": total.detach().clone(), "count": count.clone()}

        stats = self._run(batch, micro_batch_size or batch.size, loss, forward_only=False)
        return self._global_mean(stats)

    def _global_mean(self, stats) -> float:
        """Sum loss and token counts over micro-batches, data-parallel ranks and pipeline stages."""
        from megatron.core import parallel_state as ps

        device = next(self.chunks[0].parameters()).device
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        for item in stats or []:
            totals[0] += item["loss_sum"].double()
            totals[1] += item["count"].double()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        return (totals[0] / totals[1].clamp(min=1)).item()


def wrap_for_training(chunks: list, overlap_grad_reduce: bool = False, distributed_optimizer: bool = False) -> list:
    """Megatron DDP around each chunk, per-token loss normalisation, and Megatron's grad finalisation."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer,
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        ddp = DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        ddp.dare_args = getattr(chunk, "dare_args", None)
        wrapped.append(ddp)
    return wrapped
