"""LLaDA-MoE (LLaDAMoEModelLM): the one HF <-> Megatron mapping table (OLMoE's tensor names).

Per layer: self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm (with qk_layernorm, [head_dim]), input_layernorm,
post_attention_layernorm; a dense layer's mlp.{gate,up,down}_proj, a MoE layer's mlp.gate (the router) and
mlp.experts.{e}.{gate,up,down}_proj; the optional shared expert sits on the layer itself (shared_expert.*), not
under mlp. `{layer}` and `{expert}` are global indices.
"""

from __future__ import annotations

from dare_mega.models.args import ModelArgs
from dare_mega.models.weight_mapping import HF, GatedFC1, GroupedQKV, MappingTable, Replicated, RowParallel, VocabRows

L = "decoder.layers.{layer}"
H = "model.layers.{layer}"


def llada_moe_rows(args: ModelArgs) -> list:
    rows = [
        VocabRows("embedding.word_embeddings.weight", (HF("model.embed_tokens.weight", ("vocab", "hidden")),)),
        Replicated("decoder.final_layernorm.weight", (HF("model.norm.weight", ("hidden",)),)),
        VocabRows(
            "output_layer.weight",
            (HF("model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight", ("vocab", "hidden")),),
        ),
        Replicated(f"{L}.input_layernorm.weight", (HF(f"{H}.input_layernorm.weight", ("hidden",)),), scope="layer"),
        GroupedQKV(
            f"{L}.self_attention.linear_qkv.weight",
            (HF(f"{H}.self_attn.q_proj.weight", ("q", "hidden")), HF(f"{H}.self_attn.k_proj.weight", ("kv", "hidden")),
             HF(f"{H}.self_attn.v_proj.weight", ("kv", "hidden"))),
            scope="layer",
        ),
        RowParallel(f"{L}.self_attention.linear_proj.weight", (HF(f"{H}.self_attn.o_proj.weight", ("hidden", "q")),),
                    scope="layer"),
        Replicated(f"{L}.pre_mlp_layernorm.weight", (HF(f"{H}.post_attention_layernorm.weight", ("hidden",)),),
                   scope="layer"),
        # the dense layers (moe_layer_freq 0)
        GatedFC1(f"{L}.mlp.linear_fc1.weight",
                 (HF(f"{H}.mlp.gate_proj.weight", ("ffn", "hidden")), HF(f"{H}.mlp.up_proj.weight", ("ffn", "hidden"))),
                 scope="dense"),
        RowParallel(f"{L}.mlp.linear_fc2.weight", (HF(f"{H}.mlp.down_proj.weight", ("hidden", "ffn")),), scope="dense"),
        # the MoE layers: softmax router (no bias), routed experts
        Replicated(f"{L}.mlp.router.weight", (HF(f"{H}.mlp.gate.weight", ("experts", "hidden")),), scope="moe"),
        GatedFC1(
            f"{L}.mlp.experts.local_experts.{{expert}}.linear_fc1.weight",
            (HF(f"{H}.mlp.experts.{{expert}}.gate_proj.weight", ("expert_ffn", "hidden")),
             HF(f"{H}.mlp.experts.{{expert}}.up_proj.weight", ("expert_ffn", "hidden"))),
            scope="moe", expert=True,
        ),
        RowParallel(f"{L}.mlp.experts.local_experts.{{expert}}.linear_fc2.weight",
                    (HF(f"{H}.mlp.experts.{{expert}}.down_proj.weight", ("hidden", "expert_ffn")),), scope="moe",
                    expert=True),
    ]
    if args.qk_norm:
        rows += [
            Replicated(f"{L}.self_attention.q_layernorm.weight", (HF(f"{H}.self_attn.q_norm.weight", ("head_dim",)),),
                       scope="layer"),
            Replicated(f"{L}.self_attention.k_layernorm.weight", (HF(f"{H}.self_attn.k_norm.weight", ("head_dim",)),),
                       scope="layer"),
        ]
    if args.moe.shared_expert_ffn_hidden_size:
        rows += [
            GatedFC1(f"{L}.mlp.shared_experts.linear_fc1.weight",
                     (HF(f"{H}.shared_expert.gate_proj.weight", ("shared_ffn", "hidden")),
                      HF(f"{H}.shared_expert.up_proj.weight", ("shared_ffn", "hidden"))), scope="moe"),
            RowParallel(f"{L}.mlp.shared_experts.linear_fc2.weight",
                        (HF(f"{H}.shared_expert.down_proj.weight", ("hidden", "shared_ffn")),), scope="moe"),
        ]
    return rows


def llada_moe_mapping(args: ModelArgs) -> MappingTable:
    return MappingTable(args, llada_moe_rows(args))
