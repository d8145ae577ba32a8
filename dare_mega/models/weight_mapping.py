"""HF <-> Megatron weight mappings as declarative tables (one table per family, written once).

A table is a list of rows; each row names one Megatron tensor (with `{layer}` and, for experts, `{expert}`
placeholders, both GLOBAL indices), the HF tensors it is made of, and how the layouts differ. The same row
serves every direction:

  to_megatron(hf tensors) -> full Megatron tensor         (load, hf2mcore conversion)
  to_hf(full Megatron tensor) -> HF tensors               (export, mcore2hf conversion, live weight sync)
  shard(full, rank, size) / unshard(shards)               (tensor parallelism: TP, or ETP for experts)

Each HF tensor carries its expected shape as a product of named dimensions (`dims_of(args)`), so a
checkpoint can be checked completely, from its headers, before any model is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

import torch

from dare_mega.models.args import ModelArgs


def dims_of(args: ModelArgs, padded_vocab: int | None = None) -> dict[str, int]:
    """The named dimensions that HF tensor shapes are written in."""
    q = args.num_attention_heads * args.head_dim
    kv = args.num_kv_heads * args.head_dim
    dims = {
        "hidden": args.hidden_size,
        "head_dim": args.head_dim,
        "q": q,
        "kv": kv,
        "qkv": q + 2 * kv,
        "ffn": args.ffn_hidden_size,
        "vocab": args.vocab_size,
        "padded_vocab": padded_vocab or args.vocab_size,
    }
    if args.moe:
        dims.update(
            experts=args.moe.num_experts,
            expert_ffn=args.moe.expert_ffn_hidden_size,
            shared_ffn=args.moe.shared_expert_ffn_hidden_size,
        )
    return dims


@dataclass(frozen=True)
class HF:
    """One HF tensor: its name pattern and its shape in named dimensions."""

    name: str
    shape: tuple[str, ...]

    def resolve(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.name.format(layer=layer, expert=expert)

    def expected_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] for d in self.shape)


@dataclass(frozen=True)
class Row:
    """Base row: one Megatron tensor made of one HF tensor, unchanged, replicated over TP."""

    megatron: str
    hf: tuple[HF, ...]
    tp_dim: int | None = None  # the dimension tensor parallelism splits; None = replicated
    scope: str = "global"  # "global" (once per model), "layer" (every layer), "dense" or "moe" (those layers)
    expert: bool = False  # one tensor per expert; sharded over expert-tensor-parallel ranks
    buffer: bool = False  # a Megatron buffer (not a parameter), e.g. the router's fp32 expert_bias
    dtype: torch.dtype | None = None  # kept in this dtype whatever the model's (the expert bias: fp32)

    # -- names ---------------------------------------------------------------------------------------------
    def hf_names(self, layer: int | None = None, expert: int | None = None) -> list[str]:
        return [h.resolve(layer, expert) for h in self.hf]

    def megatron_name(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.megatron.format(layer=layer, expert=expert)

    # -- layout --------------------------------------------------------------------------------------------
    def to_megatron(self, hf: list[torch.Tensor], ctx: "LayoutContext") -> torch.Tensor:
        (tensor,) = hf
        return tensor

    def to_hf(self, full: torch.Tensor, ctx: "LayoutContext") -> list[torch.Tensor]:
        return [full]

    def unpad(self, full: torch.Tensor, ctx: "LayoutContext") -> torch.Tensor:
        """The full Megatron tensor without Megatron's padding (the padded vocabulary rows)."""
        return full

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        if self.tp_dim is None or size == 1:
            return full
        return torch.chunk(full, size, dim=self.tp_dim)[rank]

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(shards, dim=self.tp_dim)


@dataclass(frozen=True)
class Replicated(Row):
    """Norm weights, router weights, biases: the same tensor on every tensor-parallel rank."""


@dataclass(frozen=True)
class RowParallel(Row):
    tp_dim: int | None = 1


@dataclass(frozen=True)
class VocabRows(Row):
    """Embedding / output layer: rows padded to Megatron's padded vocabulary, split over TP by rows."""

    tp_dim: int | None = 0

    def to_megatron(self, hf, ctx):
        (tensor,) = hf
        pad = ctx.padded_vocab - tensor.shape[0]
        if pad < 0:
            raise ValueError(f"{self.megatron}: vocab {tensor.shape[0]} exceeds padded vocab {ctx.padded_vocab}")
        if pad == 0:
            return tensor
        return torch.cat([tensor, tensor.new_zeros((pad,) + tuple(tensor.shape[1:]))], dim=0)

    def to_hf(self, full, ctx):
        return [self.unpad(full, ctx)]

    def unpad(self, full, ctx):
        return full[: ctx.vocab_size]


@dataclass(frozen=True)
class GroupedQKV(Row):
    """Megatron's linear_qkv: rows grouped per query group, [q heads of group g ; k_g ; v_g] for each g.

    From separate HF q/k/v (Qwen3 layout) or from one fused [Q_all ; K_all ; V_all] tensor (BailingMoeV2):
    `fused=True` with a single HF entry. TP splits whole query groups, so the shard is a plain chunk.
    """

    tp_dim: int | None = 0
    fused: bool = False

    def _split(self, hf, ctx):
        if self.fused:
            (qkv,) = hf
            q_size, kv_size = ctx.num_heads * ctx.head_dim, ctx.num_kv_heads * ctx.head_dim
            return torch.split(qkv, [q_size, kv_size, kv_size], dim=0)
        return hf

    def to_megatron(self, hf, ctx):
        q, k, v = self._split(hf, ctx)
        groups, d = ctx.num_kv_heads, ctx.head_dim
        rest = tuple(q.shape[1:])
        q = q.reshape((groups, (ctx.num_heads // groups) * d) + rest)
        k = k.reshape((groups, d) + rest)
        v = v.reshape((groups, d) + rest)
        return torch.cat([q, k, v], dim=1).reshape((-1,) + rest)

    def to_hf(self, full, ctx):
        groups, d = ctx.num_kv_heads, ctx.head_dim
        per_group_q = (ctx.num_heads // groups) * d
        rest = tuple(full.shape[1:])
        grouped = full.reshape((groups, per_group_q + 2 * d) + rest)
        q, k, v = torch.split(grouped, [per_group_q, d, d], dim=1)
        q, k, v = (t.reshape((-1,) + rest) for t in (q, k, v))
        if self.fused:
            return [torch.cat([q, k, v], dim=0)]
        return [q, k, v]


@dataclass(frozen=True)
class GatedFC1(Row):
    """Megatron's linear_fc1 of a gated MLP: [gate ; up]; every TP shard is [gate_r ; up_r]."""

    tp_dim: int | None = 0

    def to_megatron(self, hf, ctx):
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def to_hf(self, full, ctx):
        gate, up = torch.chunk(full, 2, dim=0)
        return [gate, up]

    def shard(self, full, rank, size):
        if size == 1:
            return full
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)

    def unshard(self, shards):
        if len(shards) == 1:
            return shards[0]
        gates, ups = zip(*(torch.chunk(s, 2, dim=0) for s in shards))
        return torch.cat(list(gates) + list(ups), dim=0)


@dataclass(frozen=True)
class LayoutContext:
    """What the layout transforms need to know besides the tensors."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab: int

    @classmethod
    def of(cls, args: ModelArgs, padded_vocab: int | None = None) -> "LayoutContext":
        return cls(
            num_heads=args.num_attention_heads,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            vocab_size=args.vocab_size,
            padded_vocab=padded_vocab or args.vocab_size,
        )


# ----------------------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Binding:
    """One row bound to concrete indices: a Megatron tensor and the HF tensors it is made of."""

    row: Row
    layer: int | None
    expert: int | None

    @property
    def megatron_name(self) -> str:
        return self.row.megatron_name(self.layer, self.expert)

    @property
    def hf_names(self) -> list[str]:
        return self.row.hf_names(self.layer, self.expert)


@dataclass
class MappingTable:
    """All rows of one family for one model's args."""

    args: ModelArgs
    rows: list[Row]
    _index: dict[str, tuple[Row, re.Pattern]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        for row in self.rows:
            pattern = re.escape(row.megatron).replace(r"\{layer\}", r"(?P<layer>\d+)")
            pattern = pattern.replace(r"\{expert\}", r"(?P<expert>\d+)")
            self._index[row.megatron] = (row, re.compile(pattern + "$"))

    def _layer_rows(self, layer: int) -> Iterator[Row]:
        kind = "moe" if self.args.layer_is_moe(layer) else "dense"
        for row in self.rows:
            if row.scope in ("layer", kind):
                yield row

    def bindings(self) -> Iterator[Binding]:
        """Every Megatron tensor of the whole model with its HF sources (global layer and expert ids)."""
        for row in self.rows:
            if row.scope == "global":
                yield Binding(row, None, None)
        for layer in range(self.args.num_layers):
            for row in self._layer_rows(layer):
                if row.expert:
                    for expert in range(self.args.moe.num_experts):
                        yield Binding(row, layer, expert)
                else:
                    yield Binding(row, layer, None)

    def expected_hf(self, padded_vocab: int | None = None) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> expected shape, for the whole model."""
        dims = dims_of(self.args, padded_vocab)
        out = {}
        for binding in self.bindings():
            for spec, name in zip(binding.row.hf, binding.hf_names):
                out[name] = spec.expected_shape(dims)
        return out

    def bind(self, canonical_name: str) -> Binding:
        """The row for a Megatron tensor name with GLOBAL layer and expert indices (see models/names.py)."""
        for row, pattern in self._index.values():
            match = pattern.match(canonical_name)
            if match:
                groups = match.groupdict()
                layer = int(groups["layer"]) if groups.get("layer") is not None else None
                expert = int(groups["expert"]) if groups.get("expert") is not None else None
                return Binding(row, layer, expert)
        raise KeyError(f"no mapping row for Megatron tensor {canonical_name!r} ({self.args.family})")
