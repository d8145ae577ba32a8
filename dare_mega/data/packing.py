"""The one bin-packer: items of given lengths into bins of a capacity, used by SFT (documents into rows of
`data.token_budget` tokens) and RL (estimator rows into sequences of `train.pack_tokens` tokens per stream).

- `in_order`: next fit. Items keep their order; a bin closes when the next item does not fit. Consecutive
  documents stay together (the SFT default, what earlier versions did).
- `ffd`: first fit decreasing. Longest first, each into the first bin with room: fewer bins, less padding
  (at most 11/9 of the optimum plus one bin), at the price of regrouping items by length.
- `none`: one item per bin (a padded layout).
"""

from __future__ import annotations

PACKINGS = ("in_order", "ffd", "none")


def pack_lengths(lengths: list[int], capacity: int, packing: str = "in_order") -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity` (ignored by `none`).
    Within a bin items keep their input order for `in_order` and their placing order for `ffd`."""
    if packing not in PACKINGS:
        raise ValueError(f"pack_lengths: packing={packing!r} is not one of {', '.join(PACKINGS)}")
    if packing == "none":
        return [[i] for i in range(len(lengths))]
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i = too_long[0]
        raise ValueError(f"pack_lengths: item {i} has {lengths[i]} tokens, more than the capacity {capacity}")
    bins: list[list[int]] = []
    fill: list[int] = []
    if packing == "in_order":
        for i, n in enumerate(lengths):
            if not bins or fill[-1] + n > capacity:
                bins.append([]), fill.append(0)
            bins[-1].append(i)
            fill[-1] += n
        return bins
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        target = next((b for b, used in enumerate(fill) if used + lengths[i] <= capacity), None)
        if target is None:
            bins.append([]), fill.append(0)
            target = len(bins) - 1
        bins[target].append(i)
        fill[target] += lengths[i]
    return bins
