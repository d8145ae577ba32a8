"""Full Megatron tensors on every rank, from this rank's shards: the in-process weight refresh.

For every tensor of the mapping table, in one global order: the tensor-parallel (or expert-tensor-parallel)
shards are gathered within their group, then the tensor is broadcast from one rank that holds it (the
lowest: a data-parallel replica, the right pipeline stage, the expert-parallel rank of that expert). Every
rank ends with every full tensor, under the table's canonical Megatron name. Fine for the native engine on
one machine; SGLang at cluster scale receives buckets instead (later work).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dare_mega.checkpoint.hf_loader import megatron_tensors, unwrap
from dare_mega.models.weight_mapping import LayoutContext, VocabRows, dims_of


def _group(binding):
    from megatron.core import parallel_state as ps

    if binding.row.expert:
        return ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()


@torch.no_grad()
def full_tensors(chunks, args, table):
    """Yield (canonical Megatron name, full tensor without vocabulary padding) on every rank."""
    held = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, binding, tensor in megatron_tensors(model, table):
            group, size = _group(binding)
            shard = tensor.detach()
            if size > 1 and binding.row.tp_dim is not None:
                pieces = [torch.empty_like(shard) for _ in range(size)]
                dist.all_gather(pieces, shard.contiguous(), group=group)
                full = binding.row.unshard(pieces)
            else:
                full = shard
            held[name] = (binding, full)
    holders = [None] * dist.get_world_size()
    dist.all_gather_object(holders, sorted(held))
    source = {}
    for rank, names in enumerate(holders):
        for name in names:
            source.setdefault(name, rank)
    padded = unwrap(chunks[0]).vocab_size
    ctx = LayoutContext.of(args, padded_vocab=padded)
    dims = dims_of(args, padded)
    device = next(unwrap(chunks[0]).parameters()).device
    for binding in table.bindings():
        name = binding.megatron_name
        if name in held:
            full = held[name][1].contiguous()
        else:
            hf = [spec.expected_shape(dims) for spec in binding.row.hf]
            shape = binding.row.to_megatron([torch.empty(s, device="meta") for s in hf], ctx).shape
            dtype = torch.float32 if binding.row.dtype is not None else unwrap(chunks[0]).config.params_dtype
            full = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(full, src=source[name])
        if isinstance(binding.row, VocabRows):
            full = full[: args.vocab_size]
        yield name, full
