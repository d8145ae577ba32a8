"""A model family: which HF architectures it reads, how its config becomes ModelArgs, its mapping table, its
reference, its SFT objective, tiny presets and tokenizer, and the decoding its authors report.

A family is one folder, dare_mega/models/<family>/, whose __init__ registers one ModelFamily; `family_for
(architecture)` finds it. What a model needs beyond the plain block-diffusion transformer is a set of
FEATURES (`ModelArgs.features`); each component that runs models (the Megatron builder, the rollout engine,
each family's reference) declares the features it implements and `require_features` refuses, by name, a model
that needs one it does not.
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
    # under the checkpoint's names (None: the module's own parameter names are the checkpoint's)
    reference: Callable | None = None
    reference_named_tensors: Callable | None = None
    # the features its reference implements (FEATURES above)
    reference_features: frozenset[str] = frozenset()
    # the SFT objective of its published recipe (algorithms/sft.py: loss.name=auto)
    sft_objective: str = "sdar_block"
    # the tiny presets of configs/models/ that make test checkpoints of it, and its tiny tokenizer
    # (checkpoint/tiny.py: specials, eos, pad, mask, chat template, generation_eos)
    tiny_presets: tuple[str, ...] = ()
    tiny_tokenizer: dict = field(default_factory=dict)
    # the decoding the model's authors report (SamplingParams fields; block size comes from the checkpoint):
    # what evaluation uses unless told otherwise
    decoding: dict = field(default_factory=dict)
    # what SGLang 0.5.23 decodes these architectures with when --dllm-algorithm-config says nothing
    # ({"block_size", "mask_id"}, sglang/srt/dllm/config.py; tests/test_sglang.py checks them against it);
    # None: SGLang does not serve the family as a diffusion LLM
    sglang_dllm: dict | None = None


FEATURES = {
    "qk_norm": "RMSNorm on q and k before the rotary embedding",
    "qkv_bias": "biases on the q, k and v projections",
    "partial_rope": "a rotary embedding on part of each head (rotary_percent < 1)",
    "tied_embeddings": "the output layer shares the input embedding",
    "shifted_logits": "position i predicts token i+1 (Dream) instead of token i",
    "full_attention": "bidirectional attention over the whole sequence (masked diffusion) instead of blocks",
    "router_softmax": "an MoE router with softmax scores (Qwen3-MoE)",
    "router_sigmoid": "an MoE router with sigmoid scores",
    "router_sigmoid_grouped": "an MoE router with sigmoid scores and group-limited top-k (BailingMoeV2)",
    "expert_bias": "an MoE selection bias (aux-loss-free balancing)",
    "shared_expert": "an always-on shared expert beside the routed ones",
}


def require_features(args: ModelArgs, implemented: frozenset[str] | set[str], component: str) -> None:
    """Refuse, naming each missing feature, a model that needs what `component` does not implement."""
    missing = sorted(args.features - set(implemented))
    if missing:
        raise ConfigError(f"{args.architecture}: {component} does not implement "
                          + "; ".join(f"{name} ({FEATURES[name]})" for name in missing))


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


def families() -> list[ModelFamily]:
    """Every registered family, once each, by name."""
    return sorted({f.name: f for f in _FAMILIES.values()}.values(), key=lambda f: f.name)


def family_named(name: str) -> ModelFamily:
    """The registered family called `name` (ModelArgs.family)."""
    for family in families():
        if family.name == name:
            return family
    raise ConfigError(f"unknown model family {name!r}; dare_mega knows: {', '.join(f.name for f in families())}")


def known_architectures() -> list[str]:
    return sorted(_FAMILIES)
