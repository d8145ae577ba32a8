"""The architecture of one model, family-neutral: what an HF config.json says, in the terms Megatron needs.

Each family (dare_mega/models/<family>/) turns its HF config into `ModelArgs`; everything downstream
(TransformerConfig, layer spec, weight mapping, masks) reads only `ModelArgs`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dare_mega.errors import ConfigError


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    topk: int
    expert_ffn_hidden_size: int
    norm_topk_prob: bool = True
    score_function: str = "softmax"  # "softmax" (Qwen3-MoE) or "sigmoid" (BailingMoeV2)
    layer_pattern: tuple[int, ...] = ()  # per layer: 1 = MoE, 0 = dense
    shared_expert_ffn_hidden_size: int = 0  # 0 = no shared expert
    num_groups: int | None = None  # group-limited routing
    group_topk: int | None = None
    scaling_factor: float | None = None  # routed_scaling_factor
    expert_bias: bool = False  # aux-loss-free selection bias (an fp32 buffer)
    aux_loss_coef: float = 0.0


@dataclass(frozen=True)
class DiffusionArgs:
    mask_token_id: int
    block_size: int
    shifted_logits: bool = False  # Dream predicts token i at i-1; SDAR and LLaDA predict in place
    attention: str = "block_diffusion"  # or "full": bidirectional over the whole sequence (LLaDA, Dream)
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelArgs:
    family: str  # the registry's name of its family (dare_mega/models/<family>/): "sdar", "llada2"
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rotary_percent: float = 1.0
    max_position_embeddings: int = 32768
    qk_norm: bool = True
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2 / Dream)
    tie_word_embeddings: bool = False
    moe: MoEArgs | None = None
    diffusion: DiffusionArgs | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def layer_is_moe(self, layer: int) -> bool:
        return bool(self.moe and self.moe.layer_pattern[layer])

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def features(self) -> frozenset[str]:
        """What a component must implement to run this model (the names of models/family.py's FEATURES)."""
        out = set()
        if self.qk_norm:
            out.add("qk_norm")
        if self.qkv_bias:
            out.add("qkv_bias")
        if self.rotary_percent < 1:
            out.add("partial_rope")
        if self.tie_word_embeddings:
            out.add("tied_embeddings")
        if self.diffusion is not None and self.diffusion.shifted_logits:
            out.add("shifted_logits")
        if self.diffusion is not None and self.diffusion.attention == "full":
            out.add("full_attention")
        if self.moe is not None:
            out.add(f"router_{self.moe.score_function}" + ("_grouped" if self.moe.num_groups else ""))
            if self.moe.expert_bias:
                out.add("expert_bias")
            if self.moe.shared_expert_ffn_hidden_size:
                out.add("shared_expert")
        return frozenset(out)


def require_architecture(hf_config: dict, source: str, *known: str) -> str:
    """config.json's first architecture, which must be one of `known` (the family's)."""
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ConfigError(f"{source}: required key 'architectures' is missing")
    if archs[0] not in known:
        raise ConfigError(f"{source}: architecture {archs[0]!r} is not {' or '.join(repr(k) for k in known)}")
    return archs[0]


def require(hf_config: dict, key: str, source: str, kind=int):
    """Read a required key of an HF config, naming the key and the file when it is absent or malformed."""
    if key not in hf_config or hf_config[key] is None:
        raise ConfigError(f"{source}: required key {key!r} is missing")
    value = hf_config[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {key}={value!r} must be an integer")
    if kind is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: {key}={value!r} must be a number")
    if kind in (int, float) and value <= 0 and key not in ("first_k_dense_replace",):
        raise ConfigError(f"{source}: {key}={value!r} must be positive")
    return value


def read_attention(cfg: dict, source: str) -> dict:
    """The transformer sizes every family shares, checked: ModelArgs keyword arguments."""
    num_layers = require(cfg, "num_hidden_layers", source)
    hidden = require(cfg, "hidden_size", source)
    heads = require(cfg, "num_attention_heads", source)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}")
    return dict(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        ffn_hidden_size=require(cfg, "intermediate_size", source),
        vocab_size=require(cfg, "vocab_size", source),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def read_mask_token(cfg: dict, source: str, override: int | None, default: int, vocab: int) -> int:
    mask = override if override is not None else cfg.get("mask_token_id", default)
    if not 0 <= mask < vocab:
        raise ConfigError(f"{source}: mask_token_id={mask} is outside the vocabulary (vocab_size={vocab})")
    # DARE's SDAR-30B-A3B recipe passed 151643 (<|endoftext|>, the pad/EOS id) as the mask: training would
    # then teach the model to "denoise" end-of-text tokens. A mask id that is the pad or a stop id is refused.
    specials = {"pad_token_id": cfg.get("pad_token_id"), "eos_token_id": read_eos_ids(cfg)}
    names = {"pad_token_id": "the pad", "eos_token_id": "an end-of-text"}
    for key, value in specials.items():
        if mask == value or (isinstance(value, tuple) and mask in value):
            raise ConfigError(f"{source}: mask_token_id={mask} is also {names[key]} token ({key}={value}); "
                              f"the mask token must be its own token")
    return mask


def read_eos_ids(cfg: dict) -> tuple[int, ...]:
    """generation_config.json's stop ids (merged in by load_model_args) first, then config.json's."""
    ids: tuple = ()
    for eos in (cfg.get("generation_eos_token_id"), cfg.get("eos_token_id")):
        ids += tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return tuple(dict.fromkeys(ids))
