"""Bad input fails early and says what is wrong: the key, the tensor and both shapes, the file."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dare_mega.errors import CheckpointError, ConfigError
from dare_mega.models import builder
from dare_mega.models.args import read_eos_ids
from dare_mega.models.builder import build_from_hf, load_model_args
from dare_mega.models.transformer_config import check_layout
from dare_mega.parallel import ParallelLayout


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if a Megatron model is constructed: errors must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(builder, "build_model", refuse)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize(
    "layout,key",
    [
        (ParallelLayout(tp=3), "num_attention_heads=4 is not divisible by tp=3"),
        (ParallelLayout(tp=4, ep=1), "num_key_value_heads=2 is not divisible by tp=4"),
        (ParallelLayout(ep=3), "num_experts=8 is not divisible by ep=3"),
        (ParallelLayout(pp=3), "num_hidden_layers=4 is not divisible by pp=3"),
        (ParallelLayout(pp=2, vpp=4), "num_hidden_layers=4 is not divisible by pp*vpp=8"),
        (ParallelLayout(ep=2, etp=3), "moe_intermediate_size=32 is not divisible by etp=3"),
    ],
)
def test_layout_that_does_not_divide_the_model(tiny_dir, layout, key, no_model_built):
    with pytest.raises(ConfigError) as err:
        build_from_hf(tiny_dir["sdar_moe"], layout)
    assert key in str(err.value)
    assert "config.json" in str(err.value)


def test_expert_parallel_on_a_dense_model(tiny_dir, no_model_built):
    with pytest.raises(ConfigError, match="ep=2 needs a MoE model"):
        build_from_hf(tiny_dir["sdar"], ParallelLayout(ep=2))


def test_layout_fields_are_checked():
    with pytest.raises(ConfigError, match="tp=0"):
        ParallelLayout(tp=0)
    with pytest.raises(ConfigError, match="vpp=2 needs pp > 1"):
        ParallelLayout(vpp=2)
    with pytest.raises(ConfigError, match="moe_dispatcher='flex'"):
        ParallelLayout(moe_dispatcher="flex")
    with pytest.raises(ConfigError, match="etp=1 with ep=1 must equal tp=2"):
        ParallelLayout(tp=2, etp=1)
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        ParallelLayout(tp=4).check_world(6)


def test_moe_with_tensor_parallel_needs_sequence_parallel():
    args = load_model_args(os.path.join(os.path.dirname(__file__), "..", "configs", "models", "tiny-sdar-moe.json"))
    with pytest.raises(ConfigError, match="needs sequence parallelism"):
        check_layout(args, ParallelLayout(tp=2, sequence_parallel=False))


def test_unknown_architecture(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar"], tmp_path / "ckpt")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["MysteryForCausalLM"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError) as err:
        build_from_hf(path, ParallelLayout())
    assert "MysteryForCausalLM" in str(err.value) and "config.json" in str(err.value)
    assert "SDARForCausalLM" in str(err.value)  # says what it knows


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "num_experts"])
def test_missing_config_key(tiny_dir, tmp_path, key, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar_moe"], tmp_path / "ckpt")
    cfg = json.load(open(os.path.join(path, "config.json")))
    del cfg[key]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError) as err:
        build_from_hf(path, ParallelLayout())
    assert repr(key) in str(err.value) and os.path.join(path, "config.json") in str(err.value)


def test_malformed_config_values(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar"], tmp_path / "ckpt")
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    json.dump({**cfg, "num_attention_heads": 3}, open(cfg_file, "w"))
    with pytest.raises(ConfigError, match="num_attention_heads=3 is not divisible by num_key_value_heads=2"):
        build_from_hf(path, ParallelLayout())
    json.dump({**cfg, "mask_token_id": 9999}, open(cfg_file, "w"))
    with pytest.raises(ConfigError, match="mask_token_id=9999 is outside the vocabulary"):
        build_from_hf(path, ParallelLayout())
    json.dump({**cfg, "pad_token_id": 7, "mask_token_id": 7}, open(cfg_file, "w"))  # DARE's 30B recipe mistake
    with pytest.raises(ConfigError, match="mask_token_id=7 is also the pad token"):
        build_from_hf(path, ParallelLayout())
    with pytest.raises(ConfigError, match="is also an end-of-text token"):
        build_from_hf(path, ParallelLayout(), mask_token_id=read_eos_ids(cfg)[0])
    json.dump({**cfg, "hidden_act": "gelu"}, open(cfg_file, "w"))
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        build_from_hf(path, ParallelLayout())
    open(cfg_file, "w").write("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_from_hf(path, ParallelLayout())


def _rewrite_shard(path, edit):
    """Apply `edit(tensors)` to the shard files of a checkpoint (and its index)."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index_file):  # a single-file checkpoint
        tensors = load_file(os.path.join(path, "model.safetensors"))
        changed = edit(tensors)
        if changed is not None:
            save_file(changed, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    index = json.load(open(index_file))
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(path, file))
        changed = edit(tensors)
        if changed is not None:
            save_file(changed, os.path.join(path, file), metadata={"format": "pt"})
            index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file or n in changed}
    json.dump(index, open(index_file, "w"))


def test_missing_tensor(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar_moe"], tmp_path / "ckpt")
    victim = "model.layers.2.mlp.experts.5.up_proj.weight"

    def drop(tensors):
        if victim in tensors:
            return {n: t for n, t in tensors.items() if n != victim}

    _rewrite_shard(path, drop)
    with pytest.raises(CheckpointError) as err:
        build_from_hf(path, ParallelLayout())
    assert victim in str(err.value) and "[32, 64]" in str(err.value) and path in str(err.value)


def test_misshaped_tensor(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar_moe"], tmp_path / "ckpt")
    victim = "model.layers.1.self_attn.o_proj.weight"  # [hidden 64, q 128]: a transposed copy is [128, 64]

    def transpose(tensors):
        if victim in tensors:
            return {**tensors, victim: tensors[victim].t().contiguous()}

    _rewrite_shard(path, transpose)
    with pytest.raises(CheckpointError) as err:
        build_from_hf(path, ParallelLayout())
    message = str(err.value)
    assert victim in message and "has shape [128, 64]" in message and "needs [64, 128]" in message


def test_misshaped_tensor_names_both_shapes(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar"], tmp_path / "ckpt")
    victim = "model.layers.0.mlp.gate_proj.weight"

    def shrink(tensors):
        if victim in tensors:
            return {**tensors, victim: tensors[victim][:100].contiguous()}

    _rewrite_shard(path, shrink)
    with pytest.raises(CheckpointError) as err:
        build_from_hf(path, ParallelLayout())
    message = str(err.value)
    assert victim in message and "[100, 64]" in message and "[128, 64]" in message and ".safetensors" in message


def test_tensor_the_config_does_not_know(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar"], tmp_path / "ckpt")
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    json.dump({**cfg, "num_hidden_layers": 2}, open(cfg_file, "w"))  # checkpoint has 4 layers
    with pytest.raises(CheckpointError, match="model.layers.2"):
        build_from_hf(path, ParallelLayout())


def test_half_written_checkpoint_is_refused(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar_moe"], tmp_path / "ckpt")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    last = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(path, last))
    with pytest.raises(CheckpointError, match=last):
        build_from_hf(path, ParallelLayout())


def test_truncated_shard_is_refused(tiny_dir, tmp_path, no_model_built):
    path = copy_checkpoint(tiny_dir["sdar_moe"], tmp_path / "ckpt")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = os.path.join(path, sorted(set(index["weight_map"].values()))[0])
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="cannot be read|absent"):
        build_from_hf(path, ParallelLayout())


def test_missing_directory_and_files(tmp_path):
    from dare_mega.storage.safetensors_io import CheckpointReader

    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        CheckpointReader(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        load_model_args(str(tmp_path))


def test_checkpoint_writer_never_overwrites(tmp_path):
    from dare_mega.storage.safetensors_io import write_hf_checkpoint

    target = tmp_path / "out"
    write_hf_checkpoint(str(target), {"a": torch.zeros(2)}, config={"x": 1})
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        write_hf_checkpoint(str(target), {"a": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left behind
