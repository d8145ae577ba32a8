"""LLaDA-MoE (LLaDAMoEModelLM: inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct): HF config.json -> ModelArgs.

A masked diffusion model with OLMoE's layout: pre-RMSNorm blocks, q / k / v / o projections without biases
(`attention_bias`), per-head RMSNorm on q and k (`qk_layernorm`) before a rotate-half rotary embedding on the
first head_dim * `partial_rotary_factor` dims, bidirectional attention over the whole sequence, in-place
prediction (no logit shift), and per layer (`moe_layer_freq`) either a dense SwiGLU MLP
(`dense_intermediate_size`) or a sparse MoE block: a softmax router over `num_experts` experts, the top
`num_experts_per_tok` probabilities as weights without renormalisation, SwiGLU experts
(`expert_intermediate_size`) and, when `shared_expert_intermediate_size` is set, one always-on shared expert.

What the published modeling_lladamoe.py does regardless of config.json, and so what this module follows:
`norm_topk_prob` is ignored (the MoE block hard-codes no renormalisation), the router always applies softmax
(`moe_router_score_function` is stored but never read), and `routed_scaling_factor`, `router_num_group`,
`router_topk_group` are never read. Settings it does read but the Megatron model cannot reproduce are refused
by key: `moe_router_enable_expert_bias` (the code adds the bias to the routing weights themselves, not only to
the selection), `clip_qkv`, `attention_bias`, `rope_scaling`, a `hidden_act` other than silu, a `head_dim` other
than hidden_size / num_attention_heads (the attention ignores the key, the rotary embedding would not).

The mask id 156895 (<|mask|>, the Ling tokenizer LLaDA2 shares) is not in config.json; the model card's
generate() passes it. `block_size` is the semi-autoregressive generation's block length, not an attention block.
"""

from __future__ import annotations

from dare_mega.errors import ConfigError
from dare_mega.models.args import (
    DiffusionArgs,
    ModelArgs,
    MoEArgs,
    read_eos_ids,
    read_mask_token,
    require,
    require_architecture,
)

ARCH = "LLaDAMoEModelLM"
MASK_TOKEN_ID = 156895  # <|mask|>
BLOCK_SIZE = 32  # LLaDA generate()'s block_length
EOS_TOKEN_ID = 156892  # <|endoftext|>: config.json's eos_token_id, also the pad of the family's training
# configuration_lladamoe.py's default pad_token_id: nn.Embedding(padding_idx=pad_token_id) when config.json
# leaves the key out, so that row never gets a gradient in HF training
HF_DEFAULT_PAD_TOKEN_ID = 1


def _check_supported(cfg: dict, source: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported (LLaDA-MoE's MLPs are SwiGLU: 'silu')")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported (the published LLaDA-MoE has no "
                          "projection biases, and the Megatron model has none on the output projection)")
    if cfg.get("clip_qkv") is not None:
        raise ConfigError(f"{source}: clip_qkv={cfg['clip_qkv']!r} is not supported (the published LLaDA-MoE "
                          "has none)")
    if cfg.get("rope_scaling"):
        raise ConfigError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported (LLaDA-MoE has none)")
    if cfg.get("moe_router_enable_expert_bias"):
        raise ConfigError(
            f"{source}: moe_router_enable_expert_bias=true is not supported: LLaDA-MoE's MoE block adds the bias "
            "to the softmax probabilities it then uses as the expert weights, while Megatron's expert bias only "
            "steers the selection")


def moe_layer_pattern(cfg: dict, num_layers: int, source: str) -> tuple[int, ...]:
    """moe_layer_freq as published: one entry per layer, 1 = sparse MoE block, 0 = dense MLP."""
    pattern = cfg.get("moe_layer_freq")
    if not isinstance(pattern, list) or len(pattern) != num_layers:
        raise ConfigError(f"{source}: moe_layer_freq={pattern!r} must list 0 (dense) or 1 (MoE) for each of the "
                          f"num_hidden_layers={num_layers} layers")
    if any(isinstance(v, bool) or v not in (0, 1) for v in pattern):
        raise ConfigError(f"{source}: moe_layer_freq={pattern!r} has entries other than 0 (dense) and 1 (MoE)")
    return tuple(int(v) for v in pattern)


def _optional_size(cfg: dict, key: str, source: str) -> int:
    """A size that may be absent or null (0 then); when given it must be a positive integer."""
    value = cfg.get(key)
    if value is None:
        return 0
    return require(cfg, key, source)


def args_from_hf(cfg: dict, source: str = "config.json", mask_token_id: int | None = None,
                 block_size: int | None = None) -> ModelArgs:
    require_architecture(cfg, source, ARCH)
    _check_supported(cfg, source)
    num_layers = require(cfg, "num_hidden_layers", source)
    hidden = require(cfg, "hidden_size", source)
    heads = require(cfg, "num_attention_heads", source)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if hidden % heads:
        raise ConfigError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}")
    head_dim = hidden // heads
    if cfg.get("head_dim") not in (None, head_dim):
        raise ConfigError(f"{source}: head_dim={cfg['head_dim']} is not supported: LLaDA-MoE's attention uses "
                          f"hidden_size / num_attention_heads = {head_dim}")
    rotary_factor = cfg.get("partial_rotary_factor", 1.0)
    if isinstance(rotary_factor, bool) or not isinstance(rotary_factor, (int, float)) or not 0 < rotary_factor <= 1:
        raise ConfigError(f"{source}: partial_rotary_factor={rotary_factor!r} must be in (0, 1]")
    if int(head_dim * rotary_factor) % 2:
        raise ConfigError(f"{source}: partial_rotary_factor={rotary_factor} gives an odd rotary dimension "
                          f"{int(head_dim * rotary_factor)} of head_dim={head_dim}")
    num_experts = require(cfg, "num_experts", source)
    topk = require(cfg, "num_experts_per_tok", source)
    if topk > num_experts:
        raise ConfigError(f"{source}: num_experts_per_tok={topk} exceeds num_experts={num_experts}")
    pattern = moe_layer_pattern(cfg, num_layers, source)
    expert_ffn = require(cfg, "expert_intermediate_size", source)
    # the dense MLP size matters only where moe_layer_freq has a 0; the Megatron config needs a size either way
    dense_ffn = require(cfg, "dense_intermediate_size", source) if 0 in pattern else (
        _optional_size(cfg, "dense_intermediate_size", source) or expert_ffn)
    vocab = require(cfg, "vocab_size", source)
    mask = read_mask_token(cfg, source, mask_token_id, MASK_TOKEN_ID, vocab)
    eos_ids = read_eos_ids(cfg) or ((EOS_TOKEN_ID,) if vocab > EOS_TOKEN_ID else ())
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = EOS_TOKEN_ID if vocab > EOS_TOKEN_ID else (eos_ids[0] if eos_ids else None)
    return ModelArgs(
        family="llada_moe",
        architecture=ARCH,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=dense_ffn,
        vocab_size=vocab,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(require(cfg, "rope_theta", source, kind=float)),
        rotary_percent=float(rotary_factor),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qk_norm=bool(cfg.get("qk_layernorm")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe=MoEArgs(
            num_experts=num_experts,
            topk=topk,
            expert_ffn_hidden_size=expert_ffn,
            norm_topk_prob=False,  # modeling_lladamoe.py: the top-k softmax probabilities, not renormalised
            score_function="softmax",
            layer_pattern=pattern,
            shared_expert_ffn_hidden_size=_optional_size(cfg, "shared_expert_intermediate_size", source),
            aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
        ),
        diffusion=DiffusionArgs(
            mask_token_id=mask,
            block_size=block_size or cfg.get("block_size") or BLOCK_SIZE,
            shifted_logits=False,
            attention="full",
            pad_token_id=pad,
            eos_token_ids=eos_ids,
        ),
        extra={"hf_padding_idx": cfg.get("pad_token_id", HF_DEFAULT_PAD_TOKEN_ID)},
    )
