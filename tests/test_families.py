"""The family registry is the one place that knows families; components refuse features they do not implement."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dare_mega.algorithms.sft import objective
from dare_mega.errors import ConfigError
from dare_mega.models.builder import MEGATRON_FEATURES, args_from_config, build_model
from dare_mega.models.family import FEATURES, families, family_named, require_features
from dare_mega.models.presets import list_presets, load_preset
from dare_mega.parallel import ParallelLayout
from dare_mega.rollout.model import InferenceModel

FAMILIES = [(f.name, f) for f in families()]


@pytest.mark.parametrize("name,family", FAMILIES)
def test_each_entry_declares_what_the_rest_needs(name, family):
    assert family_named(name) is family
    assert {"specials", "eos", "pad", "mask", "chat", "generation_eos"} <= set(family.tiny_tokenizer)
    assert family.tiny_tokenizer["mask"] in family.tiny_tokenizer["specials"]
    assert objective("auto", name).name == family.sft_objective
    assert family.reference_features <= set(FEATURES)
    assert family.tiny_presets and all(p in list_presets() for p in family.tiny_presets)
    for preset in family.tiny_presets:
        args = args_from_config(load_preset(preset))
        assert args.family == name and args.architecture in family.architectures  # one name for one thing
        runs_everywhere_it_is_built(args, family)


def runs_everywhere_it_is_built(args, family):
    """The Megatron model and the family's reference implement everything the model needs; the rollout
    engine either does or refuses the model naming what it lacks."""
    for implemented in (MEGATRON_FEATURES, family.reference_features):
        assert args.features <= implemented, (args.architecture, args.features - implemented)
    lacking = sorted(args.features - InferenceModel.FEATURES)
    if lacking:
        with pytest.raises(ConfigError, match=rf"rollout engine .*does not implement {lacking[0]} \("):
            InferenceModel(args)


def test_every_published_preset_runs_everywhere():
    for preset in list_presets():
        args = args_from_config(load_preset(preset))
        runs_everywhere_it_is_built(args, family_named(args.family))


def with_feature(args, feature):
    if feature == "shifted_logits":
        return replace(args, diffusion=replace(args.diffusion, shifted_logits=True))
    if feature == "full_attention":
        return replace(args, diffusion=replace(args.diffusion, attention="full"))
    if feature == "qkv_bias":
        return replace(args, qkv_bias=True)
    raise KeyError(feature)


# every feature is implemented by the Megatron model and the engine today: the refusal is checked on a component
# that lacks one (its declared set without it)
@pytest.mark.parametrize("feature", ["shifted_logits", "qkv_bias"])
def test_the_megatron_builder_refuses_a_feature_it_lacks(feature, world1, monkeypatch):
    from dare_mega.models import builder

    monkeypatch.setattr(builder, "MEGATRON_FEATURES", MEGATRON_FEATURES - {feature})
    args = with_feature(args_from_config(load_preset("tiny-sdar")), feature)
    assert feature in args.features
    with pytest.raises(ConfigError, match=rf"Megatron model .*does not implement {feature} \("):
        build_model(args, ParallelLayout())


@pytest.mark.parametrize("feature", ["shifted_logits", "qkv_bias"])
def test_the_engine_refuses_a_feature_it_lacks(feature, monkeypatch):
    monkeypatch.setattr(InferenceModel, "FEATURES", InferenceModel.FEATURES - {feature})
    args = with_feature(args_from_config(load_preset("tiny-llada2-moe")), feature)
    with pytest.raises(ConfigError, match=rf"rollout engine .*does not implement {feature} \("):
        InferenceModel(args)


def test_references_refuse_what_they_lack():
    sdar = family_named("sdar")
    args = with_feature(args_from_config(load_preset("tiny-sdar")), "shifted_logits")
    with pytest.raises(ConfigError, match="the sdar reference does not implement shifted_logits"):
        require_features(args, sdar.reference_features, "the sdar reference")
    require_features(with_feature(args_from_config(load_preset("tiny-sdar")), "full_attention"),
                     sdar.reference_features, "the sdar reference")  # transformers takes any mask


def test_an_unknown_family_is_named():
    with pytest.raises(ConfigError, match="unknown model family 'mdlm'.*dream, llada, llada2, llada_moe, sdar"):
        family_named("mdlm")


# ---- a family added from one folder ---------------------------------------------------------------------

TOY = "tests/families/toy_qwen3"


@pytest.mark.distributed
def test_a_toy_family_from_one_folder_runs_parity_at_tp2_and_trains(tmp_path):
    """tests/families/toy_qwen3/ (config, mapping, preset, reference) is the whole family: named in
    $DARE_MEGA_FAMILIES, it makes a tiny checkpoint, matches transformers' Qwen3 at TP=2 (logits, loss, every
    gradient shard within 1e-5) and runs SFT steps, while nothing in dare_mega/ knows its name."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, clean_env, completed, start, torchrun

    for root, _, files in os.walk(REPO / "dare_mega"):
        for f in files:
            if f.endswith(".py"):
                assert "toy_qwen3" not in open(os.path.join(root, f)).read().lower(), f
    with pytest.raises(ConfigError, match="unknown architecture 'ToyQwen3ForCausalLM'"):
        args_from_config(json.load(open(REPO / TOY / "tiny.json")))
    env = {"DARE_MEGA_FAMILIES": "toy_qwen3", "PYTHONPATH": str(REPO / "tests/families")}
    hf = tmp_path / "toy"
    made = subprocess.run([sys.executable, "tools/make_tiny_model.py", "--preset", f"{TOY}/tiny.json", "--out", str(hf)],
                          cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert json.load(open(hf / "config.json"))["architectures"] == ["ToyQwen3ForCausalLM"]

    # the SFT steps (one process, one thread) alongside the parity check at TP=2
    sft = start([sys.executable, "-m", "dare_mega.trainer.sft", "--config", "configs/recipes/sft_tiny_sdar_moe.yaml",
                 f"model.hf={hf}", f"run_dir={tmp_path / 'sft'}", "train.steps=2", "train.micro_batches=1",
                 "checkpoint.every=100", "logging.progress=false", "data.synthetic_samples=16"], env)
    spec, out = tmp_path / "cases.json", tmp_path / "results.json"
    spec.write_text(json.dumps([{"hf": str(hf), "layout": {"tp": 2}, "grads": True}]))
    proc = torchrun(2, ["tests/workers/parity_worker.py", str(spec), str(out)], env=env)
    sft = completed(sft)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert result["max_abs_logit_diff"] <= 1e-5 and result["max_abs_logprob_diff"] <= 1e-5, result
    assert abs(result["loss_megatron"] - result["loss_reference"]) <= 1e-5, result
    assert result["max_abs_grad_diff"] <= 1e-5 and result["tensors_compared"] == 2 * 8 + 3, result

    assert sft.returncode == 0, sft.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)
    assert "ToyQwen3ForCausalLM" in sft.stdout and "objective sdar_block" in sft.stdout
