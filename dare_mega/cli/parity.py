"""Parity of the Megatron model with the HF reference, at any parallel layout (run under torchrun).

The same seeded batch goes through transformers' reference model (one process, dense 4-D mask) and through
the Megatron chunks of this layout (Megatron's pipeline schedule and micro-batches, each data-parallel rank
with its own rows). Reported: the max |logit diff|, both losses, and the max |grad diff| over every tensor,
each rank comparing its own shards with the matching slice of the reference gradient.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from dare_mega.diffusion.masks import (
    BlockDiffusionMask,
    causal_mask,
    inference_mask,
    packed_position_ids,
    two_stream_inputs,
    two_stream_mask,
)
from dare_mega.models.args import ModelArgs
from dare_mega.models.runner import Batch

MASK_KINDS = ("block", "block-causal", "causal", "full")


def default_seq_len(args: ModelArgs, mask_kind: str) -> int:
    """Tokens per stream of the parity batch when none is asked for: 16, or two blocks of two documents each
    when the block is longer (a document needs a whole block under the block masks; `full` needs none)."""
    block = args.diffusion.block_size if args.diffusion else 4
    return 16 if mask_kind == "full" else max(16, 2 * block)


def parity_batch(args: ModelArgs, mask_kind: str = "block", batch_size: int = 4, seq_len: int | None = None,
                 seed: int = 0, token_range: int | None = None) -> Batch:
    """A seeded batch of packed rows (two samples per row) for the given mask.

    block:        SDAR training layout [x_t ; x_0] (2*seq_len tokens), the noisy copy masked at random,
                  loss on the masked noisy positions weighted 1/t as in SDAR training;
    block-causal: one clean stream with the inference (block-causal) mask, loss on every position;
    causal:       the same with the token-causal mask;
    full:         masked diffusion (LLaDA, Dream): one noisy stream, each document attending to itself
                  bidirectionally, loss on its masked positions weighted 1/t; no block grid.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask kind {mask_kind!r}: expected one of {MASK_KINDS}")
    seq_len = seq_len or default_seq_len(args, mask_kind)
    block = args.diffusion.block_size if args.diffusion else 4
    if mask_kind != "full" and seq_len < 2 * block:
        raise ValueError(f"--seq-len {seq_len}: the {mask_kind} mask packs two documents of at least one block "
                         f"({block} tokens) each, so it needs at least {2 * block}")
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len}: two documents need at least 2 tokens")
    g = torch.Generator().manual_seed(seed)
    # When config.json sets pad_token_id, HF's nn.Embedding(padding_idx=pad) never updates that row while
    # Megatron's embedding does (docs/architecture.md, "Known differences"): inputs then stay below it.
    padding_idx = args.extra.get("hf_padding_idx")
    vocab = token_range or (padding_idx if padding_idx and padding_idx < args.vocab_size else args.vocab_size)
    low = 1 if mask_kind == "full" else block
    first = [int(torch.randint(low, seq_len - low + 1, (1,), generator=g)) for _ in range(batch_size)]
    positions = packed_position_ids([[n, seq_len - n] for n in first], seq_len)
    clean = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    if mask_kind == "full":
        t = torch.rand(batch_size, 1, generator=g) * 0.8 + 0.1
        masked = torch.rand(batch_size, seq_len, generator=g) < t
        masked[:, 0] = True
        noisy = torch.where(masked, torch.full_like(clean, args.diffusion.mask_token_id), clean)
        # one block as long as the row: inside a document every token sees every other
        return Batch(noisy, positions, inference_mask(positions, seq_len), labels=clean,
                     loss_weights=masked.float() / t)
    if mask_kind != "block":
        mask = inference_mask(positions, block) if mask_kind == "block-causal" else causal_mask(positions)
        weights = torch.ones(batch_size, seq_len)
        return Batch(clean, positions, mask, labels=torch.randint(0, vocab, clean.shape, generator=g),
                     loss_weights=weights)
    t = torch.rand(batch_size, 1, generator=g) * 0.8 + 0.1
    masked = torch.rand(batch_size, seq_len, generator=g) < t
    masked[:, 0] = True  # at least one masked token per row
    noisy = torch.where(masked, torch.full_like(clean, args.diffusion.mask_token_id), clean)
    input_ids, position_ids = two_stream_inputs(noisy, clean, positions)
    labels = torch.cat([clean, clean], dim=1)
    weights = torch.cat([masked.float() / t, torch.zeros_like(clean, dtype=torch.float)], dim=1)
    return Batch(input_ids, position_ids, two_stream_mask(positions, block), labels=labels, loss_weights=weights)


def dense_mask(batch: Batch) -> torch.Tensor:
    return batch.mask.dense() if isinstance(batch.mask, BlockDiffusionMask) else batch.mask.bool()


def reference_loss_and_grads(model, batch: Batch) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """HF reference: logits, the weighted per-token-mean NLL, and gradients under checkpoint names."""
    from dare_mega.models.reference import reference_forward, reference_named_tensors

    model.zero_grad(set_to_none=True)
    logits = reference_forward(model, batch.input_ids, batch.position_ids, dense_mask(batch))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.labels[..., None])[..., 0]
    weights = batch.loss_weights
    loss = -(logp * weights).sum() / (weights != 0).sum()
    loss.backward()
    return logits.detach().float(), loss.item(), reference_named_tensors(model, grads=True)


@dataclass
class ParityResult:
    layout: str
    mask: str
    world_size: int
    max_abs_logit_diff: float
    max_abs_logprob_diff: float | None = None  # vocab-parallel log p(label), never gathering the vocab
    loss_megatron: float | None = None
    loss_reference: float | None = None
    max_abs_grad_diff: float | None = None
    tensors_compared: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"layout {self.layout} on {self.world_size} process(es), mask {self.mask}"]
        if self.loss_megatron is not None:
            out.append(f"loss megatron={self.loss_megatron:.8f} reference={self.loss_reference:.8f} "
                       f"diff={abs(self.loss_megatron - self.loss_reference):.3e}")
            out.append(f"max_abs_grad_diff={self.max_abs_grad_diff:.3e} over {self.tensors_compared} tensors")
        out.append(f"max_abs_logprob_diff={self.max_abs_logprob_diff:.3e} (vocab-parallel log p(label))")
        out.append(f"seconds={self.seconds:.1f}")
        out.append(f"max_abs_logit_diff={self.max_abs_logit_diff:.3e}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def run_parity(hf_dir: str, layout, mask_kind: str = "block", batch_size: int = 4, seq_len: int | None = None,
               micro_batch_size: int = 1, grads: bool = True, seed: int = 0, options=None,
               token_range: int | None = None, mcore_dir: str | None = None):
    """Under an initialised world: build, load, compare. Returns (ParityResult, batch, megatron logits).

    The Megatron side loads `hf_dir`, or the torch_dist checkpoint `mcore_dir` when given; the reference
    always reads `hf_dir` (that is how a conversion is verified, in either direction).
    """
    from megatron.core import parallel_state as ps

    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.hf_loader import megatron_tensors, shard_group, unwrap
    from dare_mega.models.reference import reference_model
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.models.weight_mapping import LayoutContext
    from dare_mega.parallel.layout import init_model_parallel

    start = time.time()
    init_model_parallel(layout, seed=seed)
    if mcore_dir is None:
        chunks, args = build_from_hf(hf_dir, layout, options or RuntimeOptions())
    else:
        chunks, args = _build_from_torch_dist(mcore_dir, hf_dir, layout, options or RuntimeOptions())
    if grads:
        chunks = wrap_for_training(chunks)
    runner = Runner(chunks, args)
    batch = parity_batch(args, mask_kind, batch_size, seq_len, seed, token_range)
    logits = runner.logits(batch, micro_batch_size).cpu()
    log_probs = runner.token_log_probs(batch, micro_batch_size).cpu()
    device = next(chunks[0].parameters()).device

    rank = dist.get_rank()
    need_reference = grads or rank == 0
    reference = reference_model(hf_dir) if need_reference else None
    result = ParityResult(layout.describe(), mask_kind, dist.get_world_size(), float("nan"))
    if need_reference:
        ref_logits, ref_loss, ref_grads = reference_loss_and_grads(reference, batch)
        result.max_abs_logit_diff = (logits - ref_logits).abs().max().item()
        ref_log_probs = torch.log_softmax(ref_logits, dim=-1).gather(-1, batch.labels[..., None])[..., 0]
        result.max_abs_logprob_diff = (log_probs - ref_log_probs).abs().max().item()
        result.loss_reference = ref_loss
    if grads:
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if batch.size % (dp * micro_batch_size):
            raise ValueError(f"batch {batch.size} is not divisible by dp*micro_batch_size = {dp}*{micro_batch_size}")
        rows = batch.size // dp
        result.loss_megatron = runner.loss_and_grads(batch.rows(dp_rank * rows, (dp_rank + 1) * rows),
                                                     micro_batch_size)
        table = mapping_for(args)
        worst, compared = 0.0, 0
        for chunk in chunks:
            model = unwrap(chunk)
            ctx = LayoutContext.of(args, padded_vocab=model.vocab_size)
            for name, binding, tensor in megatron_tensors(model, table):
                if not isinstance(tensor, torch.nn.Parameter):
                    continue
                expected = binding.row.to_megatron([ref_grads[n] for n in binding.hf_names], ctx)
                expected = binding.row.shard(expected, *shard_group(binding))
                diff = (tensor.main_grad.float().cpu() - expected.float()).abs().max().item()
                worst = max(worst, diff)
                if diff > 1e-4 and os.environ.get("DARE_MEGA_PARITY_DEBUG"):
                    print(f"rank {dist.get_rank()}: grad of {name} differs by {diff:.3e} "
                          f"(norm {tensor.main_grad.norm():.4e} vs {expected.norm():.4e})", flush=True)
                compared += 1
        stats = torch.tensor([worst], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        result.max_abs_grad_diff = stats[0].item()
        result.tensors_compared = compared
    summary = torch.tensor([result.max_abs_logit_diff, result.max_abs_logprob_diff] if need_reference
                           else [-1.0, -1.0], dtype=torch.float64, device=device)
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    result.max_abs_logit_diff, result.max_abs_logprob_diff = summary.tolist()
    result.seconds = time.time() - start
    return result, batch, logits


def _build_from_torch_dist(mcore_dir: str, hf_dir: str, layout, options):
    from dataclasses import replace

    from dare_mega.checkpoint.torch_dist import args_of, load_into
    from dare_mega.errors import CheckpointError
    from dare_mega.models.builder import build_model, load_model_args
    from dare_mega.models.transformer_config import check_layout

    args = args_of(mcore_dir)
    reference_args = load_model_args(hf_dir)
    if replace(args, extra={}) != replace(reference_args, extra={}):
        raise CheckpointError(f"{mcore_dir} and {hf_dir} describe different models; nothing to compare")
    check_layout(args, layout, mcore_dir)
    chunks = build_model(args, layout, replace(options, init_weights=False), mcore_dir)
    load_into(chunks, mcore_dir)
    return chunks, args
