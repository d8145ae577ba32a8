"""The command-line tools and the main job, run as a user runs them."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, clean_env, torchrun


def test_make_tiny_model_writes_the_published_layout(tmp_path):
    out = tmp_path / "tiny-moe"
    proc = subprocess.run([sys.executable, "tools/make_tiny_model.py", "--preset", "tiny-sdar-moe", "--out", str(out)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    index = json.load(open(out / "model.safetensors.index.json"))["weight_map"]
    assert len(set(index.values())) > 1  # sharded, with an index
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in index and "lm_head.weight" in index
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["SDARMoeForCausalLM"] and "_preset" not in config

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token_id == config["mask_token_id"] and tok.pad_token_id == config["eos_token_id"] == 256
    from dare_mega.models.builder import load_model_args

    args = load_model_args(str(out))  # generation_config.json's stop ids come first
    assert args.diffusion.eos_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"), 256)
    assert args.diffusion.pad_token_id == 256
    ids = tok("héllo<|MASK|>")["input_ids"]
    assert config["mask_token_id"] in ids and tok.decode(ids) == "héllo<|MASK|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")

    again = subprocess.run([sys.executable, "tools/make_tiny_model.py", "--preset", "tiny-sdar", "--out", str(out)],
                           cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


def test_make_tiny_llada2_in_bfloat16(tmp_path):
    out = tmp_path / "tiny-llada2"
    proc = subprocess.run([sys.executable, "tools/make_tiny_model.py", "--preset", "tiny-llada2-moe", "--out", str(out),
                           "--dtype", "bfloat16"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoTokenizer

    from dare_mega.models.builder import load_model_args
    from dare_mega.storage.safetensors_io import CheckpointReader

    reader = CheckpointReader(str(out))
    assert reader.dtype("model.layers.1.mlp.gate.expert_bias") == torch.float32  # as published
    assert reader.dtype("model.layers.1.attention.query_key_value.weight") == torch.bfloat16
    args = load_model_args(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token_id == args.diffusion.mask_token_id == 259 and tok.eos_token_id == 256
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>")


@pytest.mark.distributed
def test_check_logits_prints_and_saves(tiny_dir, tmp_path):
    save = tmp_path / "logits.pt"
    proc = torchrun(2, ["tools/check_logits.py", "--hf", tiny_dir["sdar_moe"], "--tp", "2", "--mask", "block",
                        "--save", str(save)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"max_abs_logit_diff=([0-9.e+-]+)", last)
    assert match, f"last line is {last!r}"
    assert float(match.group(1)) <= 1e-5
    data = torch.load(save)
    b, s = data["input_ids"].shape
    assert data["attention_mask"].dtype == torch.bool and data["attention_mask"].shape == (b, 1, s, s)
    assert data["megatron_logits"].dtype == torch.float32 and data["megatron_logits"].shape == (b, s, 500)
    # anyone can check another implementation against it: here, transformers' model
    from dare_mega.models.reference import reference_logits, reference_model

    ref = reference_logits(reference_model(tiny_dir["sdar_moe"]), data["input_ids"], data["position_ids"],
                           data["attention_mask"])
    assert (ref - data["megatron_logits"]).abs().max().item() <= 1e-5


@pytest.mark.distributed
def test_check_logits_exit_status_follows_the_tolerance(tiny_dir):
    """LLaDA without --mask: its own (full) mask at the default --seq-len; --tolerance 0 fails."""
    proc = torchrun(1, ["tools/check_logits.py", "--hf", tiny_dir["llada"], "--grads", "--tolerance", "0"])
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mask full" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("max_abs_logit_diff=")


@pytest.mark.parametrize("preset", ["tiny-sdar", "tiny-llada2-moe", "tiny-llada", "tiny-dream", "tiny-llada-moe",
                                    "llada2.0-mini", "llada-8b-instruct", "dream-v0-instruct-7b", "sdar-30b-a3b-chat",
                                    "llada-moe-7b-a1b-instruct"])
def test_the_parity_batch_works_at_the_default_length_for_every_family(preset):
    """Every mask kind at the default --seq-len, a block of 32 included (LLaDA2's published one); `full` puts
    documents side by side with no block grid; a length that cannot hold two documents is refused by name."""
    from dare_mega.cli.parity import MASK_KINDS, dense_mask, parity_batch
    from dare_mega.models.builder import args_from_config
    from dare_mega.models.presets import load_preset

    args = args_from_config(load_preset(preset))
    for kind in MASK_KINDS:
        batch = parity_batch(args, kind)
        assert batch.loss_weights.sum() > 0, kind
    full = parity_batch(args, "full")
    doc = (full.position_ids == 0).cumsum(1)
    assert torch.equal(dense_mask(full)[:, 0], doc[:, :, None] == doc[:, None, :])  # each document, whole
    assert (full.input_ids == args.diffusion.mask_token_id).any() and full.seq_len == 16
    block = args.diffusion.block_size
    with pytest.raises(ValueError, match=rf"--seq-len {2 * block - 1}: the block mask .* at least {2 * block}"):
        parity_batch(args, "block", seq_len=2 * block - 1)


@pytest.mark.distributed
def test_main_job_runs_parity_at_tp2_ep2(tmp_path):
    env = clean_env(DARE_MEGA_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "dare_mega"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TP=2 x PP=1 x EP=2" in proc.stdout and "PASS" in proc.stdout
    assert re.search(r"logits: max \|megatron - transformers\| = [0-9.e+-]+", proc.stdout)
