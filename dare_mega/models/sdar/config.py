"""SDAR (Qwen3 layout) and SDAR-MoE (Qwen3-MoE layout): HF config.json -> ModelArgs.

Block diffusion without a logit shift: each position predicts its own (masked) token. The 30B-A3B config
lacks `block_size` and `mask_token_id`, so the family defaults (block 4, mask id 151669) fill in.
"""

from __future__ import annotations

from dare_mega.errors import ConfigError
from dare_mega.models.args import (
    DiffusionArgs,
    ModelArgs,
    MoEArgs,
    read_attention,
    read_eos_ids,
    read_mask_token,
    require,
)

DENSE_ARCH = "SDARForCausalLM"
MOE_ARCH = "SDARMoeForCausalLM"
MASK_TOKEN_ID = 151669
BLOCK_SIZE = 4
PAD_TOKEN_ID = 151643
EOS_TOKEN_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def _check_supported(cfg: dict, source: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r}; SDAR uses 'silu' (SwiGLU)")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not part of the SDAR / Qwen3 layout")
    if cfg.get("rope_scaling"):
        raise ConfigError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported (SDAR has none)")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported for block diffusion")


def moe_layer_pattern(cfg: dict, num_layers: int, source: str) -> tuple[int, ...]:
    """Qwen3-MoE's rule: layer i is MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    bad = [i for i in dense_only if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{source}: mlp_only_layers has layers {bad} outside 0..{num_layers - 1}")
    return tuple(int(i not in dense_only and (i + 1) % step == 0) for i in range(num_layers))


def args_from_hf(cfg: dict, source: str = "config.json", mask_token_id: int | None = None,
                 block_size: int | None = None) -> ModelArgs:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConfigError(f"{source}: required key 'architectures' is missing")
    arch = archs[0]
    if arch not in (DENSE_ARCH, MOE_ARCH):
        raise ConfigError(f"{source}: architecture {arch!r} is not an SDAR architecture")
    _check_supported(cfg, source)
    sizes = read_attention(cfg, source)
    num_layers, vocab = sizes["num_layers"], sizes["vocab_size"]
    moe = None
    if arch == MOE_ARCH:
        num_experts = require(cfg, "num_experts", source)
        topk = require(cfg, "num_experts_per_tok", source)
        if topk > num_experts:
            raise ConfigError(f"{source}: num_experts_per_tok={topk} exceeds num_experts={num_experts}")
        moe = MoEArgs(
            num_experts=num_experts,
            topk=topk,
            expert_ffn_hidden_size=require(cfg, "moe_intermediate_size", source),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            score_function="softmax",
            layer_pattern=moe_layer_pattern(cfg, num_layers, source),
            aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
        )
    block = block_size or cfg.get("block_size") or BLOCK_SIZE
    mask = read_mask_token(cfg, source, mask_token_id, MASK_TOKEN_ID, vocab)
    eos_ids = read_eos_ids(cfg)
    pad = cfg.get("pad_token_id")
    if pad is None:  # SDAR pads with <|endoftext|> (151643), which is also config.json's eos_token_id
        pad = PAD_TOKEN_ID if vocab > PAD_TOKEN_ID else cfg.get("eos_token_id", eos_ids[0] if eos_ids else None)
        pad = pad[-1] if isinstance(pad, list) else pad
    return ModelArgs(
        family="sdar",
        architecture=arch,
        **sizes,
        rope_theta=float(cfg.get("rope_theta", 1e6)),
        qk_norm=True,
        moe=moe,
        diffusion=DiffusionArgs(
            mask_token_id=mask,
            block_size=block,
            shifted_logits=False,
            pad_token_id=pad,
            eos_token_ids=tuple(dict.fromkeys(eos_ids + tuple(i for i in EOS_TOKEN_IDS if i < vocab))),
        ),
        # transformers builds nn.Embedding(padding_idx=pad_token_id) when config.json sets one: that row then
        # never gets a gradient in HF training (Megatron's embedding has no such exception)
        extra={"hf_padding_idx": cfg.get("pad_token_id")},
    )
