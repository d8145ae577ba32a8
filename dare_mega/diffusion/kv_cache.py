"""The block KV cache of block-diffusion decoding: one attention rule for the native engine and Megatron.

A decoding forward's new tokens (a prompt's full blocks at prefill, then each request's current block) see
their row's cached positions below its length plus, among themselves, what `new_mask` allows; the tokens
marked in `write` store their (rotated) keys and values at their positions. Rows of a forward name their
cache row (`rows`), so finished requests simply stop appearing and nothing is copied.

`BlockKVCache` holds the tensors per layer, allocated on first use with the local heads (under tensor
parallelism each rank holds its own key / value heads; under pipeline parallelism each stage its own
layers). `CachedBlocks` is what Megatron's attention receives as its mask: the cache and this forward's rows,
lengths, positions, new-token mask and writes, sliced per micro-batch like the rest of the batch.

Masked diffusion (Fast-dLLM's dual cache, rollout/masked_cache.py) caches the whole canvas and feeds only the
current block: `replaced` marks, per row, the cached positions [start, stop) that the new tokens stand for, so
they are not read from the cache (stale keys of the block) while everything around them is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def attend_cached(q, k, v, cache_k, cache_v, rows, lengths, positions, new_mask, write, scale: float,
                  span: int | None = None, replaced: torch.Tensor | None = None, static: bool = False):
    """q [b, heads, t, d]; k, v [b, groups, t, d] (the new tokens, rotated); cache_k / cache_v
    [rows_total, groups, max_len, d]; rows [b] (each row's cache row), lengths [b] (its cached positions),
    positions [b, t], new_mask bool [b, t, t] (True = may attend), write bool [b, t] (store these tokens at their
    positions, after they are read); span: how many cached positions to read (at least max(lengths); given, it
    saves a device sync per layer); replaced [b, 2] or None: cached positions [start, stop) of each row that are
    not read (the new tokens replace them); static: write without reading `write` on the host (every new
    token's slot is stored, the old value where it does not write: shapes and work never depend on the values,
    for the device loop, rollout/device_loop.py). Returns [b, heads, t, d]."""
    b, t = positions.shape
    if span is None:
        span = int(lengths.max()) if lengths.numel() else 0
    cached_positions = torch.arange(span, device=q.device)[None, :]
    cached = cached_positions < lengths[:, None]  # [b, span]
    if replaced is not None:
        cached = cached & ~((cached_positions >= replaced[:, :1]) & (cached_positions < replaced[:, 1:]))
    keys = torch.cat([cache_k[rows, :, :span], k], dim=2)
    values = torch.cat([cache_v[rows, :, :span], v], dim=2)
    allowed = torch.cat([cached[:, None, :].expand(b, t, span), new_mask], dim=2)
    if static:
        slot_rows = rows[:, None].expand(b, t)
        for cache, new in ((cache_k, k), (cache_v, v)):
            old = cache[slot_rows, :, positions]  # [b, t, groups, d]
            cache[slot_rows, :, positions] = torch.where(write[..., None, None], new.transpose(1, 2).to(cache.dtype), old)
    elif write.any():
        row, col = torch.nonzero(write, as_tuple=True)
        cache_k[rows[row], :, positions[row, col]] = k.transpose(1, 2)[row, col].to(cache_k.dtype)
        cache_v[rows[row], :, positions[row, col]] = v.transpose(1, 2)[row, col].to(cache_v.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None],
                                          enable_gqa=q.shape[1] != k.shape[1], scale=scale)


@dataclass
class BlockKVCache:
    """Keys and values per layer, [rows, groups, max_len, head_dim], allocated when a layer first needs them."""

    rows: int
    max_len: int
    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)

    def layer(self, layer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`like`: a new key tensor [b, groups, t, d] of this layer (shape, dtype and device to allocate)."""
        if layer not in self.keys:
            shape = (self.rows, like.shape[1], self.max_len, like.shape[3])
            self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.keys[layer], self.values[layer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


@dataclass
class CachedBlocks:
    """The attention "mask" of a cached decoding forward (see the module docstring); [b] / [b, t] tensors."""

    cache: BlockKVCache
    rows: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    new_mask: torch.Tensor
    write: torch.Tensor
    span: int = -1  # cached positions every row reads (-1: max(lengths), taken while `lengths` is on the CPU)
    replaced: torch.Tensor | None = None  # [b, 2]: cached positions [start, stop) not read (see attend_cached)
    static: bool = False  # writes that never read `write` on the host (see attend_cached)

    def __post_init__(self):
        if self.span < 0:
            self.span = int(self.lengths.max()) if self.lengths.numel() else 0

    def attend(self, layer, q, k, v, scale: float):
        cache_k, cache_v = self.cache.layer(layer, k)
        return attend_cached(q, k, v, cache_k, cache_v, self.rows, self.lengths, self.positions, self.new_mask,
                             self.write, scale, self.span, self.replaced, self.static)

    def select(self, start: int, stop: int) -> "CachedBlocks":
        return CachedBlocks(self.cache, self.rows[start:stop], self.lengths[start:stop],
                            self.positions[start:stop], self.new_mask[start:stop], self.write[start:stop], self.span,
                            None if self.replaced is None else self.replaced[start:stop], self.static)

    def to(self, device) -> "CachedBlocks":
        return CachedBlocks(self.cache, *(t.to(device) for t in (self.rows, self.lengths, self.positions,
                                                                  self.new_mask, self.write)), self.span,
                            None if self.replaced is None else self.replaced.to(device), self.static)
