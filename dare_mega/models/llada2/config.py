"""LLaDA2.x (LLaDA2MoeModelLM, the BailingMoeV2 layout): HF config.json -> ModelArgs.

Block diffusion with block size 32 and mask id 156895, predicting in place (no logit shift). The first
`first_k_dense_replace` layers are dense; the rest are MoE with a sigmoid router whose fp32 `expert_bias`
only steers selection, group-limited top-k (the group score is the sum of its top-2 scores), unbiased weights
renormalised and scaled by `routed_scaling_factor`, and one always-on shared expert.
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
    require_architecture,
)

ARCH = "LLaDA2MoeModelLM"
MASK_TOKEN_ID = 156895
BLOCK_SIZE = 32
EOS_TOKEN_ID = 156892  # <|endoftext|>, also the pad token


def _check_supported(cfg: dict, source: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r}; LLaDA2 uses 'silu' (SwiGLU)")
    for key in ("use_bias", "use_qkv_bias", "norm_head", "norm_softmax", "use_sliding_window"):
        if cfg.get(key):
            raise ConfigError(f"{source}: {key}=true is not part of the published LLaDA2 layout")
    if cfg.get("rope_scaling"):
        raise ConfigError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported (LLaDA2 has none)")
    if cfg.get("use_qk_norm") is False:
        raise ConfigError(f"{source}: use_qk_norm=false is not supported (LLaDA2 always normalises q and k)")
    if cfg.get("score_function", "sigmoid") != "sigmoid":
        raise ConfigError(f"{source}: score_function={cfg['score_function']!r}; LLaDA2's router is 'sigmoid'")
    if cfg.get("num_nextn_predict_layers"):
        raise ConfigError(f"{source}: multi-token-prediction layers are not supported")


def args_from_hf(cfg: dict, source: str = "config.json", mask_token_id: int | None = None,
                 block_size: int | None = None) -> ModelArgs:
    require_architecture(cfg, source, ARCH)
    _check_supported(cfg, source)
    sizes = read_attention(cfg, source)
    num_layers, vocab, head_dim = sizes["num_layers"], sizes["vocab_size"], sizes["head_dim"]
    num_experts = require(cfg, "num_experts", source)
    topk = require(cfg, "num_experts_per_tok", source)
    n_group = cfg.get("n_group") or 1
    topk_group = cfg.get("topk_group") or n_group
    if num_experts % n_group:
        raise ConfigError(f"{source}: num_experts={num_experts} is not divisible by n_group={n_group}")
    if topk_group > n_group:
        raise ConfigError(f"{source}: topk_group={topk_group} exceeds n_group={n_group}")
    if n_group > 1 and topk != 2 * topk_group:
        # BailingMoeV2 scores a group by its top-2 experts; Megatron by its top (topk / topk_group)
        raise ConfigError(
            f"{source}: num_experts_per_tok={topk} with topk_group={topk_group}: the group score is the sum "
            "of each group's top-2 scores, which Megatron reproduces only when num_experts_per_tok == 2 * topk_group"
        )
    dense_layers = cfg.get("first_k_dense_replace", 0) or 0
    if not 0 <= dense_layers <= num_layers:
        raise ConfigError(f"{source}: first_k_dense_replace={dense_layers} outside 0..{num_layers}")
    expert_ffn = require(cfg, "moe_intermediate_size", source)
    shared = cfg.get("num_shared_experts") or 0
    rotary_factor = float(cfg.get("partial_rotary_factor", 1.0))
    rotary_dim = cfg.get("rotary_dim")
    if rotary_dim is not None and rotary_dim != int(head_dim * rotary_factor):
        raise ConfigError(
            f"{source}: rotary_dim={rotary_dim} disagrees with head_dim*partial_rotary_factor="
            f"{head_dim}*{rotary_factor}"
        )
    mask = read_mask_token(cfg, source, mask_token_id, MASK_TOKEN_ID, vocab)
    eos_ids = read_eos_ids(cfg)
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = EOS_TOKEN_ID if vocab > EOS_TOKEN_ID else (eos_ids[0] if eos_ids else None)
    if not eos_ids and pad is not None:
        eos_ids = (pad,)  # LLaDA2 stops on <|endoftext|>, which is also its pad
    return ModelArgs(
        family="llada2",
        architecture=ARCH,
        **sizes,
        rope_theta=float(cfg.get("rope_theta", 600000)),
        rotary_percent=rotary_factor,
        qk_norm=True,
        moe=MoEArgs(
            num_experts=num_experts,
            topk=topk,
            expert_ffn_hidden_size=expert_ffn,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            score_function="sigmoid",
            layer_pattern=tuple(int(i >= dense_layers) for i in range(num_layers)),
            shared_expert_ffn_hidden_size=expert_ffn * shared,
            num_groups=n_group if n_group > 1 else None,
            group_topk=topk_group if n_group > 1 else None,
            scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            expert_bias=bool(cfg.get("moe_router_enable_expert_bias", True)),
        ),
        diffusion=DiffusionArgs(
            mask_token_id=mask,
            block_size=block_size or cfg.get("block_size") or BLOCK_SIZE,
            shifted_logits=False,
            pad_token_id=pad,
            eos_token_ids=eos_ids,
        ),
        extra={"hf_padding_idx": cfg.get("pad_token_id")},
    )
