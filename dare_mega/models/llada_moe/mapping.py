"""LLaDA-MoE (LLaDAMoEModelLM): the one HF <-> Megatron mapping table (OLMoE's tensor names).

Per layer: self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm (with qk_layernorm, [head_dim]), input_layernorm,
post_attention_layernorm; a dense layer's mlp.{gate,up,down}_proj, a MoE layer's mlp.gate (the router) and
mlp.experts.{e}.{gate,up,down}_proj; the optional shared expert sits on the layer itself (shared_expert.*), not
under mlp. `{layer}` and `{expert}` are global indices.
"""

from __future__ import annotations

from dare_mega.models.args import ModelArgs
from dare_mega.models.sdar.mapping import sdar_rows
from dare_mega.models.weight_mapping import HF, GatedFC1, MappingTable, RowParallel

L = "decoder.layers.{layer}"


def llada_moe_rows(args: ModelArgs) -> list:
    """The SDAR-MoE rows (OLMoE and Qwen3-MoE name every shared tensor alike), the q / k norms only with
    qk_layernorm, and the optional shared expert, which OLMoE keeps on the layer (`shared_expert.*`)."""
    qk_norms = (f"{L}.self_attention.q_layernorm.weight", f"{L}.self_attention.k_layernorm.weight")
    rows = [row for row in sdar_rows(args) if args.qk_norm or row.megatron not in qk_norms]
    if args.moe.shared_expert_ffn_hidden_size:
        h = "model.layers.{layer}.shared_expert"
        rows += [
            GatedFC1(f"{L}.mlp.shared_experts.linear_fc1.weight",
                     (HF(f"{h}.gate_proj.weight", ("shared_ffn", "hidden")),
                      HF(f"{h}.up_proj.weight", ("shared_ffn", "hidden"))), scope="moe"),
            RowParallel(f"{L}.mlp.shared_experts.linear_fc2.weight",
                        (HF(f"{h}.down_proj.weight", ("hidden", "shared_ffn")),), scope="moe"),
        ]
    return rows


def llada_moe_mapping(args: ModelArgs) -> MappingTable:
    return MappingTable(args, llada_moe_rows(args))
