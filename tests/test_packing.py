"""The one bin-packer (data/packing.py) and the one batch builder (algorithms/layout.py) that SFT and RL share."""

import itertools
import random

import pytest
import torch

from dare_mega.algorithms.layout import lay_out
from dare_mega.data.packing import pack_lengths


def optimum(lengths: list[int], capacity: int) -> int:
    """The fewest bins, by trying every assignment of items to bins (small instances only)."""
    for k in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(k), repeat=len(lengths)):
            fill = [0] * k
            for n, b in zip(lengths, assignment):
                fill[b] += n
            if max(fill) <= capacity:
                return k
    raise AssertionError("unreachable")


@pytest.mark.parametrize("packing", ["in_order", "ffd", "none"])
def test_every_item_is_placed_once_within_capacity(packing):
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randrange(4, 30)
        lengths = [rng.randrange(1, capacity + 1) for _ in range(rng.randrange(1, 12))]
        bins = pack_lengths(lengths, capacity, packing)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b for b in bins) and all(sum(lengths[i] for i in b) <= capacity for b in bins)
        if packing == "in_order":  # next fit: order kept, and a bin closes only when the next item did not fit
            assert [i for b in bins for i in b] == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in a) + lengths[b[0]] > capacity for a, b in zip(bins, bins[1:]))
        if packing == "none":
            assert len(bins) == len(lengths)


def test_first_fit_decreasing_is_near_the_optimum():
    """FFD's bound (Dosa 2007): at most 11/9 OPT + 6/9 bins; checked against exhaustive search."""
    rng = random.Random(1)
    worse = 0
    for _ in range(60):
        capacity = rng.randrange(6, 20)
        lengths = [rng.randrange(1, capacity + 1) for _ in range(rng.randrange(1, 8))]
        best = optimum(lengths, capacity)
        got = len(pack_lengths(lengths, capacity, "ffd"))
        assert best <= got <= 11 / 9 * best + 6 / 9, (lengths, capacity)
        worse += len(pack_lengths(lengths, capacity, "in_order")) > got
    assert worse > 0  # the instances are not all trivial: next fit loses on some


def test_bad_packing_input_is_named():
    with pytest.raises(ValueError, match="item 1 has 9 tokens, more than the capacity 8"):
        pack_lengths([3, 9], 8, "ffd")
    with pytest.raises(ValueError, match="packing='best'"):
        pack_lengths([3], 8, "best")
    with pytest.raises(ValueError, match=r"piece 0 has noisy \(3,\), clean \(4,\)"):
        lay_out([torch.zeros(3, dtype=torch.long)], [torch.zeros(4, dtype=torch.long)], [[0]], 4)
    with pytest.raises(ValueError, match="every piece must be in exactly one bin"):
        lay_out([torch.zeros(3, dtype=torch.long)] * 2, [torch.zeros(3, dtype=torch.long)] * 2, [[0]], 4)


@pytest.mark.parametrize("two_stream", [True, False])
def test_lay_out_places_pieces_and_inverts(two_stream):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 2]
    clean = [torch.randint(10, 99, (n,), generator=g) for n in lengths]
    noisy = [torch.where(torch.rand(n, generator=g) < 0.5, torch.full((n,), 1), c) for n, c in zip(lengths, clean)]
    weights = [torch.rand(n, generator=g) for n in lengths]
    laid = lay_out(noisy, clean, [[2, 1], [0, 3]], 4, weights=weights, normalizer=[4, 6], multiple=4,
                   min_rows=3, two_stream=two_stream)
    batch = laid.batch
    assert laid.stream == 12 and batch.size == 3 and laid.width == 7  # 10 rounded up to 4's multiple; one empty
    assert laid.places == [(1, 0, 5), (0, 7, 3), (0, 0, 7), (1, 5, 2)]
    assert batch.loss_normalizer.tolist() == [4, 6, 0]
    per_piece = torch.zeros(4, 7)
    for i, n in enumerate(lengths):
        per_piece[i, :n] = weights[i]
    assert torch.equal(laid.pack(per_piece), batch.loss_weights[:, :12])
    assert torch.equal(laid.unpack(laid.pack(per_piece)), per_piece)
    assert batch.input_ids[0, :10].tolist() == noisy[2].tolist() + noisy[1].tolist()
    assert batch.position_ids[0, :12].tolist() == list(range(7)) + list(range(3)) + list(range(2))
    assert batch.labels[1, :12].tolist() == clean[0].tolist() + clean[3].tolist() + [0] * 5
    if two_stream:
        assert batch.seq_len == 24 and batch.input_ids[0, 12:22].tolist() == clean[2].tolist() + clean[1].tolist()
        assert (batch.loss_weights[:, 12:] == 0).all()
    else:
        assert batch.seq_len == 12
