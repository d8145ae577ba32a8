"""Layer specs: Megatron's TransformerLayer with block-diffusion core attention, composed per backend.

One spec shape for every backend, so that parameter names (and the mapping tables) never depend on whether
Transformer Engine is installed: input_layernorm -> self_attention(linear_qkv, q/k_layernorm, core_attention,
linear_proj) -> pre_mlp_layernorm -> mlp (dense MLP or MoE). Transformer Engine, when used, supplies the
linear layers, the norms and the grouped expert GEMM (without it the experts are models/experts.py's grouped
products, or Megatron's SequentialMLP with `moe_experts="sequential"`); the core attention is always dare_mega's
(FlexAttention on GPUs, SDPA on CPUs).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from dare_mega.diffusion.attention import BlockDiffusionAttention
from dare_mega.models import ops
from dare_mega.models.experts import GroupedExperts


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32, as in HF Qwen3 / BailingMoeV2: weight * (x / rms(x)).to(dtype).

    Used instead of Megatron's WrappedTorchNorm (which refuses sequence parallelism): with sequence
    parallelism each rank normalises its own slice of tokens, so the weight's gradient is partial and
    Megatron all-reduces it over TP for parameters marked `sequence_parallel`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


def _backend(use_te: bool):
    """(column linear, row linear, norm, grouped-MLP factory) for Transformer Engine or Megatron's local."""
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TEColumnParallelLinear, TERowParallelLinear, TENorm, TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear, RMSNorm, LocalSpecProvider()


def layer_spec(config, moe: bool) -> ModuleSpec:
    """The spec of one decoder layer (dense MLP or MoE)."""
    use_te = getattr(config, "dare_use_te", False)
    column, row, norm, provider = _backend(use_te)
    core_attention = functools.partial(
        BlockDiffusionAttention, backend=getattr(config, "dare_attention_backend", "auto")
    )
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=SelfAttentionSubmodules(
            linear_qkv=column,
            core_attention=core_attention,
            linear_proj=row,
            q_layernorm=norm if config.qk_layernorm else IdentityOp,
            k_layernorm=norm if config.qk_layernorm else IdentityOp,
        ),
    )
    if moe:
        from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
        from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

        if use_te or not config.moe_grouped_gemm:
            expert_module, expert_submodules = provider.grouped_mlp_modules(bool(config.moe_grouped_gemm), False)
        else:  # Megatron's grouped module without Transformer Engine is the legacy one (grouped_gemm package)
            expert_module = GroupedExperts
            expert_submodules = MLPSubmodules(linear_fc1=column, linear_fc2=row)
        mlp = ModuleSpec(
            module=MoELayer,
            submodules=MoESubmodules(
                experts=ModuleSpec(module=expert_module, submodules=expert_submodules),
                shared_experts=ModuleSpec(
                    module=SharedExpertMLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)
                ),
            ),
            metainfo={"fuse_pre_mlp_layernorm": False},
        )
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_block_spec(config, layer_is_moe: list[bool], vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual chunk) builds, with the final norm."""
    specs = [layer_spec(config, moe) for moe in layer_is_moe]
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    _, _, norm, _ = _backend(getattr(config, "dare_use_te", False))
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=norm)
