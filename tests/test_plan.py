"""The memory plan (trainer/memory_plan.py, `python -m dare_mega.plan`): its bytes against the trainer's own
tensors, its activation estimate against what autograd keeps, its verdict on every shipped recipe, the
trainers' refusal and the override."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_json_worker, saved_activation_bytes

from dare_mega.config import load_config
from dare_mega.errors import ConfigError
from dare_mega.trainer.config import RLConfig, SFTConfig

RECIPES = sorted((REPO / "configs" / "recipes").rglob("*.yaml"))
CLUSTER = re.compile(r"^# cluster: (\d+) node\(s\) x (\d+) GPU\(s\) of (\d+(?:\.\d+)?) GiB", re.M)


def test_planned_bytes_equal_the_trainers_tensors_on_every_rank(tiny_dir, tmp_path):
    """Parameters (DDP's padded buffers and the routers' fp32 buffers), fp32 gradient buffers and each rank's
    distributed-optimizer shard, at TP=2 x EP=2 (dp 2, expert dp 2), PP=2 (dp 2) and PP=2 x VPP=2."""
    cases = [{"hf": tiny_dir["sdar_moe"], "layout": {"tp": 2, "ep": 2}, "dtype": "bfloat16"},
             {"hf": tiny_dir["llada2_moe"], "layout": {"pp": 2}, "dtype": "float32"},
             {"hf": tiny_dir["sdar"], "layout": {"pp": 2, "vpp": 2}, "dtype": "bfloat16"}]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    results = run_json_worker(4, ["tests/workers/plan_worker.py", str(spec)], tmp_path / "out.json")
    assert len(results) == len(cases)
    for case in results:
        shards = set()
        for rank in case["ranks"]:
            assert rank["planned"] == rank["measured"], (case["layout"], rank)
            assert all(v > 0 for v in rank["measured"].values())
            shards.add(rank["measured"]["optimizer_state"])
        assert len(case["ranks"]) == 4


@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
def test_activation_estimate_is_within_fifteen_percent_of_what_autograd_keeps(tiny_dir, world1, family):
    from dare_mega.algorithms.sft import objective, sft_batch
    from dare_mega.data.sft import Sample, pack
    from dare_mega.models.builder import build_from_hf
    from dare_mega.parallel import ParallelLayout
    from dare_mega.trainer.memory_plan import micro_batch_activations

    chunks, args = build_from_hf(tiny_dir[family], ParallelLayout())
    model = chunks[0]
    block = args.diffusion.block_size
    rows, _ = pack([Sample([5 + (7 * i) % 200 for i in range(60)], prompt_len=12)], budget=64)
    batch = sft_batch(rows, objective("sdar_block", args.family), args.diffusion.mask_token_id, block,
                      [torch.Generator().manual_seed(0)])
    def forward():
        logits = model(batch.input_ids, batch.position_ids, batch.mask)
        torch.log_softmax(logits.float(), dim=-1)

    measured = saved_activation_bytes(model, forward)
    layers, logit_bytes = micro_batch_activations(args, ParallelLayout(), range(args.num_layers),
                                                  batch.input_ids.numel(), 4, "none", True, attention="sdpa")
    planned = layers + logit_bytes
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


def _cluster(path: Path):
    match = CLUSTER.search(path.read_text())
    assert match, f"{path}: its header must document the cluster it is for ('# cluster: N node(s) x G GPU(s) of M GiB')"
    return match.group(1), match.group(2), match.group(3)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs" / "recipes")))
def test_every_shipped_recipe_fits_the_cluster_its_header_documents(recipe, capsys):
    from dare_mega.plan import main

    nodes, gpus, memory = _cluster(recipe)
    status = main(["--config", str(recipe), "--nodes", nodes, "--gpus-per-node", gpus, "--gpu-memory-gib", memory])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "fits:" in out
    for part in ("parameters", "gradients", "optimizer_state", "activations", "peak train"):
        assert part in out
    if "rl_" in recipe.name or recipe.parent.name == "algorithms":
        for part in ("kv_cache", "engine_weights", "comm_buffers", "peak rollout", "peak sync"):
            assert part in out


def test_the_plan_says_when_a_recipe_does_not_fit(capsys):
    from dare_mega.plan import main

    recipe = str(REPO / "configs" / "recipes" / "rl_sdar_30b_a3b.yaml")
    # the recipe's own layout, without recompute, on 40 GiB GPUs: the train phase overflows
    status = main(["--config", recipe, "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gib", "40",
                   "train.recompute=none"])
    out = capsys.readouterr().out
    assert status == 1
    assert "does NOT fit: the train phase peaks at" in out and "activations" in out
    # offload shows in the rollout phase: only the parameters of the trainer stay
    main(["--config", recipe, "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    rollout = next(line for line in out.splitlines() if line.startswith("peak rollout"))
    assert "optimizer_state" not in rollout and "gradients" not in rollout and "parameters" in rollout
    # a layout the world cannot hold, or a cluster that is no cluster, is named
    assert main(["--config", recipe, "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gib", "80"]) == 2
    assert main(["--config", recipe, "--nodes", "0", "--gpus-per-node", "8", "--gpu-memory-gib", "80"]) == 2
    assert main(["--config", recipe, "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gib", "80",
                 "plan.reserved_gib=-1"]) == 2
    err = capsys.readouterr().err
    assert "parallel layout" in err and "--nodes 0" in err and "plan.reserved_gib=-1" in err


def test_offload_and_recompute_lower_the_phases_they_should(tiny_dir):
    from dare_mega.models.builder import load_model_args
    from dare_mega.trainer.memory_plan import plan

    args = load_model_args(tiny_dir["sdar_moe"])
    base = load_config(RLConfig, None, ["train.pack_tokens=256"])
    lean = load_config(RLConfig, None, ["train.pack_tokens=256", "train.offload=true", "train.recompute=full"])
    a, b = plan(base, args, 1, 2**40, rl=True), plan(lean, args, 1, 2**40, rl=True)
    assert a.peak("rollout") - b.peak("rollout") == a.parts["gradients"] + a.parts["optimizer_state"]
    assert b.parts["activations"] < a.parts["activations"] / 2
    assert a.peak("sync") == b.peak("sync")


def test_the_replay_of_sglang_rollouts_is_counted_within_its_logits_budget(tiny_dir):
    """rollout.backend=sglang with the trajectory estimator: the replay's forwards (rollout/replay.py) gather the
    full-vocabulary logits of rows that stay under sglang.replay_logits_mb, plus the rows' own output."""
    from dare_mega.models.builder import load_model_args
    from dare_mega.trainer.memory_plan import canvas, plan, rollout_rows

    args = load_model_args(tiny_dir["sdar_moe"])
    common = ["rollout.backend=sglang", "sglang.urls=[http://x:1]", "train.pack_tokens=256", "model.dtype=float32"]
    replayed = load_config(RLConfig, None, [*common, "algorithm.estimator=trajectory", "sglang.replay_logits_mb=1"])
    plain = load_config(RLConfig, None, [*common, "algorithm.estimator=d1"])
    got = plan(replayed, args, 1, 2**40, rl=True).parts["rollout_logits"]
    assert plan(plain, args, 1, 2**40, rl=True).parts["rollout_logits"] == 0
    length = canvas(replayed, replayed.plan.prompt_tokens, args.diffusion.block_size)
    rows = min(rollout_rows(replayed, 1), max(1, 2**20 // (length * args.vocab_size * 4)))
    assert rows * length * args.vocab_size * 4 <= 2**20 or rows == 1
    assert got == rows * length * args.vocab_size * 4 + rows * 2 * length * args.vocab_size * 4


def test_the_trainers_refuse_a_plan_that_does_not_fit_before_building_anything(tmp_path, monkeypatch):
    from dare_mega.trainer import rl, sft

    def no_groups(*_, **__):
        raise AssertionError("the plan must refuse before any process group exists")

    monkeypatch.setattr("dare_mega.parallel.init_distributed", no_groups)
    cfg = load_config(SFTConfig, str(REPO / "configs/recipes/sft_tiny_sdar_moe.yaml"),
                      [f"run_dir={tmp_path}/sft", "plan.gpu_memory_gib=4.001", "plan.reserved_gib=4"])
    with pytest.raises(ConfigError, match=r"memory plan \(1 GPUs\): does NOT fit: the train phase peaks at .* "
                                          r"against 1\.0\d MiB usable .*plan\.override=true"):
        sft.run(cfg)
    cfg = load_config(RLConfig, str(REPO / "configs/recipes/rl_tiny_sdar_moe.yaml"),
                      [f"run_dir={tmp_path}/rl", "plan.gpu_memory_gib=4.001", "plan.reserved_gib=4"])
    with pytest.raises(ConfigError, match=r"memory plan \(1 GPUs\): does NOT fit: the (rollout|train|sync) phase "
                                          r"peaks at .*engine_weights .*plan\.override=true"):
        rl.run(cfg)


def test_plan_override_starts_anyway_and_says_so(tmp_path, capsys):
    from dare_mega.models.builder import load_model_args
    from dare_mega.trainer.setup import check_plan, ensure_model_dir

    cfg = load_config(SFTConfig, str(REPO / "configs/recipes/sft_tiny_sdar_moe.yaml"),
                      [f"run_dir={tmp_path}", "plan.gpu_memory_gib=4.001", "plan.reserved_gib=4",
                       "plan.override=true"])
    record = check_plan(cfg, load_model_args(ensure_model_dir(cfg)), 1, rl=False)
    assert record["override"] is True and record["fits"] is False
    assert "WARNING plan.override=true: starting although the memory plan says does NOT fit" in capsys.readouterr().err
    assert json.loads((tmp_path / "plan.json").read_text())["override"] is True
    cfg.plan.override = False
    cfg.plan.gpu_memory_gib = 80
    assert check_plan(cfg, load_model_args(ensure_model_dir(cfg)), 1, rl=False)["override"] is False
