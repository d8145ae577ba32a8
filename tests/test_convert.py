"""HF <-> Megatron torch_dist conversion: exact round trips, resharding on load, the CLI, bad input."""

import json
import os
import re
import shutil

import pytest
import torch
from conftest import run_json_worker, torchrun

from dare_mega.errors import CheckpointError, ConfigError

PUBLISHED_INDEX = {"sdar": "SDAR-4B-Chat", "sdar_moe": "SDAR-30B-A3B-Chat", "llada2_moe": "LLaDA2.0-mini",
                   "llada": "LLaDA-8B-Instruct", "dream": "Dream-v0-Instruct-7B"}


def name_patterns(names):
    return {re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+\.", ".N.", n)) for n in names}


@pytest.fixture(scope="module")
def bf16_llada2(tmp_path_factory):
    from dare_mega.checkpoint.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("bf16")
    return make_tiny_checkpoint(str(root / "tiny-llada2-bf16"), preset="tiny-llada2-moe", dtype=torch.bfloat16)


@pytest.mark.distributed
def test_round_trips_and_resharding(tiny_dir, bf16_llada2, tmp_path, reference_configs):
    cases = [
        {"name": "sdar", "hf": tiny_dir["sdar"], "save": {"tp": 2}, "load": [{"pp": 2}]},
        {"name": "sdar-pp", "hf": tiny_dir["sdar"], "save": {"pp": 2}, "load": []},
        {"name": "sdar-moe-pp", "hf": tiny_dir["sdar_moe"], "save": {"pp": 2}, "load": []},
        {"name": "sdar-moe", "hf": tiny_dir["sdar_moe"], "save": {"tp": 2, "ep": 2},
         "load": [{"pp": 2}, {"ep": 4}]},
        {"name": "llada2-moe", "hf": tiny_dir["llada2_moe"], "save": {"tp": 2, "ep": 2},
         "load": [{"pp": 2}, {"ep": 4}]},
        {"name": "llada2-pp", "hf": tiny_dir["llada2_moe"], "save": {"pp": 2}, "load": [{"tp": 2, "ep": 2}]},
        {"name": "llada2-bf16", "hf": bf16_llada2, "save": {"ep": 4}, "load": [{"tp": 2}]},
        {"name": "llada", "hf": tiny_dir["llada"], "save": {"tp": 2}, "load": [{"pp": 2}]},
        {"name": "dream", "hf": tiny_dir["dream"], "save": {"pp": 2}, "load": [{"tp": 2}]},
        {"name": "llada-moe", "hf": tiny_dir["llada_moe"], "save": {"tp": 2, "ep": 2}, "load": [{"pp": 2}]},
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"root": str(tmp_path), "cases": cases}))
    results = run_json_worker(4, ["tests/workers/convert_worker.py", str(spec)], tmp_path / "out.json")
    families = {"sdar": "sdar", "sdar-pp": "sdar", "sdar-moe": "sdar_moe", "sdar-moe-pp": "sdar_moe",
                "llada2-moe": "llada2_moe", "llada2-pp": "llada2_moe", "llada2-bf16": "llada2_moe", "llada": "llada",
                "dream": "dream", "llada-moe": "llada_moe"}
    for r in results:
        assert r["names_equal"], f"{r['name']}: exported names differ from the source"
        assert r["bit_exact"], f"{r['name']} (saved at {r['saved_at']}): not bit-exact: {r['mismatched']}"
        assert "model.safetensors.index.json" in r["exported_files"] and "tokenizer.json" in r["exported_files"]
        if families[r["name"]] in PUBLISHED_INDEX:  # LLaDA-MoE's index is not in ../shared: tests/test_models.py
            published = reference_configs / PUBLISHED_INDEX[families[r["name"]]]  # checks its names instead
            index = json.load(open(published / "model.safetensors.index.json"))
            assert name_patterns(r["exported_names"]) == name_patterns(index["weight_map"]), r["name"]
        for load in r["loads"]:
            assert load["max_abs_logit_diff"] == 0.0, f"{r['name']}: saved at {r['saved_at']}, loaded at {load}"


@pytest.mark.distributed
def test_cli_both_directions_with_verify(tiny_dir, tmp_path):
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    proc = torchrun(4, ["tools/convert_checkpoint.py", "--direction", "hf2mcore", "--hf", tiny_dir["sdar_moe"],
                        "--mcore", str(mcore), "--tp", "2", "--ep", "2", "--verify"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("hf2mcore:")]
    assert summary and re.search(r"tensors=\d+ bytes=\d+ .* seconds=[0-9.]+ .* peak_rss_per_rank_max=\d+ MiB", summary[0])
    assert "verify" in proc.stdout and "PASS" in proc.stdout
    proc = torchrun(2, ["tools/convert_checkpoint.py", "--direction", "mcore2hf", "--mcore", str(mcore),
                        "--hf", str(hf), "--verify", "--pp", "2", "--max-shard-gb", "0.0005"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any(line.startswith("mcore2hf:") for line in proc.stdout.splitlines())
    index = json.load(open(hf / "model.safetensors.index.json"))
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all(os.path.getsize(hf / f) <= 600_000 for f in files)


def _cli_error(nproc, args):
    proc = torchrun(nproc, ["tools/convert_checkpoint.py", *args])
    return proc.returncode, proc.stderr


@pytest.mark.distributed
def test_cli_bad_input_fails_cleanly(tiny_dir, tmp_path):
    # a truncated shard: named, exit status non-zero, and no output directory at all
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir["sdar_moe"], broken)
    index = json.load(open(broken / "model.safetensors.index.json"))
    shard = broken / sorted(set(index["weight_map"].values()))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    out = tmp_path / "out-truncated"
    code, err = _cli_error(2, ["--direction", "hf2mcore", "--hf", str(broken), "--mcore", str(out), "--tp", "2"])
    assert code != 0 and shard.name in err and "error:" in err, err[-2000:]
    assert not out.exists()

    # an existing, non-empty output directory is never overwritten
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli_error(1, ["--direction", "hf2mcore", "--hf", tiny_dir["sdar"], "--mcore", str(out)])
    assert code != 0 and "refusing to overwrite" in err and (out / "keep.txt").read_text() == "mine"


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    index_file = path / "model.safetensors.index.json"
    index = json.load(open(index_file))
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / file)
        changed = edit(tensors)
        if changed is not None:
            save_file(changed, path / file, metadata={"format": "pt"})
            index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file or n in changed}
    json.dump(index, open(index_file, "w"))


def _save(hf, out):
    from dare_mega.checkpoint.torch_dist import save_from_hf
    from dare_mega.parallel import ParallelLayout

    save_from_hf(str(hf), str(out), ParallelLayout())


def test_missing_expert_shape_mismatch_and_family_mismatch(tiny_dir, tmp_path, world1):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir["llada2_moe"], src)
    _rewrite(src, lambda t: {n: v for n, v in t.items() if ".experts.11." not in n} if any(
        ".layers.2.mlp.experts.11." in n for n in t) else None)
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d\.mlp\.experts\.11\."):
        _save(src, tmp_path / "o1")
    assert not (tmp_path / "o1").exists() and not (tmp_path / ".o1.partial").exists()

    src2 = tmp_path / "src2"
    shutil.copytree(tiny_dir["llada2_moe"], src2)
    victim = "model.layers.1.attention.query_key_value.weight"
    _rewrite(src2, lambda t: {**t, victim: t[victim][:100].contiguous()} if victim in t else None)
    with pytest.raises(CheckpointError) as err:
        _save(src2, tmp_path / "o2")
    assert victim in str(err.value) and "[100, 64]" in str(err.value) and "[256, 64]" in str(err.value)

    # an SDAR config over LLaDA2 weights: the family mismatch shows as tensors the config does not know
    src3 = tmp_path / "src3"
    shutil.copytree(tiny_dir["llada2_moe"], src3)
    shutil.copy(os.path.join(tiny_dir["sdar_moe"], "config.json"), src3 / "config.json")
    with pytest.raises(CheckpointError, match="SDARMoeForCausalLM"):
        _save(src3, tmp_path / "o3")


def test_incomplete_torch_dist_checkpoint_is_refused(tiny_dir, tmp_path, world1):
    from dare_mega.checkpoint.export import export_to_hf

    mcore = tmp_path / "mcore"
    _save(tiny_dir["sdar"], mcore)
    os.remove(mcore / ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        export_to_hf(str(mcore), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        export_to_hf(str(tmp_path / "nothing"), str(tmp_path / "hf"))


def test_layout_errors_come_first(tiny_dir, tmp_path, world1):
    from dare_mega.checkpoint.torch_dist import save_from_hf
    from dare_mega.parallel import ParallelLayout

    with pytest.raises(ConfigError, match="num_experts=16 is not divisible by ep=3"):
        save_from_hf(tiny_dir["llada2_moe"], str(tmp_path / "o"), ParallelLayout(ep=3))
    assert not (tmp_path / "o").exists()
