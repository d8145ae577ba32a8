"""Block-diffusion attention masks, described per token.

A mask is three per-token vectors on each side (queries, keys): the document a token belongs to (packed samples
are kept apart), its block index on the block grid of its document, and its stream (noisy copy x_t or clean
copy x_0). One rule covers every mask dare_mega needs:

    q may attend k  iff  doc(q) == doc(k)  and  ( (stream(q) == stream(k) and block(q) == block(k))
                                                  or (k is clean and block(k) < block(q)) )

- SDAR / BD3 training, two streams [x_t ; x_0]: a noisy block sees itself and the clean blocks strictly
  before it; the clean stream is block-causal; nothing sees the noisy stream from another block.
- Inference (one clean stream): block-causal. Block size 1 gives the plain causal mask.
- Rollout with a KV cache: the queries are the current block, the keys are the cache plus the block.

Dense boolean masks (True = may attend) are built only on request: the GPU path hands the same rule to a
block-sparse kernel (FlexAttention) and never materialises [s, s].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NOISY, CLEAN = 0, 1


@dataclass
class TokenGroups:
    """Per-token document id, block id and stream (0 noisy, 1 clean); each [batch, seq] int64."""

    doc: torch.Tensor
    block: torch.Tensor
    stream: torch.Tensor

    def __post_init__(self):
        if not (self.doc.shape == self.block.shape == self.stream.shape) or self.doc.dim() != 2:
            raise ValueError(
                "TokenGroups: doc, block and stream must be [batch, seq] of one shape; got "
                f"{tuple(self.doc.shape)}, {tuple(self.block.shape)}, {tuple(self.stream.shape)}"
            )

    def to(self, device) -> "TokenGroups":
        return TokenGroups(self.doc.to(device), self.block.to(device), self.stream.to(device))

    def __getitem__(self, index) -> "TokenGroups":
        return TokenGroups(self.doc[index], self.block[index], self.stream[index])


@dataclass
class BlockDiffusionMask:
    """The attention pattern of one batch: query groups, key groups (default: the same tokens)."""

    q: TokenGroups
    kv: TokenGroups | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _flex: dict = field(default_factory=dict, repr=False)

    @property
    def keys(self) -> TokenGroups:
        return self.q if self.kv is None else self.kv

    @property
    def batch_size(self) -> int:
        return self.q.doc.shape[0]

    @property
    def q_len(self) -> int:
        return self.q.doc.shape[1]

    @property
    def kv_len(self) -> int:
        return self.keys.doc.shape[1]

    def to(self, device) -> "BlockDiffusionMask":
        return BlockDiffusionMask(self.q.to(device), None if self.kv is None else self.kv.to(device))

    def dense(self) -> torch.Tensor:
        """Boolean [batch, 1, q_len, kv_len], True where attention is allowed (cached)."""
        if self._dense is None:
            q, k = self.q, self.keys
            same_doc = q.doc[:, :, None] == k.doc[:, None, :]
            same_group = (q.stream[:, :, None] == k.stream[:, None, :]) & (
                q.block[:, :, None] == k.block[:, None, :]
            )
            earlier_clean = (k.stream[:, None, :] == CLEAN) & (k.block[:, None, :] < q.block[:, :, None])
            self._dense = (same_doc & (same_group | earlier_clean)).unsqueeze(1)
        return self._dense

    def mask_mod(self):
        """The same rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx)."""
        q, k = self.q, self.keys

        def mask_mod(b, h, q_idx, kv_idx):
            same_doc = q.doc[b, q_idx] == k.doc[b, kv_idx]
            same_group = (q.stream[b, q_idx] == k.stream[b, kv_idx]) & (q.block[b, q_idx] == k.block[b, kv_idx])
            earlier_clean = (k.stream[b, kv_idx] == CLEAN) & (k.block[b, kv_idx] < q.block[b, q_idx])
            return same_doc & (same_group | earlier_clean)

        return mask_mod

    def flex_block_mask(self, block_size: int = 128):
        """A FlexAttention BlockMask for this pattern (built once per batch, shared by all layers)."""
        key = (str(self.q.doc.device), block_size)
        if key not in self._flex:
            from torch.nn.attention.flex_attention import create_block_mask

            self._flex[key] = create_block_mask(
                self.mask_mod(), B=self.batch_size, H=None, Q_LEN=self.q_len, KV_LEN=self.kv_len,
                device=self.q.doc.device, BLOCK_SIZE=block_size,
            )
        return self._flex[key]


# ----------------------------------------------------------------------------------------------------------
# Builders


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids from position ids that restart at 0 for each packed sample: [b, n] -> [b, n]."""
    starts = position_ids == 0
    starts[:, 0] = True
    return torch.cumsum(starts.long(), dim=1) - 1


def inference_mask(position_ids: torch.Tensor, block_size: int) -> BlockDiffusionMask:
    """Block-causal mask over one clean stream; packed samples (positions restarting at 0) kept apart."""
    doc = _segments(position_ids)
    groups = TokenGroups(doc=doc, block=position_ids // block_size, stream=torch.full_like(doc, CLEAN))
    return BlockDiffusionMask(groups)


def causal_mask(position_ids: torch.Tensor) -> BlockDiffusionMask:
    """The autoregressive causal mask (block size 1), per packed sample."""
    return inference_mask(position_ids, block_size=1)


def two_stream_mask(position_ids: torch.Tensor, block_size: int) -> BlockDiffusionMask:
    """The SDAR / BD3 training mask for the layout [x_t ; x_0] of `two_stream_inputs`.

    `position_ids` are those of ONE stream, [b, n] (restarting at 0 for each packed sample); the mask covers
    2n tokens: the noisy copies first, then the clean copies, each at its sample's positions 0..len-1.
    """
    doc = _segments(position_ids)
    block = position_ids // block_size
    groups = TokenGroups(
        doc=torch.cat([doc, doc], dim=1),
        block=torch.cat([block, block], dim=1),
        stream=torch.cat([torch.full_like(doc, NOISY), torch.full_like(doc, CLEAN)], dim=1),
    )
    return BlockDiffusionMask(groups)


def two_stream_inputs(noisy_ids: torch.Tensor, clean_ids: torch.Tensor, position_ids: torch.Tensor):
    """Lay out [x_t ; x_0] along the sequence with shared positions: returns (input_ids, position_ids)."""
    if noisy_ids.shape != clean_ids.shape or noisy_ids.shape != position_ids.shape:
        raise ValueError(
            f"two_stream_inputs: noisy_ids {tuple(noisy_ids.shape)}, clean_ids {tuple(clean_ids.shape)} and "
            f"position_ids {tuple(position_ids.shape)} must have one shape [batch, n]"
        )
    return torch.cat([noisy_ids, clean_ids], dim=1), torch.cat([position_ids, position_ids], dim=1)


def packed_position_ids(lengths: list[list[int]], total: int | None = None) -> torch.Tensor:
    """Position ids for packed rows: each row holds samples of the given lengths, each counted from 0.

    A row shorter than `total` is filled with one more pseudo-sample (the pack's padding) counted from 0.
    """
    total = total or max(sum(row) for row in lengths)
    rows = []
    for row in lengths:
        if sum(row) > total:
            raise ValueError(f"packed_position_ids: samples {row} exceed the row length {total}")
        pieces = [torch.arange(n) for n in row]
        if sum(row) < total:
            pieces.append(torch.arange(total - sum(row)))
        rows.append(torch.cat(pieces))
    return torch.stack(rows)
