"""Dream-7B (DreamModel: Dream-v0-Base-7B / -Instruct-7B): HF config.json -> ModelArgs.

A masked diffusion model on Qwen2.5-7B: Qwen2's layout and tensor names (q / k / v biases, no qk-norm, GQA,
SwiGLU, RMSNorm, rotate-half RoPE), attention bidirectional over the whole sequence, and shifted prediction:
the token at position i is predicted from the hidden state at i - 1 (the first position of a document keeps its
own, as Dream's generate does). `block_size` is the semi-autoregressive generation's block length; Dream's own
generate decodes the whole generation as one block.
"""

from __future__ import annotations

from dare_mega.errors import ConfigError
from dare_mega.models.args import (
    DiffusionArgs,
    ModelArgs,
    read_attention,
    read_eos_ids,
    read_mask_token,
    require_architecture,
)

ARCH = "DreamModel"
MASK_TOKEN_ID = 151666  # <|mask|>
BLOCK_SIZE = 32
EOS_TOKEN_ID = 151643  # <|endoftext|>: config.json's eos and pad
IM_END_TOKEN_ID = 151645  # <|im_end|>: the end of an Instruct turn


def _check_supported(cfg: dict, source: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r}; Dream uses 'silu' (SwiGLU)")
    if cfg.get("rope_scaling"):
        raise ConfigError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported (Dream has none)")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported (Dream attends over the whole "
                          "sequence)")
    if cfg.get("use_mrope"):
        raise ConfigError(f"{source}: use_mrope=true is not supported (Dream's text model has plain RoPE)")


def args_from_hf(cfg: dict, source: str = "config.json", mask_token_id: int | None = None,
                 block_size: int | None = None) -> ModelArgs:
    require_architecture(cfg, source, ARCH)
    _check_supported(cfg, source)
    sizes = read_attention(cfg, source)
    vocab = sizes["vocab_size"]
    if sizes["hidden_size"] != sizes["num_attention_heads"] * sizes["head_dim"]:
        raise ConfigError(f"{source}: head_dim={sizes['head_dim']} x num_attention_heads="
                          f"{sizes['num_attention_heads']} is not hidden_size={sizes['hidden_size']} (Qwen2's rule)")
    mask = read_mask_token(cfg, source, mask_token_id, MASK_TOKEN_ID, vocab)
    eos_ids = read_eos_ids(cfg) or ((EOS_TOKEN_ID,) if vocab > EOS_TOKEN_ID else ())
    if vocab > IM_END_TOKEN_ID:  # an Instruct answer ends with <|im_end|>; generation_config names only eos
        eos_ids = tuple(dict.fromkeys((IM_END_TOKEN_ID,) + eos_ids))
    pad = cfg.get("pad_token_id")
    if pad is None and eos_ids:
        pad = eos_ids[-1]
    return ModelArgs(
        family="dream",
        architecture=ARCH,
        **sizes,
        rope_theta=float(cfg.get("rope_theta", 1e6)),
        qk_norm=False,
        qkv_bias=True,  # Qwen2 always has them
        diffusion=DiffusionArgs(
            mask_token_id=mask,
            block_size=block_size or cfg.get("block_size") or BLOCK_SIZE,
            shifted_logits=True,
            attention="full",
            pad_token_id=pad,
            eos_token_ids=eos_ids,
        ),
    )
