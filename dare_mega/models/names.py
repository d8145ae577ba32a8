"""Megatron tensor names, parsed in one place: layers, experts, the grouped-GEMM and stacked forms.

The mapping table names a routed expert's tensor in the canonical (SequentialMLP) form
`decoder.layers.L.mlp.experts.local_experts.E.linear_fc1.weight` with GLOBAL layer and expert indices. Megatron
names the same tensor `...mlp.experts.linear_fc1.weightE` under grouped GEMM (E local to the expert-parallel
rank), torch_dist stores all experts of a layer under one key `...mlp.experts.experts.linear_fc1.weight`, and
the rollout engine keeps them stacked as `...mlp.experts.linear_fc1.weight`. The functions below convert.
"""

from __future__ import annotations

import re

_GROUPED = re.compile(r"\.mlp\.experts\.linear_fc(\d)\.weight(\d+)$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(.+)$")
_STORED_STACK = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.experts\.(linear_fc\d\.weight)$")


def canonical(name: str) -> str:
    """Grouped-GEMM expert names (linear_fc1.weight<k>) in the canonical form (local_experts.<k>...)."""
    return _GROUPED.sub(r".mlp.experts.local_experts.\2.linear_fc\1.weight", name)


def layer_of(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def split_expert(name: str) -> tuple[str, int | None]:
    """(the name without its expert: the engine's stacked form, the expert index) of a canonical name;
    (name, None) for a tensor that is not a routed expert's."""
    match = _EXPERT.match(name)
    if not match:
        return name, None
    return f"{match.group(1)}.{match.group(3)}", int(match.group(2))


def with_indices(name: str, layer: int | None = None, expert: int | None = None) -> str:
    """A canonical name with its layer and/or expert index replaced (local -> global)."""
    if layer is not None:
        name = _LAYER.sub(f"decoder.layers.{layer}.", name, count=1)
    if expert is not None:
        stacked, old = split_expert(name)
        if old is not None:
            prefix, tail = stacked.split(".mlp.experts.", 1)
            name = f"{prefix}.mlp.experts.local_experts.{expert}.{tail}"
    return name


def stored_key(name: str) -> tuple[str, int | None]:
    """(torch_dist key, expert index or None) of a canonical name: grouped experts share one stacked key."""
    match = _EXPERT.match(name)
    if not match or not re.fullmatch(r"linear_fc\d\.weight", match.group(3)):
        return name, None
    return f"{match.group(1)}.experts.{match.group(3)}", int(match.group(2))


def from_stored_key(key: str, expert: int | None = None) -> str:
    """The canonical name of a torch_dist key; a stacked expert key needs the expert index."""
    match = _STORED_STACK.match(key)
    if not match:
        return key
    if expert is None:
        raise ValueError(f"{key}: a stacked expert key needs the expert index")
    return f"{match.group(1)}.local_experts.{expert}.{match.group(2)}"


def is_stored_stack(key: str) -> bool:
    return _STORED_STACK.match(key) is not None
