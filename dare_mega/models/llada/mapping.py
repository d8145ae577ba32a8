"""LLaDA-8B (LLaDAModelLM): the one HF <-> Megatron mapping table (OLMo's tensor names under model.transformer).

`ff_proj` is the SwiGLU gate (SiLU applied), `up_proj` the up projection, `ff_out` inside a block the down
projection; `model.transformer.ff_out` is the output layer (the embedding itself with weight_tying).
"""

from __future__ import annotations

from dare_mega.models.args import ModelArgs
from dare_mega.models.weight_mapping import HF, GatedFC1, GroupedQKV, MappingTable, Replicated, RowParallel, VocabRows

L = "decoder.layers.{layer}"
B = "model.transformer.blocks.{layer}"


def llada_rows(args: ModelArgs) -> list:
    wte = "model.transformer.wte.weight"
    return [
        VocabRows("embedding.word_embeddings.weight", (HF(wte, ("vocab", "hidden")),)),
        Replicated("decoder.final_layernorm.weight", (HF("model.transformer.ln_f.weight", ("hidden",)),)),
        VocabRows("output_layer.weight",
                  (HF(wte if args.tie_word_embeddings else "model.transformer.ff_out.weight", ("vocab", "hidden")),)),
        Replicated(f"{L}.input_layernorm.weight", (HF(f"{B}.attn_norm.weight", ("hidden",)),), scope="layer"),
        GroupedQKV(
            f"{L}.self_attention.linear_qkv.weight",
            (HF(f"{B}.q_proj.weight", ("q", "hidden")), HF(f"{B}.k_proj.weight", ("kv", "hidden")),
             HF(f"{B}.v_proj.weight", ("kv", "hidden"))),
            scope="layer",
        ),
        RowParallel(f"{L}.self_attention.linear_proj.weight", (HF(f"{B}.attn_out.weight", ("hidden", "q")),),
                    scope="layer"),
        Replicated(f"{L}.pre_mlp_layernorm.weight", (HF(f"{B}.ff_norm.weight", ("hidden",)),), scope="layer"),
        GatedFC1(f"{L}.mlp.linear_fc1.weight",
                 (HF(f"{B}.ff_proj.weight", ("ffn", "hidden")), HF(f"{B}.up_proj.weight", ("ffn", "hidden"))),
                 scope="dense"),
        RowParallel(f"{L}.mlp.linear_fc2.weight", (HF(f"{B}.ff_out.weight", ("hidden", "ffn")),), scope="dense"),
    ]


def llada_mapping(args: ModelArgs) -> MappingTable:
    return MappingTable(args, llada_rows(args))
