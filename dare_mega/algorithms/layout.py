"""The one builder of the model's batch from pieces (SFT documents, RL estimator rows) grouped into rows.

Each piece is a noisy and a clean token sequence of one length (and, for SFT, loss weights on the noisy
tokens). A packed row holds its pieces back to back, each with positions from 0, so the block-diffusion mask
keeps them apart; the row's leftover is one more padding piece that nothing attends to and that carries no
loss. Two-stream rows are [x_t ; x_0] with shared positions (block diffusion); single-stream rows are x_t
alone with bidirectional attention within each piece (masked diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_mega.diffusion.masks import inference_mask, packed_position_ids, two_stream_inputs, two_stream_mask
from dare_mega.models.runner import Batch


@dataclass
class PackedBatch:
    """`batch` holds packed rows; `places[i]` = (packed row, offset, length) of piece i."""

    batch: Batch
    places: list[tuple[int, int, int]]
    width: int  # the longest piece
    stream: int  # tokens per stream of a packed row

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[packed rows, n] (one stream) -> [pieces, width], zero past each piece's end."""
        out = packed.new_zeros(len(self.places), self.width)
        for i, (row, offset, length) in enumerate(self.places):
            out[i, :length] = packed[row, offset : offset + length]
        return out

    def pack(self, per_piece: torch.Tensor) -> torch.Tensor:
        """The inverse layout: [pieces, width] -> [packed rows, n]."""
        out = per_piece.new_zeros(self.batch.size, self.stream)
        for i, (row, offset, length) in enumerate(self.places):
            out[row, offset : offset + length] = per_piece[i, :length]
        return out


def lay_out(noisy: list[torch.Tensor], clean: list[torch.Tensor], bins: list[list[int]], block_size: int, *,
            weights: list[torch.Tensor] | None = None, normalizer: list[int] | None = None, min_length: int = 0,
            multiple: int = 1, min_rows: int = 0, row_multiple: int = 1, two_stream: bool = True) -> PackedBatch:
    """Pieces `bins[r]` side by side in packed row r (the bins come from data/packing.py: pack_lengths).

    The rows are as long as the fullest bin, at least `min_length`, rounded up to a multiple of `multiple`
    (sequence parallelism splits each stream over the tensor-parallel ranks). Empty rows are added up to
    `min_rows` and then to a multiple of `row_multiple` (Megatron's schedules want equal micro-batches; every
    rank of an expert-parallel group must run the same shapes). `weights[i]` are piece i's loss weights on its
    noisy tokens (default 0) and `normalizer[r]` row r's share of the loss normaliser (default 0)."""
    lengths = [len(c) for c in clean]
    for i, (x, c) in enumerate(zip(noisy, clean)):
        if x.shape != c.shape or (weights is not None and weights[i].shape != c.shape):
            raise ValueError(f"lay_out: piece {i} has noisy {tuple(x.shape)}, clean {tuple(c.shape)}"
                             + (f" and weights {tuple(weights[i].shape)}" if weights is not None else "")
                             + "; they must be one length")
    bins = [list(b) for b in bins]
    while len(bins) < min_rows or len(bins) % max(1, row_multiple):
        bins.append([])
    n = max([sum(lengths[i] for i in b) for b in bins] + [1, min_length])
    n += -n % max(1, multiple)
    noisy_rows = torch.zeros(len(bins), n, dtype=torch.long)
    clean_rows = torch.zeros(len(bins), n, dtype=torch.long)
    weight_rows = torch.zeros(len(bins), n)
    places: list = [None] * len(lengths)
    for r, members in enumerate(bins):
        offset = 0
        for i in members:
            span = slice(offset, offset + lengths[i])
            noisy_rows[r, span], clean_rows[r, span] = noisy[i], clean[i]
            if weights is not None:
                weight_rows[r, span] = weights[i]
            places[i] = (r, offset, lengths[i])
            offset += lengths[i]
    if any(p is None for p in places):
        raise ValueError("lay_out: every piece must be in exactly one bin")
    norm = torch.zeros(len(bins), dtype=torch.long)
    if normalizer is not None:
        norm[: len(normalizer)] = torch.tensor(normalizer, dtype=torch.long)
    positions = packed_position_ids([[lengths[i] for i in members] for members in bins], n)
    if two_stream:
        input_ids, position_ids = two_stream_inputs(noisy_rows, clean_rows, positions)
        batch = Batch(input_ids, position_ids, two_stream_mask(positions, block_size),
                      labels=torch.cat([clean_rows, clean_rows], 1),
                      loss_weights=torch.cat([weight_rows, torch.zeros_like(weight_rows)], 1), loss_normalizer=norm)
    else:  # masked diffusion: each piece attends to itself bidirectionally (one block as long as the row)
        batch = Batch(noisy_rows, positions, inference_mask(positions, n), labels=clean_rows,
                      loss_weights=weight_rows, loss_normalizer=norm)
    return PackedBatch(batch, places, max(lengths, default=0), n)
