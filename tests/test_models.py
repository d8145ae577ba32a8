"""Model family SDAR: presets with the published numbers, config -> ModelArgs, the mapping table."""

import json

import pytest
import torch

from dare_mega.models.builder import args_from_config, mapping_for
from dare_mega.models.names import canonical
from dare_mega.models.presets import list_presets, load_preset
from dare_mega.models.transformer_config import padded_vocab_size
from dare_mega.models.weight_mapping import GatedFC1, GroupedQKV, LayoutContext, VocabRows

PUBLISHED = {
    "llada2.0-mini": "LLaDA2.0-mini",
    "llada2.1-mini": "LLaDA2.1-mini",
    "sdar-1.7b-chat": "SDAR-1dot7B-Chat",
    "sdar-4b-chat": "SDAR-4B-Chat",
    "sdar-8b-chat": "SDAR-8B-Chat",
    "sdar-30b-a3b-chat": "SDAR-30B-A3B-Chat",
}
ARCHITECTURE_KEYS = (
    "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "max_position_embeddings",
)


@pytest.mark.parametrize("preset,published", sorted(PUBLISHED.items()))
def test_presets_carry_the_published_numbers(preset, published, reference_configs):
    reference = json.load(open(reference_configs / published / "config.json"))
    mine = load_preset(preset)
    for key in ARCHITECTURE_KEYS:
        assert mine[key] == reference[key], f"{preset}: {key}={mine[key]!r}, published {reference[key]!r}"
    for key, value in mine.items():  # nothing invented: every key of the preset is the published value
        assert key in reference and reference[key] == value, f"{preset}: {key}={value!r} is not the published value"


def test_sdar_30b_moe_numbers():
    args = args_from_config(load_preset("sdar-30b-a3b-chat"))
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_kv_heads, args.head_dim) == (
        48, 2048, 32, 4, 128)
    assert args.moe.num_experts == 128 and args.moe.topk == 8 and args.moe.expert_ffn_hidden_size == 768
    assert args.moe.norm_topk_prob and args.moe.score_function == "softmax"
    assert args.moe.layer_pattern == (1,) * 48 and args.moe.shared_expert_ffn_hidden_size == 0
    # the 30B config has neither block_size nor mask_token_id: the family defaults fill in
    assert args.diffusion.mask_token_id == 151669 and args.diffusion.block_size == 4
    assert not args.diffusion.shifted_logits


def test_mask_and_block_are_overridable():
    cfg = load_preset("sdar-4b-chat")
    args = args_from_config(cfg, mask_token_id=151650, block_size=32)
    assert args.diffusion.mask_token_id == 151650 and args.diffusion.block_size == 32
    assert args_from_config({**cfg, "block_size": 16}).diffusion.block_size == 16


def test_tiny_presets_follow_the_shape_rules():
    for preset in ("tiny-sdar", "tiny-sdar-moe"):
        args = args_from_config(load_preset(preset))
        assert args.head_dim * args.num_attention_heads != args.hidden_size  # head_dim != hidden/heads
        assert args.num_kv_heads > 1 and args.num_attention_heads // args.num_kv_heads > 1  # several KV groups
        assert padded_vocab_size(args.vocab_size, 1) != args.vocab_size  # exercises vocab padding
    assert args_from_config(load_preset("tiny-sdar-moe")).moe.num_experts >= 4


def test_mlp_only_layers_and_sparse_step():
    cfg = {**load_preset("tiny-sdar-moe"), "mlp_only_layers": [0], "decoder_sparse_step": 1}
    assert args_from_config(cfg).moe.layer_pattern == (0, 1, 1, 1)
    cfg = {**load_preset("tiny-sdar-moe"), "mlp_only_layers": [], "decoder_sparse_step": 2}
    assert args_from_config(cfg).moe.layer_pattern == (0, 1, 0, 1)


@pytest.mark.parametrize("preset,published", [("sdar-4b-chat", "SDAR-4B-Chat"), ("sdar-8b-chat", "SDAR-8B-Chat"),
                                              ("sdar-30b-a3b-chat", "SDAR-30B-A3B-Chat"),
                                              ("llada2.0-mini", "LLaDA2.0-mini"), ("llada2.1-mini", "LLaDA2.1-mini")])
def test_mapping_table_names_every_published_tensor(preset, published, reference_configs):
    index = json.load(open(reference_configs / published / "model.safetensors.index.json"))["weight_map"]
    table = mapping_for(args_from_config(load_preset(preset)))
    assert set(table.expected_hf()) == set(index)


def test_every_megatron_tensor_binds_to_one_row():
    args = args_from_config(load_preset("tiny-sdar-moe"))
    table = mapping_for(args)
    seen = set()
    for binding in table.bindings():
        again = table.bind(binding.megatron_name)
        assert (again.row, again.layer, again.expert) == (binding.row, binding.layer, binding.expert)
        seen.add(binding.megatron_name)
    assert "decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight" in seen
    assert canonical("decoder.layers.1.mlp.experts.linear_fc1.weight5") == (
        "decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight")


def test_names_convert_between_every_form():
    """models/names.py: every expert tensor of the table survives each conversion and its inverse."""
    from dare_mega.models import names

    table = mapping_for(args_from_config(load_preset("tiny-llada2-moe")))
    experts = 0
    for binding in table.bindings():
        name = binding.megatron_name
        stacked, expert = names.split_expert(name)
        assert expert == binding.expert and names.layer_of(name) == binding.layer
        key, stored_expert = names.stored_key(name)
        assert names.from_stored_key(key, stored_expert) == name
        if expert is not None:
            experts += 1
            assert names.is_stored_stack(key) and ".mlp.experts.experts." in key and ".local_experts." not in stacked
            assert names.with_indices(names.with_indices(name, 0, 0), binding.layer, expert) == name
            grouped = stacked.replace(".weight", f".weight{expert}")  # Megatron's grouped-GEMM form
            assert names.canonical(grouped) == name
        else:
            assert (key, stored_expert) == (name, None) and stacked == name
    assert experts > 0
    with pytest.raises(ValueError, match="needs the expert index"):
        names.from_stored_key("decoder.layers.1.mlp.experts.experts.linear_fc1.weight")


def test_qkv_is_interleaved_per_query_group():
    ctx = LayoutContext(num_heads=4, num_kv_heads=2, head_dim=3, vocab_size=10, padded_vocab=10)
    q = torch.arange(12 * 5).reshape(12, 5).float()
    k = 1000 + torch.arange(6 * 5).reshape(6, 5).float()
    v = 2000 + torch.arange(6 * 5).reshape(6, 5).float()
    row = GroupedQKV("x", ())
    full = row.to_megatron([q, k, v], ctx)
    # group g: q heads 2g, 2g+1, then k head g, then v head g (each 3 rows)
    expected = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(full, expected)
    assert all(torch.equal(a, b) for a, b in zip(row.to_hf(full, ctx), [q, k, v]))
    fused = GroupedQKV("x", (), fused=True)
    assert torch.equal(fused.to_megatron([torch.cat([q, k, v])], ctx), expected)
    assert torch.equal(fused.to_hf(expected, ctx)[0], torch.cat([q, k, v]))
    # TP=2 keeps whole groups on each rank
    assert torch.equal(row.shard(full, 1, 2), expected[12:])


def test_gated_fc1_shards_are_gate_and_up_slices():
    gate, up = torch.arange(8.0)[:, None], 100 + torch.arange(8.0)[:, None]
    row = GatedFC1("x", ())
    full = row.to_megatron([gate, up], None)
    shards = [row.shard(full, r, 2) for r in range(2)]
    assert torch.equal(shards[0][:, 0], torch.tensor([0.0, 1, 2, 3, 100, 101, 102, 103]))
    assert torch.equal(row.unshard(shards), full)
    assert all(torch.equal(a, b) for a, b in zip(row.to_hf(full, None), [gate, up]))


def test_vocab_rows_pad_and_strip():
    ctx = LayoutContext(num_heads=1, num_kv_heads=1, head_dim=1, vocab_size=5, padded_vocab=8)
    row = VocabRows("x", ())
    emb = torch.randn(5, 3)
    full = row.to_megatron([emb], ctx)
    assert full.shape == (8, 3) and torch.equal(full[5:], torch.zeros(3, 3))
    assert torch.equal(row.to_hf(full, ctx)[0], emb)
    # one padded size for every tp <= 8, so that torch_dist checkpoints reshard across TP
    assert {padded_vocab_size(151936, tp) for tp in (1, 2, 4, 8)} == {152576}
    assert padded_vocab_size(157184, 1) == 157696 and padded_vocab_size(1000, 16) == 2048


def test_whole_model_round_trip_through_the_table():
    args = args_from_config(load_preset("tiny-sdar-moe"))
    table = mapping_for(args)
    ctx = LayoutContext.of(args, padded_vocab=512)
    g = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=g) for name, shape in table.expected_hf().items()}
    for binding in table.bindings():
        full = binding.row.to_megatron([hf[n] for n in binding.hf_names], ctx)
        for tp in (1, 2):
            full = binding.row.unshard([binding.row.shard(full, r, tp) for r in range(tp)])
        for name, tensor in zip(binding.hf_names, binding.row.to_hf(full, ctx)):
            assert torch.equal(tensor, hf[name]), name


def test_all_presets_parse():
    for preset in list_presets():
        args = args_from_config(load_preset(preset), preset)
        assert args.diffusion is not None and mapping_for(args).expected_hf()


def test_llada2_numbers():
    mini = args_from_config(load_preset("llada2.0-mini"))
    assert mini.architecture == "LLaDA2MoeModelLM" and mini.family == "llada2"
    assert mini.moe.layer_pattern == (0,) + (1,) * 19  # first_k_dense_replace = 1
    assert (mini.moe.num_experts, mini.moe.topk, mini.moe.num_groups, mini.moe.group_topk) == (256, 8, 8, 4)
    assert mini.moe.score_function == "sigmoid" and mini.moe.expert_bias and mini.moe.scaling_factor == 2.5
    assert mini.moe.shared_expert_ffn_hidden_size == 512 and mini.ffn_hidden_size == 5120
    assert mini.rotary_percent == 0.5 and mini.head_dim * mini.rotary_percent == 64 and mini.rope_theta == 600000
    assert mini.diffusion.mask_token_id == 156895 and mini.diffusion.block_size == 32
    assert mini.diffusion.pad_token_id == 156892 and mini.diffusion.eos_token_ids == (156892,)
    assert not mini.tie_word_embeddings
    flash = args_from_config(load_preset("llada2.0-flash"))
    assert (flash.num_layers, flash.hidden_size, flash.num_attention_heads, flash.num_kv_heads) == (32, 4096, 32, 4)
    assert flash.ffn_hidden_size == 9216 and flash.moe.expert_ffn_hidden_size == 1024


def test_llada2_group_score_rule_is_checked():
    from dare_mega.errors import ConfigError

    cfg = load_preset("llada2.0-mini")
    with pytest.raises(ConfigError, match="num_experts_per_tok == 2 \\* topk_group"):
        args_from_config({**cfg, "num_experts_per_tok": 6})
    with pytest.raises(ConfigError, match="num_experts=256 is not divisible by n_group=7"):
        args_from_config({**cfg, "n_group": 7})
    with pytest.raises(ConfigError, match="rotary_dim=32 disagrees"):
        args_from_config({**cfg, "rotary_dim": 32})


def test_llada2_reference_names_match_the_published_index(reference_configs):
    """The plain PyTorch reference, built from the mini config, has exactly the published tensor names."""
    from dare_mega.models.llada2.reference import LLaDA2Reference

    cfg = json.load(open(reference_configs / "LLaDA2.0-mini" / "config.json"))
    with torch.device("meta"):
        model = LLaDA2Reference(cfg)
    index = json.load(open(reference_configs / "LLaDA2.0-mini" / "model.safetensors.index.json"))["weight_map"]
    assert set(model.state_dict()) == set(index)
    table = mapping_for(args_from_config(load_preset("llada2.0-mini")))
    expected = table.expected_hf()
    for name, tensor in model.state_dict().items():
        assert tuple(tensor.shape) == expected[name], name


def test_llada_preset_mapping_and_reference_are_the_published_ones(reference_configs):
    """LLaDA-8B-Instruct (OLMo keys): the preset is config.json as published; the mapping table names every
    published tensor, with shapes whose bf16 bytes add up to the index's total_size; the plain PyTorch reference
    has exactly those names and shapes; the numbers read as the model card says."""
    import math

    from dare_mega.models.llada.reference import LLaDAReference

    published = reference_configs / "LLaDA-8B-Instruct"
    cfg = json.load(open(published / "config.json"))
    assert load_preset("llada-8b-instruct") == cfg
    index = json.load(open(published / "model.safetensors.index.json"))
    args = args_from_config(cfg)
    expected = mapping_for(args).expected_hf()
    assert set(expected) == set(index["weight_map"])
    assert sum(math.prod(shape) for shape in expected.values()) * 2 == index["metadata"]["total_size"]
    with torch.device("meta"):
        model = LLaDAReference(cfg)
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == expected
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_kv_heads, args.head_dim,
            args.ffn_hidden_size, args.vocab_size, args.rope_theta, args.max_position_embeddings) == \
        (32, 4096, 32, 32, 128, 12288, 126464, 500000.0, 4096)
    d = args.diffusion
    assert (d.mask_token_id, d.attention, d.shifted_logits, d.pad_token_id, d.eos_token_ids) == \
        (126336, "full", False, 126081, (126081, 126348))
    assert args.features == {"full_attention"} and not args.qk_norm and not args.tie_word_embeddings


@pytest.mark.parametrize("key,value", [("block_type", "sequential"), ("alibi", True), ("attention_layer_norm", True),
                                       ("include_bias", True), ("scale_logits", True), ("layer_norm_type", "default"),
                                       ("activation_type", "swiglu"), ("rope", False)])
def test_llada_settings_outside_the_published_layout_are_refused(key, value):
    from dare_mega.errors import ConfigError

    cfg = {**load_preset("tiny-llada"), key: value}
    with pytest.raises(ConfigError, match=rf"{key}={value!r} is not supported"):
        args_from_config(cfg)
    with pytest.raises(ConfigError, match="embedding_size=200 is smaller than vocab_size=300"):
        args_from_config({**load_preset("tiny-llada"), "embedding_size": 200})


def llada_moe_published_tensors(cfg) -> dict:
    """LLaDA-MoE's tensor names and shapes as its published modeling_lladamoe.py builds them (OLMoE's names),
    stated from the config independently of the mapping table and the reference."""
    hidden, vocab, experts = cfg["hidden_size"], cfg["vocab_size"], cfg["num_experts"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
           "lm_head.weight": (vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.update({f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                    f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv, hidden),
                    f"{p}.self_attn.v_proj.weight": (kv, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden)})
        if cfg.get("qk_layernorm"):
            out.update({f"{p}.self_attn.q_norm.weight": (head_dim,), f"{p}.self_attn.k_norm.weight": (head_dim,)})
        if not cfg["moe_layer_freq"][i]:
            inner = cfg["dense_intermediate_size"]
            out.update({f"{p}.mlp.gate_proj.weight": (inner, hidden), f"{p}.mlp.up_proj.weight": (inner, hidden),
                        f"{p}.mlp.down_proj.weight": (hidden, inner)})
            continue
        inner = cfg["expert_intermediate_size"]
        out[f"{p}.mlp.gate.weight"] = (experts, hidden)
        for e in range(experts):
            out.update({f"{p}.mlp.experts.{e}.gate_proj.weight": (inner, hidden),
                        f"{p}.mlp.experts.{e}.up_proj.weight": (inner, hidden),
                        f"{p}.mlp.experts.{e}.down_proj.weight": (hidden, inner)})
        if cfg.get("shared_expert_intermediate_size"):
            shared = cfg["shared_expert_intermediate_size"]
            out.update({f"{p}.shared_expert.gate_proj.weight": (shared, hidden),
                        f"{p}.shared_expert.up_proj.weight": (shared, hidden),
                        f"{p}.shared_expert.down_proj.weight": (hidden, shared)})
    return out


@pytest.mark.parametrize("preset,changes", [
    ("llada-moe-7b-a1b-instruct", {}),
    # what the published code supports and the published config does not use
    ("tiny-llada-moe", {"num_hidden_layers": 3, "moe_layer_freq": [0, 1, 1], "shared_expert_intermediate_size": 48,
                        "qk_layernorm": False, "num_key_value_heads": 2}),
])
def test_llada_moe_mapping_and_reference_name_every_published_tensor(preset, changes):
    """LLaDA-MoE (no published index in ../shared): the mapping table and the plain PyTorch reference both name
    exactly the tensors, with the shapes, that modeling_lladamoe.py builds from the config."""
    from dare_mega.models.llada_moe.reference import LLaDAMoEReference

    cfg = {**load_preset(preset), **changes}
    published = llada_moe_published_tensors(cfg)
    assert mapping_for(args_from_config(cfg)).expected_hf() == published
    with torch.device("meta"):
        model = LLaDAMoEReference(cfg)
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == published


def test_llada_moe_numbers():
    """LLaDA-MoE-7B-A1B: the numbers of the model card and modeling code (docs/architecture.md names the
    sources). 7.36e9 parameters (the paper's "7B", about 14.7 GB in bf16), of which a token uses 1.4e9 besides
    the embedding ("activating 1.4B"): attention, router and 8 of 64 experts in each of 16 layers, the head."""
    import math

    args = args_from_config(load_preset("llada-moe-7b-a1b-instruct"))
    assert args.family == "llada_moe" and args.architecture == "LLaDAMoEModelLM"
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_kv_heads, args.head_dim,
            args.vocab_size, args.rope_theta, args.rotary_percent, args.norm_eps, args.max_position_embeddings) == \
        (16, 2048, 16, 16, 128, 157184, 50000.0, 1.0, 1e-5, 8192)
    moe = args.moe
    assert (moe.num_experts, moe.topk, moe.expert_ffn_hidden_size) == (64, 8, 1024)
    assert moe.shared_expert_ffn_hidden_size == 0
    assert moe.score_function == "softmax" and not moe.norm_topk_prob and not moe.expert_bias
    assert moe.layer_pattern == (1,) * 16 and moe.aux_loss_coef == 0.01
    d = args.diffusion
    assert (d.mask_token_id, d.block_size, d.attention, d.shifted_logits, d.pad_token_id, d.eos_token_ids) == \
        (156895, 32, "full", False, 156892, (156892,))
    assert args.features == {"qk_norm", "full_attention", "router_softmax"} and not args.tie_word_embeddings
    shapes = mapping_for(args).expected_hf()
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 7_356_880_896 and total * 2 == 14_713_761_792  # bf16 bytes
    per_expert = 3 * 2048 * 1024
    active = total - 157184 * 2048 - 16 * (64 - 8) * per_expert
    assert 1.35e9 < active < 1.45e9


@pytest.mark.parametrize("key,value,message", [
    ("moe_router_enable_expert_bias", True, "moe_router_enable_expert_bias=true is not supported"),
    ("clip_qkv", 8.0, "clip_qkv=8.0 is not supported"),
    ("attention_bias", True, "attention_bias=true is not supported"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling=.* is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("head_dim", 32, "head_dim=32 is not supported"),
    ("moe_layer_freq", [1], r"moe_layer_freq=\[1\] must list 0 \(dense\) or 1 \(MoE\) for each of the "
                            "num_hidden_layers=2"),
    ("moe_layer_freq", [1, 2], r"moe_layer_freq=\[1, 2\] has entries other than"),
    ("partial_rotary_factor", -1, "partial_rotary_factor=-1 must be in"),
    ("num_experts_per_tok", 9, "num_experts_per_tok=9 exceeds num_experts=8"),
    ("expert_intermediate_size", None, "required key 'expert_intermediate_size' is missing"),
])
def test_llada_moe_settings_outside_what_megatron_reproduces_are_refused(key, value, message):
    from dare_mega.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        args_from_config({**load_preset("tiny-llada-moe"), key: value})
    with pytest.raises(ConfigError, match="required key 'dense_intermediate_size' is missing"):
        cfg = {**load_preset("tiny-llada-moe"), "moe_layer_freq": [0, 1]}
        cfg.pop("dense_intermediate_size")
        args_from_config(cfg)


def test_llada_moe_keys_its_code_never_reads_change_nothing():
    """modeling_lladamoe.py hard-codes norm_topk_prob = False, always applies softmax and never reads
    routed_scaling_factor or the router groups: those keys do not change the model."""
    tiny = load_preset("tiny-llada-moe")
    ignored = {"norm_topk_prob": True, "moe_router_score_function": "sigmoid", "routed_scaling_factor": 2.5,
               "router_num_group": 4, "router_topk_group": 2}
    assert args_from_config({**tiny, **ignored}) == args_from_config(tiny)
