"""Dream-7B (DreamModel, Qwen2 layout): the published config and index, the q / k / v biases and the shifted
prediction (the token at i predicted from position i - 1) in the Megatron model, the engine and the reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dare_mega.errors import ConfigError
from dare_mega.models.builder import args_from_config, mapping_for
from dare_mega.models.presets import load_preset


def test_dream_preset_and_mapping_are_the_published_ones(reference_configs):
    """The preset is config.json as published; the table names every tensor of the published index with shapes
    whose bf16 bytes add up to its total_size; transformers' Qwen2 (the reference) has exactly those names."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    published = reference_configs / "Dream-v0-Instruct-7B"
    cfg = json.load(open(published / "config.json"))
    assert load_preset("dream-v0-instruct-7b") == cfg
    index = json.load(open(published / "model.safetensors.index.json"))
    args = args_from_config(cfg)
    expected = mapping_for(args).expected_hf()
    assert set(expected) == set(index["weight_map"])
    assert sum(math.prod(shape) for shape in expected.values()) * 2 == index["metadata"]["total_size"]
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "attn_implementation")}))
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == expected
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_kv_heads, args.head_dim,
            args.ffn_hidden_size, args.vocab_size, args.rope_theta) == (28, 3584, 28, 4, 128, 18944, 152064, 1e6)
    d = args.diffusion
    assert (d.mask_token_id, d.attention, d.shifted_logits, d.pad_token_id, d.eos_token_ids) == \
        (151666, "full", True, 151643, (151645, 151643))
    assert args.features == {"qkv_bias", "shifted_logits", "full_attention"}


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu"), ("use_sliding_window", True), ("use_mrope", True),
                                       ("rope_scaling", {"type": "yarn", "factor": 4.0})])
def test_dream_settings_outside_the_published_layout_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        args_from_config({**load_preset("tiny-dream"), key: value})


def test_the_shift_is_there_in_megatron_the_engine_and_the_reference(tiny_dir, world1):
    """On packed rows of two documents with the `full` mask: the reference's logits at i are Qwen2's at i - 1
    inside a document and its own at a document's first position (checked position by position); the Megatron
    model and the engine give those logits (1e-5) and are far from the unshifted ones, so a dropped shift fails."""
    from dare_mega.cli.parity import dense_mask, parity_batch
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.reference import additive_mask, reference_model
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout
    from dare_mega.rollout.engine import NativeEngine

    directory = tiny_dir["dream"]
    chunks, args = build_from_hf(directory, ParallelLayout())
    batch = parity_batch(args, "full", seq_len=24)
    allowed = dense_mask(batch)
    reference = reference_model(directory)
    with torch.no_grad():
        out = reference(input_ids=batch.input_ids, position_ids=batch.position_ids,
                        attention_mask=additive_mask(allowed, torch.float32))
    shifted, raw = out.logits.float(), out.raw_logits.float()
    starts = 0
    for b in range(batch.size):
        for i in range(batch.seq_len):
            first = int(batch.position_ids[b, i]) == 0
            starts += first
            assert torch.equal(shifted[b, i], raw[b, i if first else i - 1]), (b, i)
    assert starts == 2 * batch.size  # two documents per row, each restarting at position 0

    megatron = Runner(chunks, args).logits(batch)
    engine = NativeEngine.from_pretrained(directory, tokenizer=False).model
    native = engine(batch.input_ids, batch.position_ids, allowed[:, 0])
    for name, logits in (("megatron", megatron), ("engine", native)):
        assert (logits - shifted).abs().max().item() <= 1e-5, name
        assert (logits - raw).abs().max().item() > 1e-2, f"{name}: the unshifted logits would pass too"


def test_the_biases_are_loaded_and_matter(tiny_dir):
    """Every layer's q / k / v bias reaches the engine grouped as Megatron's linear_qkv; zeroing them moves
    the logits (a model that dropped them would not match the reference above)."""
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.storage.safetensors_io import CheckpointReader

    engine = NativeEngine.from_pretrained(tiny_dir["dream"], tokenizer=False).model
    args = engine.args
    reader = CheckpointReader(tiny_dir["dream"])
    d, per_group = args.head_dim, args.num_attention_heads // args.num_kv_heads
    for layer in range(args.num_layers):
        fused = engine.w(f"decoder.layers.{layer}.self_attention.linear_qkv.bias").view(args.num_kv_heads, -1)
        q, k, v = (reader.get(f"model.layers.{layer}.self_attn.{n}_proj.bias") for n in "qkv")
        for g in range(args.num_kv_heads):
            assert torch.equal(fused[g], torch.cat([q.view(args.num_kv_heads, -1)[g], k.view(-1, d)[g],
                                                    v.view(-1, d)[g]]))
        assert fused.shape[1] == (per_group + 2) * d
    tokens = torch.tensor([[5, 6, 7, 8]])
    positions = torch.arange(4)[None]
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    before = engine(tokens, positions, full)
    for layer in range(args.num_layers):
        engine.weights[f"decoder.layers.{layer}.self_attention.linear_qkv.bias"].zero_()
    assert (engine(tokens, positions, full) - before).abs().max().item() > 1e-3
