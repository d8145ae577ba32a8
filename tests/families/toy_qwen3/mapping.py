"""The toy family's one HF <-> Megatron table (Qwen3 tensor names), written with dare_mega's mapping rows."""

from __future__ import annotations

from dare_mega.models.args import ModelArgs
from dare_mega.models.weight_mapping import HF, GatedFC1, GroupedQKV, MappingTable, Replicated, RowParallel, VocabRows

L, H = "decoder.layers.{layer}", "model.layers.{layer}"


def toy_mapping(args: ModelArgs) -> MappingTable:
    return MappingTable(args, [
        VocabRows("embedding.word_embeddings.weight", (HF("model.embed_tokens.weight", ("vocab", "hidden")),)),
        VocabRows("output_layer.weight", (HF("lm_head.weight", ("vocab", "hidden")),)),
        Replicated("decoder.final_layernorm.weight", (HF("model.norm.weight", ("hidden",)),)),
        Replicated(f"{L}.input_layernorm.weight", (HF(f"{H}.input_layernorm.weight", ("hidden",)),), scope="layer"),
        GroupedQKV(f"{L}.self_attention.linear_qkv.weight", (HF(f"{H}.self_attn.q_proj.weight", ("q", "hidden")),
                                                             HF(f"{H}.self_attn.k_proj.weight", ("kv", "hidden")),
                                                             HF(f"{H}.self_attn.v_proj.weight", ("kv", "hidden"))),
                   scope="layer"),
        Replicated(f"{L}.self_attention.q_layernorm.weight", (HF(f"{H}.self_attn.q_norm.weight", ("head_dim",)),),
                   scope="layer"),
        Replicated(f"{L}.self_attention.k_layernorm.weight", (HF(f"{H}.self_attn.k_norm.weight", ("head_dim",)),),
                   scope="layer"),
        RowParallel(f"{L}.self_attention.linear_proj.weight", (HF(f"{H}.self_attn.o_proj.weight", ("hidden", "q")),),
                    scope="layer"),
        Replicated(f"{L}.pre_mlp_layernorm.weight", (HF(f"{H}.post_attention_layernorm.weight", ("hidden",)),),
                   scope="layer"),
        GatedFC1(f"{L}.mlp.linear_fc1.weight", (HF(f"{H}.mlp.gate_proj.weight", ("ffn", "hidden")),
                                                HF(f"{H}.mlp.up_proj.weight", ("ffn", "hidden"))), scope="dense"),
        RowParallel(f"{L}.mlp.linear_fc2.weight", (HF(f"{H}.mlp.down_proj.weight", ("hidden", "ffn")),), scope="dense"),
    ])
