"""LLaDA2 (BailingMoeV2): the one HF <-> Megatron mapping table.

The fused query_key_value is [Q_all ; K_all ; V_all]; Megatron's linear_qkv groups rows per query group, so
the row re-interleaves (GroupedQKV(fused=True)). The router's expert_bias is a buffer kept in fp32.
"""

from __future__ import annotations

import torch

from dare_mega.models.args import ModelArgs
from dare_mega.models.weight_mapping import HF, GatedFC1, GroupedQKV, MappingTable, Replicated, RowParallel, VocabRows

L = "decoder.layers.{layer}"
H = "model.layers.{layer}"


def llada2_rows(args: ModelArgs) -> list:
    return [
        VocabRows("embedding.word_embeddings.weight", (HF("model.word_embeddings.weight", ("vocab", "hidden")),)),
        Replicated("decoder.final_layernorm.weight", (HF("model.norm.weight", ("hidden",)),)),
        VocabRows(
            "output_layer.weight",
            (HF("model.word_embeddings.weight" if args.tie_word_embeddings else "lm_head.weight", ("vocab", "hidden")),),
        ),
        Replicated(f"{L}.input_layernorm.weight", (HF(f"{H}.input_layernorm.weight", ("hidden",)),), scope="layer"),
        GroupedQKV(f"{L}.self_attention.linear_qkv.weight",
                   (HF(f"{H}.attention.query_key_value.weight", ("qkv", "hidden")),), scope="layer", fused=True),
        Replicated(f"{L}.self_attention.q_layernorm.weight",
                   (HF(f"{H}.attention.query_layernorm.weight", ("head_dim",)),), scope="layer"),
        Replicated(f"{L}.self_attention.k_layernorm.weight",
                   (HF(f"{H}.attention.key_layernorm.weight", ("head_dim",)),), scope="layer"),
        RowParallel(f"{L}.self_attention.linear_proj.weight", (HF(f"{H}.attention.dense.weight", ("hidden", "q")),),
                    scope="layer"),
        Replicated(f"{L}.pre_mlp_layernorm.weight", (HF(f"{H}.post_attention_layernorm.weight", ("hidden",)),),
                   scope="layer"),
        # the first_k_dense_replace dense layers
        GatedFC1(f"{L}.mlp.linear_fc1.weight",
                 (HF(f"{H}.mlp.gate_proj.weight", ("ffn", "hidden")), HF(f"{H}.mlp.up_proj.weight", ("ffn", "hidden"))),
                 scope="dense"),
        RowParallel(f"{L}.mlp.linear_fc2.weight", (HF(f"{H}.mlp.down_proj.weight", ("hidden", "ffn")),), scope="dense"),
        # MoE layers: sigmoid router with an fp32 selection bias, routed experts, one shared expert
        Replicated(f"{L}.mlp.router.weight", (HF(f"{H}.mlp.gate.weight", ("experts", "hidden")),), scope="moe"),
        Replicated(f"{L}.mlp.router.expert_bias", (HF(f"{H}.mlp.gate.expert_bias", ("experts",)),), scope="moe",
                   buffer=True, dtype=torch.float32),
        GatedFC1(
            f"{L}.mlp.experts.local_experts.{{expert}}.linear_fc1.weight",
            (HF(f"{H}.mlp.experts.{{expert}}.gate_proj.weight", ("expert_ffn", "hidden")),
             HF(f"{H}.mlp.experts.{{expert}}.up_proj.weight", ("expert_ffn", "hidden"))),
            scope="moe", expert=True,
        ),
        RowParallel(f"{L}.mlp.experts.local_experts.{{expert}}.linear_fc2.weight",
                    (HF(f"{H}.mlp.experts.{{expert}}.down_proj.weight", ("hidden", "expert_ffn")),), scope="moe",
                    expert=True),
        GatedFC1(
            f"{L}.mlp.shared_experts.linear_fc1.weight",
            (HF(f"{H}.mlp.shared_experts.gate_proj.weight", ("shared_ffn", "hidden")),
             HF(f"{H}.mlp.shared_experts.up_proj.weight", ("shared_ffn", "hidden"))),
            scope="moe",
        ),
        RowParallel(f"{L}.mlp.shared_experts.linear_fc2.weight",
                    (HF(f"{H}.mlp.shared_experts.down_proj.weight", ("hidden", "shared_ffn")),), scope="moe"),
    ]


def llada2_mapping(args: ModelArgs) -> MappingTable:
    return MappingTable(args, llada2_rows(args))
