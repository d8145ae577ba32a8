"""A model family: which HF architectures it reads, how its config becomes ModelArgs, its mapping table.

Families register themselves in dare_mega/models/__init__.py; `family_for(architecture)` finds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dare_mega.errors import ConfigError
from dare_mega.models.args import ModelArgs
from dare_mega.models.weight_mapping import MappingTable


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]
    args_from_hf: Callable[[dict, str], ModelArgs]  # (config dict, source file for messages) -> ModelArgs
    mapping: Callable[[ModelArgs], MappingTable]
    default_mask_token_id: int
    default_block_size: int
    # the single-process HF reference: (checkpoint dir) -> module whose forward(input_ids, position_ids,
    # attention_mask=additive [b, 1, s, s]) returns an object with .logits; and (module, grads) -> tensors
    # under the checkpoint's names
    reference: Callable | None = None
    reference_named_tensors: Callable | None = None
    # the decoding the model's authors report (SamplingParams fields; block size comes from the checkpoint):
    # what evaluation uses unless told otherwise
    decoding: dict = field(default_factory=dict)


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    for arch in family.architectures:
        _FAMILIES[arch] = family
    return family


def family_for(architecture: str, source: str = "config.json") -> ModelFamily:
    if architecture not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES))
        raise ConfigError(f"{source}: unknown architecture {architecture!r}; dare_mega knows: {known}")
    return _FAMILIES[architecture]


def known_architectures() -> list[str]:
    return sorted(_FAMILIES)
