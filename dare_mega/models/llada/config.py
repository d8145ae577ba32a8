"""LLaDA-8B (LLaDAModelLM: LLaDA-8B-Base / -Instruct, LLaDA-1.5; OLMo's code, `block_type=llama`): HF
config.json -> ModelArgs.

A masked diffusion model: a LLaMA-style transformer (pre-RMSNorm, rotate-half RoPE, SwiGLU, no biases, MHA)
whose attention is bidirectional over the whole sequence, predicting in place (no logit shift). The config
uses OLMo's keys (d_model, n_heads, n_layers, mlp_hidden_size, embedding_size, max_sequence_length,
weight_tying); settings of OLMo's code that LLaDA's published checkpoints never use are refused by key.
`block_size` is the semi-autoregressive generation's block length (32 in LLaDA's examples), not an attention
block: training attends over each whole document.
"""

from __future__ import annotations

from dare_mega.errors import ConfigError
from dare_mega.models.args import (
    DiffusionArgs,
    ModelArgs,
    read_eos_ids,
    read_mask_token,
    require,
    require_architecture,
)

ARCH = "LLaDAModelLM"
MASK_TOKEN_ID = 126336  # <|mdm_mask|>
BLOCK_SIZE = 32  # LLaDA generate()'s block_length in its examples
EOS_TOKEN_ID = 126081  # <|endoftext|>, also the pad
EOT_TOKEN_ID = 126348  # <|eot_id|>: the end of an Instruct turn

# OLMo settings whose published value is the only one the Megatron model, the reference and the mapping follow
FIXED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "alibi": False, "rope": True,
         "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False, "include_bias": False,
         "bias_for_layer_norm": False, "multi_query_attention": None, "block_group_size": 1,
         "layer_norm_with_affine": True}


def _check_supported(cfg: dict, source: str) -> None:
    for key, value in FIXED.items():
        if key in cfg and cfg[key] != value and not (value is None and cfg[key] is False):
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported (the published LLaDA layout has "
                              f"{key}={value!r})")
    if cfg.get("rope_scaling"):
        raise ConfigError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported (LLaDA has none)")


def args_from_hf(cfg: dict, source: str = "config.json", mask_token_id: int | None = None,
                 block_size: int | None = None) -> ModelArgs:
    require_architecture(cfg, source, ARCH)
    _check_supported(cfg, source)
    hidden = require(cfg, "d_model", source)
    heads = require(cfg, "n_heads", source)
    kv_heads = cfg.get("n_kv_heads") or heads
    if hidden % heads:
        raise ConfigError(f"{source}: d_model={hidden} is not divisible by n_heads={heads}")
    if heads % kv_heads:
        raise ConfigError(f"{source}: n_heads={heads} is not divisible by n_kv_heads={kv_heads}")
    ffn = cfg.get("mlp_hidden_size") or require(cfg, "mlp_ratio", source) * hidden
    vocab = require(cfg, "vocab_size", source)
    rows = cfg.get("embedding_size") or vocab  # OLMo pads the embedding (and the output) to embedding_size rows
    if rows < vocab:
        raise ConfigError(f"{source}: embedding_size={rows} is smaller than vocab_size={vocab}")
    mask = read_mask_token(cfg, source, mask_token_id, MASK_TOKEN_ID, vocab)
    eos_ids = read_eos_ids(cfg) or ((EOS_TOKEN_ID,) if vocab > EOS_TOKEN_ID else ())
    if vocab > EOT_TOKEN_ID:
        eos_ids = tuple(dict.fromkeys(eos_ids + (EOT_TOKEN_ID,)))
    pad = cfg.get("pad_token_id")
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return ModelArgs(
        family="llada",
        architecture=ARCH,
        num_layers=require(cfg, "n_layers", source),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        ffn_hidden_size=ffn,
        vocab_size=rows,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
        qk_norm=False,
        # biases on q, k and v (include_qkv_bias) are a feature the components name when they lack it
        qkv_bias=bool(cfg.get("include_qkv_bias", False)),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        diffusion=DiffusionArgs(
            mask_token_id=mask,
            block_size=block_size or cfg.get("block_size") or BLOCK_SIZE,
            shifted_logits=False,
            attention="full",
            pad_token_id=pad,
            eos_token_ids=eos_ids,
        ),
    )
