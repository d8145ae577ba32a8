"""Dream-7B (DreamModel): the one HF <-> Megatron mapping table (Qwen2's tensor names: the SDAR rows without
qk-norm, plus the q / k / v biases, grouped per query group like the weights)."""

from __future__ import annotations

from dare_mega.models.args import ModelArgs
from dare_mega.models.sdar.mapping import sdar_rows
from dare_mega.models.weight_mapping import HF, GroupedQKV, MappingTable

L = "decoder.layers.{layer}"
H = "model.layers.{layer}"


def dream_rows(args: ModelArgs) -> list:
    qk_norms = (f"{L}.self_attention.q_layernorm.weight", f"{L}.self_attention.k_layernorm.weight")
    rows = [row for row in sdar_rows(args) if row.megatron not in qk_norms]  # the names Qwen2 and Qwen3 share
    rows.append(GroupedQKV(
        f"{L}.self_attention.linear_qkv.bias",
        (HF(f"{H}.self_attn.q_proj.bias", ("q",)), HF(f"{H}.self_attn.k_proj.bias", ("kv",)),
         HF(f"{H}.self_attn.v_proj.bias", ("kv",))),
        scope="layer",
    ))
    return rows


def dream_mapping(args: ModelArgs) -> MappingTable:
    return MappingTable(args, dream_rows(args))
