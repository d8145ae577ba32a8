"""Megatron shards -> full HF-named tensors in size-bounded buckets, for any TP / PP / EP / ETP layout.

Every rank walks the same global order (the family mapping table's: global tensors, then layers, then experts
by global id; router expert_bias included). For each Megatron tensor, the ranks of ONE tensor-parallel group that
holds it (the lowest-ranked holder's: a data-parallel replica, the right pipeline stage, the expert-parallel rank
of that expert) all-gather its shards, the group's lowest rank re-assembles it (fc1 [gate ; up] re-chunked,
row-parallel tensors on dim 1: `Row.unshard`) and converts it with the same table that conversion uses
(`Row.to_hf`: QKV split or re-fused, vocabulary padding stripped), then sends it to the receiving ranks.
Converted tensors accumulate in a bucket that is handed over when the next tensor would overflow it, so a
receiver holds at most one bucket beyond the model (a single tensor larger than the limit is a bucket alone).

Receivers: `"all"` (every rank: the in-process engines, CUDA-IPC colocation where every GPU serves its own
copy) or one rank (disk, NCCL broadcast to disaggregated engines). Ranks that receive nothing still iterate:
they take part in the gathers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from dare_mega.models.hf_loader import megatron_tensors, unwrap
from dare_mega.models.weight_mapping import LayoutContext, dims_of

DEFAULT_BUCKET_BYTES = 512 * 1024**2


@dataclass
class Bucket:
    """HF-named full tensors, in the exporter's global order."""

    index: int
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.tensors]


@dataclass(frozen=True)
class ExportPlan:
    """What an export produces, known on every rank before any tensor moves: (HF name, dtype, shape) in order,
    and the buckets they fall into. Transports send this metadata ahead of the data (SGLang's distributed path
    needs names, dtypes and shapes before the broadcast)."""

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    buckets: list[list[int]]  # entry indices per bucket

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(dtype, shape) for _, dtype, shape in self.entries)


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _tp_group(binding):
    from megatron.core import parallel_state as ps

    if binding.row.expert:
        return ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()


class WeightExporter:
    """Built once per model (the manifest exchange is one all_gather_object); `buckets()` per sync."""

    def __init__(self, chunks, args, table, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtypes: dict[str, torch.dtype] | None = None):
        """`dtypes`: HF name -> dtype of the output (e.g. the source checkpoint's, so that the export equals
        what the conversion tool writes); by default each tensor keeps the dtype of its Megatron parameter."""
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0")
        self.chunks, self.args, self.table = chunks, args, table
        self.bucket_bytes = bucket_bytes
        self.padded_vocab = unwrap(chunks[0]).vocab_size
        self.ctx = LayoutContext.of(args, padded_vocab=self.padded_vocab)
        self.local: dict[str, tuple] = {}
        for chunk in chunks:
            for name, binding, tensor in megatron_tensors(unwrap(chunk), table):
                self.local[name] = (binding, tensor)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.rank, self.world = rank, world
        held = [None] * world
        if world > 1:
            dist.all_gather_object(held, sorted(self.local))
        else:
            held = [sorted(self.local)]
        self.holder: dict[str, int] = {}
        for r, names in enumerate(held):
            for name in names:
                self.holder.setdefault(name, r)
        self.bindings = list(table.bindings())
        missing = [b.megatron_name for b in self.bindings if b.megatron_name not in self.holder]
        if missing:
            raise RuntimeError(f"no rank holds {missing[:3]} ({len(missing)} tensors): the model and its mapping "
                               f"table disagree")
        self.param_dtype = unwrap(chunks[0]).config.params_dtype
        self.dtypes = dtypes or {}
        self.plan = self._plan()
        self.peak_held_bytes = 0  # the most exported bytes this rank held at once (the bucket + one tensor)

    # ----------------------------------------------------------------------------------------------------
    def _hf_specs(self, binding):
        """(name, dtype, shape) of the HF tensors of one binding, from shapes alone (nothing moves)."""
        dims = dims_of(self.args, self.padded_vocab)
        hf_shapes = [spec.expected_shape(dims) for spec in binding.row.hf]
        megatron = binding.row.to_megatron([torch.empty(s, device="meta") for s in hf_shapes], self.ctx)
        outs = binding.row.to_hf(megatron, self.ctx)
        default = torch.float32 if binding.row.dtype is not None else self.param_dtype
        return [(name, self.dtypes.get(name, default), tuple(t.shape)) for name, t in zip(binding.hf_names, outs)]

    def _plan(self) -> ExportPlan:
        entries, buckets, current, size = [], [], [], 0
        for binding in self.bindings:
            specs = self._hf_specs(binding)
            nbytes = sum(_nbytes(d, s) for _, d, s in specs)
            if current and size + nbytes > self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current += list(range(len(entries), len(entries) + len(specs)))
            entries += specs
            size += nbytes
        if current:
            buckets.append(current)
        return ExportPlan(entries, buckets)

    # ----------------------------------------------------------------------------------------------------
    def _full(self, binding) -> torch.Tensor | None:
        """The full Megatron tensor on the source rank (the lowest holder); None elsewhere. Only the source's
        tensor-parallel group gathers."""
        name = binding.megatron_name
        source = self.holder[name]
        if name not in self.local:
            return None
        group, size = _tp_group(binding)
        members = dist.get_process_group_ranks(group) if size > 1 else [self.rank]
        if source not in members:
            return None  # another replica of this tensor is the one exported
        _, tensor = self.local[name]
        shard = tensor.detach()
        if size > 1 and binding.row.tp_dim is not None:
            pieces = [torch.empty_like(shard) for _ in range(size)]
            dist.all_gather(pieces, shard.contiguous(), group=group)
            full = binding.row.unshard(pieces) if self.rank == source else None
        else:
            full = shard if self.rank == source else None
        return full

    @torch.no_grad()
    def buckets(self, receivers: str | int = "all") -> Iterator[Bucket]:
        """Yield the buckets on the receiving rank(s), in plan order. Every rank must iterate to the end."""
        device = next(unwrap(self.chunks[0]).parameters()).device
        receive = receivers == "all" or receivers == self.rank
        entry = 0
        bucket_of = {i: b for b, members in enumerate(self.plan.buckets) for i in members}
        bucket = Bucket(0)
        for binding in self.bindings:
            source = self.holder[binding.megatron_name]
            full = self._full(binding)
            specs = self.plan.entries[entry : entry + len(binding.hf_names)]
            if self.rank == source:
                outs = [t.to(dtype).contiguous() for t, (_, dtype, _) in zip(binding.row.to_hf(full, self.ctx), specs)]
                for out, (name, _, shape) in zip(outs, specs):
                    if tuple(out.shape) != shape:
                        raise RuntimeError(f"{name}: exported {list(out.shape)}, expected {list(shape)}")
            else:
                outs = [torch.empty(shape, dtype=dtype, device=device) if receive else None
                        for _, dtype, shape in specs]
            if self.world > 1:
                for i, out in enumerate(outs):
                    if receivers == "all":
                        dist.broadcast(out, src=source)
                    elif source != receivers:
                        if self.rank == source:
                            dist.send(out, dst=receivers)
                        elif self.rank == receivers:
                            dist.recv(out, src=source)
            if self.rank == source or receive:
                held = bucket.nbytes + sum(o.numel() * o.element_size() for o in outs if o is not None)
                self.peak_held_bytes = max(self.peak_held_bytes, held)
            if receive:
                for (name, _, _), out in zip(specs, outs):
                    index = bucket_of[entry]
                    if index != bucket.index:
                        yield bucket
                        bucket = Bucket(index)
                    bucket.tensors.append((name, out))
                    entry += 1
            else:
                entry += len(specs)
        if receive and bucket.tensors:
            yield bucket
