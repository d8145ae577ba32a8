"""The RL loop end to end: the default example learns, layouts agree on a step, code rewards, bad input."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from conftest import REPO, clean_env, completed, free_port, start_torchrun, warm_checkpoint

from dare_mega.rewards import score
from dare_mega.rewards.verifiers import REWARDS

RL_RECIPE = "configs/recipes/rl_tiny_sdar_moe.yaml"


@pytest.mark.distributed
def test_default_example_improves_heldout_accuracy(example_run):
    run_dir, stdout = example_run
    last = stdout.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert set(fields) == {"accuracy_before_rl", "accuracy_after_rl", "heldout"}, last
    before, after = float(fields["accuracy_before_rl"]), float(fields["accuracy_after_rl"])
    assert int(fields["heldout"]) > 0
    assert after > before + 0.05, last  # a real learning signal on held-out prompts
    records = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) >= 10
    wanted = {"reward_mean", "reward_std", "accuracy", "response_length", "kl", "clip_fraction", "rollout_train_gap",
              "tokens_per_s", "time_offload", "time_rollout", "time_reward", "time_logprob", "time_update",
              "time_weight_refresh",
              "weight_version", "router_mismatch", "grad_norm", "loss", "padding"}
    assert wanted <= set(records[0]), wanted - set(records[0])
    assert all(r["weight_version"] == r["step"] for r in records)
    assert all(r["rollout_train_gap"] < 1e-4 for r in records)  # the engine and Megatron agree on log-probs
    assert all(r["router_mismatch"] is not None and r["router_mismatch"] < 0.01 for r in records)
    first, later = records[0]["reward_mean"], sum(r["reward_mean"] for r in records[-10:]) / 10
    assert later > first, (first, later)


@pytest.mark.distributed
def test_llada2_example_runs_the_same_pipeline(tmp_path):
    """examples/rl_llada2_mini.sh: the same pipeline on the tiny LLaDA2-MoE (shortened here: no SFT warm-up, which
    test_default_example runs, and two RL steps; the sigmoid router's
    expert bias stays frozen during RL and the engine routes as the trainer does)."""
    env = clean_env(RUN_DIR=str(tmp_path), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="2", SFT_STEPS="0",
                    RL_STEPS="2")
    proc = subprocess.run(["bash", "examples/rl_llada2_mini.sh", "task.heldout=4", "eval.samples=1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "LLaDA2MoeModelLM" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("accuracy_before_rl=") and last.endswith("heldout=4"), last
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["rollout_train_gap"] < 1e-4 and r["router_mismatch"] < 0.01 for r in records)


@pytest.mark.distributed
@pytest.mark.parametrize("name, architecture, algo", [("rl_llada", "LLaDAModelLM", "trajectory"),
                                                       ("rl_dream", "DreamModel", "d1")])
def test_masked_diffusion_examples_improve_heldout_accuracy(examples, name, architecture, algo):
    """examples/rl_llada.sh and rl_dream.sh as they are (SFT warm-up, then RL on the tiny preset): the SFT loss
    falls, the rows are x_t alone with full attention, the held-out accuracy rises. LLaDA runs the default
    estimator (CJ-GRPO's trajectory replay, exact: the rollout's own log-probs come back), Dream d1 (DARE's first
    MDLM algorithm)."""
    from conftest import EXAMPLES

    assert EXAMPLES[name][1]["ALGO"] == algo
    run_dir, stdout = examples[name]
    assert f"rl: {architecture}" in stdout and f"estimator {algo}" in stdout
    last = stdout.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    before, after = float(fields["accuracy_before_rl"]), float(fields["accuracy_after_rl"])
    assert int(fields["heldout"]) == 64 and after > before + 0.05, last
    sft = [json.loads(line)["loss"] for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    # the masked diffusion SFT loss (sum CE / p over the masked count, DARE's) is noisy step to step: medians
    assert len(sft) == 30 and statistics.median(sft[-10:]) < 0.5 * statistics.median(sft[:5]), sft
    records = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    if algo == "trajectory":  # uncached rollouts (rollout.masked_cache=none in the tiny recipe): exact replay
        assert all(r["rollout_train_gap"] < 1e-4 for r in records)
    first, later = sum(r["reward_mean"] for r in records[:5]) / 5, sum(r["reward_mean"] for r in records[-5:]) / 5
    assert later > first, (first, later)


FILTER_STATS = ("filter_kept_fraction", "filter_rounds", "filter_filled")


def start_rl(nproc: int, run_dir, *overrides):
    args = ["-m", "dare_mega.trainer.rl", "--config", RL_RECIPE, f"run_dir={run_dir}", "logging.progress=false",
            *overrides]
    return start_torchrun(nproc, args)


def rl(nproc: int, run_dir, *overrides, timeout=900):
    return completed(start_rl(nproc, run_dir, *overrides), timeout)


@pytest.mark.distributed
def test_one_step_agrees_across_layouts(example_run, tmp_path):
    """One RL step (rollout, rewards, trajectory estimator, update) on one process equals, in its loss, gradient
    norm and every updated weight, the step at TP=2 x EP=2 (sequence parallel) on 4 processes with routing replay
    on (here the fp32 engine and Megatron choose the same experts, so replaying them is the identity and the
    replayed and free steps must agree), and the step at TP=2 x EP=2 whose rollouts run on the trainer's own
    Megatron shards, with train.offload, full recompute and eval.batch_size=1; all with dynamic sampling. Adam with eps=1 makes the first update smooth in the gradient, so the weights compare the
    gradients, not only their signs."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dare_mega.checkpoint.torch_dist import TorchDistReader

    init = warm_checkpoint(example_run)
    common = [f"model.init={init}", "train.steps=1", "rollout.prompts_per_step=4", "rollout.n=4",
              "task.heldout=4", "eval.samples=1", "optim.lr=0.5", "optim.eps=1.0", "checkpoint.every=1",
              "train.micro_batch_size=1", "train.pack_tokens=64",
              # dynamic sampling: the rounds and the kept groups are the same at every layout
              "rollout.filter=reward_variance", "rollout.filter_max_rounds=2"]
    tp2ep2 = ["parallel.tp=2", "parallel.ep=2"]
    runs = {"tp1": (1, []), "tp2ep2_replay": (4, [*tp2ep2, "algorithm.routing_replay=rollout"]),
            # with the memory savers: optimizer state and gradients off the device during the rollout, every
            # layer recomputed in the backward, the held-out evaluation one request per call
            "tp2ep2_megatron": (4, [*tp2ep2, "rollout.backend=megatron", "train.offload=true", "train.recompute=full",
                                    "eval.batch_size=1"])}
    # the one-process run (one thread) alongside the four-process ones
    started = start_rl(1, tmp_path / "tp1", *common, *runs["tp1"][1])
    said = {}
    for name, (nproc, layout) in runs.items():
        proc = completed(started) if name == "tp1" else rl(nproc, tmp_path / name, *common, *layout)
        assert proc.returncode == 0, proc.stderr[-6000:]
        said[name] = proc.stdout
    one, replayed, shards = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()][0]
                             for n in runs)
    assert one["reward_std"] > 0 and one["grad_norm"] > 0  # the step learns something
    for other in (replayed, shards):
        assert {k: other[k] for k in FILTER_STATS} == {k: one[k] for k in FILTER_STATS}
    assert 0 < one["filter_kept_fraction"] <= 1 and one["filter_rounds"] in (1, 2)
    assert one["router_mismatch"] == 0.0  # without replay the routers already agree
    assert replayed["router_mismatch"] == 0.0  # replayed on every rank's slice
    # rollouts on the trainer's own shards (rollout.backend=megatron) sample the native engine's tokens, and the
    # trainer scores exactly what generated them
    assert shards["rollout_train_gap"] < 1e-6 and shards["router_mismatch"] is None
    assert shards["clip_fraction"] == 0.0  # the first PPO ratio is exactly 1: nothing is clipped
    assert "rollouts on MegatronEngine" in said["tp2ep2_megatron"]
    plan = json.loads((tmp_path / "tp2ep2_megatron" / "plan.json").read_text())  # the plan every launch checks
    assert plan["fits"] and plan["world"] == 4 and plan["parts"]["optimizer_state"] > 0
    # the native engine: one per data-parallel replica, whose tensor-parallel partner receives its completions
    assert "rollouts on NativeEngine, one per data-parallel replica (2 for 4 ranks)" in said["tp2ep2_replay"]
    assert "routing replay rollout" in said["tp2ep2_replay"] and "routing replay off" in said["tp1"]
    # the held-out evaluation, sharded over the two replicas, scores what one process scores
    before = {n: [x for x in said[n].splitlines() if x.startswith("accuracy_before_rl=")][0].split()[0] for n in runs}
    assert len(set(before.values())) == 1, before
    for other in (replayed, shards):
        assert one["reward_mean"] == other["reward_mean"] and one["response_length"] == other["response_length"]
        assert abs(one["loss"] - other["loss"]) <= 1e-5 * max(1.0, abs(one["loss"]))
        assert abs(one["grad_norm"] - other["grad_norm"]) <= 1e-5 * max(1.0, one["grad_norm"])
    readers = {n: TorchDistReader(str(sorted((tmp_path / n / "checkpoints").glob("step_*"))[-1])) for n in runs}
    start = TorchDistReader(str(init))
    keys = [k for k, v in readers["tp1"].metadata.state_dict_metadata.items()
            if not k.startswith("optimizer") and isinstance(v, TensorStorageMetadata)]
    for name in ("tp2ep2_replay", "tp2ep2_megatron"):
        assert keys and set(keys) <= set(readers[name].metadata.state_dict_metadata)
        worst = moved = 0.0
        for key in keys:
            a, b = readers["tp1"].read(key), readers[name].read(key)
            if a.is_floating_point():
                worst = max(worst, float((a.float() - b.float()).abs().max()))
                moved = max(moved, float((a.float() - start.read(key).float()).abs().max()))
        assert moved > 1e-3  # the weights did change
        assert worst <= 1e-5, (name, worst)


# ---- bad input -------------------------------------------------------------------------------------------
def run_cli(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "dare_mega.trainer.rl", "--config", RL_RECIPE,
                           f"run_dir={tmp_path / 'run'}", *overrides], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def test_prompts_without_the_reward_field(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    proc = run_cli(tmp_path, "task.name=file", f"task.train={data}", "task.reward=math", "task.heldout=1")
    assert proc.returncode == 2
    assert "prompts.jsonl" in proc.stderr and "needs field(s) answer" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_algorithm_and_reward(tmp_path):
    proc = run_cli(tmp_path, "algorithm.estimator=grpo")
    assert proc.returncode == 2 and "algorithm.estimator" in proc.stderr and "trajectory" in proc.stderr
    proc = run_cli(tmp_path, "model.preset=tiny-sdar", "algorithm.routing_replay=rollout")  # a dense model
    assert proc.returncode == 2 and "no MoE routers to replay" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(tmp_path, "task.reward=bleu")
    assert proc.returncode == 2 and "reward 'bleu'" in proc.stderr, proc.stderr[-2000:]


def test_what_the_megatron_backend_refuses():
    from dare_mega.config import load_config
    from dare_mega.errors import ConfigError
    from dare_mega.trainer.config import RLConfig

    with pytest.raises(ConfigError, match="already routes with the trainer's own routers"):
        load_config(RLConfig, RL_RECIPE, ["rollout.backend=megatron", "algorithm.routing_replay=rollout"])
    cfg = load_config(RLConfig, RL_RECIPE, ["rollout.backend=megatron"])
    assert cfg.rollout.backend == "megatron" and cfg.rollout.cache  # the block KV cache on the trainer's shards


def test_a_raising_reward_is_logged_and_scored_zero():
    def broken(text, record, settings):
        raise KeyError("expected_output")

    REWARDS["broken"] = broken
    messages = []
    try:
        value = score("broken", "the completion", {"prompt": "the prompt"}, messages.append)
    finally:
        del REWARDS["broken"]
    assert value == 0.0
    assert len(messages) == 1 and "the prompt" in messages[0] and "KeyError" in messages[0]
    assert "the completion" in messages[0]


def test_rewards():
    assert score("math", "so the answer is \\boxed{\\frac{1}{2}}", {"answer": "0.5"}) == 1.0
    assert score("math", "it is 12 apples, then 14", {"answer": "14"}) == 1.0
    assert score("math", "\\boxed{3}", {"answer": "4"}) == 0.0
    assert score("countdown", "(6 - 2) * 5 = 20", {"numbers": [2, 5, 6], "target": 20}) == 1.0
    assert score("countdown", "6 * 5 - 2 * 5", {"numbers": [2, 5, 6], "target": 20}) == 0.0  # 5 used twice
    assert score("countdown", "__import__('os')", {"numbers": [1], "target": 1}) == 0.0
    grid = "1234341221434321"
    assert score("sudoku", " ".join(grid), {"puzzle": "1004300220004001"}) == 1.0
    assert score("sudoku", grid, {"puzzle": "2000000000000000"}) == 0.0  # breaks a given
    assert score("sudoku", grid[:-2] + "13", {"puzzle": "0" * 16}) == 0.0  # not a valid grid


@pytest.mark.parametrize("recipe, preset, world", [
    ("rl_sdar_30b_a3b.yaml", "sdar-30b-a3b-chat", 64), ("rl_llada2_mini.yaml", "llada2.0-mini", 32),
    ("sft_sdar_30b_a3b.yaml", "sdar-30b-a3b-chat", 64),
    *[(f"algorithms/{algorithm}_{family}.yaml", preset, 8) for algorithm in ("trajectory", "bgpo", "ebpo")
      for family, preset in (("sdar", "sdar-8b-chat"), ("llada2", "llada2.0-mini"))],
    *[(f"algorithms/{algorithm}_llada.yaml", "llada-8b-instruct", 8)
      for algorithm in ("trajectory", "bgpo", "d1", "coupled", "spg")],
    ("algorithms/espo_llada.yaml", "llada-8b-instruct", 32),
    *[(f"algorithms/{algorithm}_dream.yaml", "dream-v0-instruct-7b", 8)
      for algorithm in ("trajectory", "bgpo", "d1", "coupled", "spg")],
])
def test_cluster_recipes_fit_their_models(recipe, preset, world):
    """The published recipes load, and their layouts shard the published model on the cluster they name."""
    from dare_mega.config import load_config
    from dare_mega.models.builder import load_model_args
    from dare_mega.models.presets import preset_file
    from dare_mega.models.transformer_config import check_layout
    from dare_mega.parallel.layout import ParallelLayout
    from dare_mega.trainer.config import RLConfig, SFTConfig

    rl = not recipe.startswith("sft_")
    cfg = load_config(RLConfig if rl else SFTConfig, f"{REPO}/configs/recipes/{recipe}", [])
    args = load_model_args(str(preset_file(preset)), cfg.model.mask_token_id, cfg.model.block_size)
    p = cfg.parallel
    layout = ParallelLayout(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp)
    check_layout(args, layout)
    layout.check_world(world)
    if rl:
        assert cfg.rollout.prompts_per_step % (world // (layout.tp * layout.pp)) == 0


# ---- code rewards in the loop ------------------------------------------------------------------------------
def code_prompts(tmp_path):
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add{i}", "tests": f"assert add({i}, 1) == {i + 1}\n"}) + "\n"
                            for i in range(6)))
    return data


def verl_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def verl_rows():
    """Prompts in verl's / DARE's parquet layout: chat messages, data_source, reward_model.ground_truth."""
    rows = []
    for i in range(4):
        rows.append({"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"{i} + 1 = ?"}],
                     "reward_model": {"style": "rule", "ground_truth": str(i + 1)}, "extra_info": {"index": i}})
        cases = json.dumps([{"input": f"{i}\n", "output": f"{i + 1}\n", "testtype": "stdin"}])
        rows.append({"data_source": "livecodebench", "prompt": [{"role": "user", "content": f"print n + 1 ({i})"}],
                     "reward_model": {"style": "rule", "ground_truth": cases}, "extra_info": {"index": i}})
    return rows


def test_verl_layout_records_load_with_their_rewards(tmp_path):
    from dare_mega.config import load_config
    from dare_mega.trainer.config import RLConfig
    from dare_mega.trainer.rl_setup import task_records

    path = verl_parquet(tmp_path / "train.parquet", verl_rows())
    cfg = load_config(RLConfig, RL_RECIPE, ["task.name=file", f"task.train={path}", "task.heldout=2"])
    train, heldout, rewards = task_records(cfg)
    assert rewards == ["code", "math"]
    math_record, code_record = heldout
    assert math_record["_reward"] == "math" and math_record["answer"] == "1"
    assert math_record["prompt"] == [{"role": "user", "content": "0 + 1 = ?"}]
    assert code_record["_reward"] == "code" and code_record["tests"] == [{"input": "0\n", "output": "1\n"}]
    assert code_record["_source"].endswith("train.parquet:row 1")
    from dare_mega.data.records import rl_record

    call = rl_record({"data_source": "taco", "prompt": "p", "_source": "x:row 3", "reward_model": {
        "ground_truth": json.dumps({"fn_name": "f", "inputs": [[1, 2]], "outputs": [[3]]})}})
    assert call["tests"] == "assert f(*[1, 2]) in [[3], 3]\n"
    broken = verl_rows()[:2] + [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "q"}],
                                 "reward_model": {"style": "rule"}, "extra_info": {}}]
    bad = verl_parquet(tmp_path / "bad.parquet", broken)
    with pytest.raises(Exception, match=r"bad.parquet:row 2: reward_model must hold a ground_truth"):
        task_records(load_config(RLConfig, RL_RECIPE, ["task.name=file", f"task.train={bad}", "task.heldout=1"]))
    unknown = verl_parquet(tmp_path / "unknown.parquet", [{**verl_rows()[0], "data_source": "web_qa"}] * 3)
    with pytest.raises(Exception, match=r"unknown.parquet:row 0: data_source='web_qa' names no reward"):
        task_records(load_config(RLConfig, RL_RECIPE, ["task.name=file", f"task.train={unknown}", "task.heldout=1"]))


def test_a_code_reward_runs_in_the_loop(tmp_path):
    """One RL step on verl-layout prompts mixing math and code: each kind scored by its own reward (code in the
    jail), the per-test pass rate logged, the estimator's meaning in the start-up line."""
    data = verl_parquet(tmp_path / "mixed.parquet", verl_rows())
    proc = run_cli(tmp_path, "task.name=file", f"task.train={data}", "task.heldout=2", "train.steps=1",
                   "rollout.prompts_per_step=2", "rollout.n=2", "eval.samples=1", "logging.progress=false",
                   "checkpoint.every=100")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "reward code: nsjail" in proc.stdout and "reward math" in proc.stdout
    assert "trajectory replay: each token's log-prob" in proc.stdout and "likelihood raw" in proc.stdout
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tests_passed"] is None or 0.0 <= record["tests_passed"] <= 1.0
    assert record["reward_timeouts"] == 0.0 and record["accuracy"] is None


def test_code_rewards_without_isolation_are_refused_at_start_up(tmp_path):
    data = code_prompts(tmp_path)
    proc = run_cli(tmp_path, "task.name=file", f"task.train={data}", "task.reward=code", "task.heldout=1",
                   "reward.code.nsjail=/bin/false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "code rewards refused" in proc.stderr and "the jail did not start" in proc.stderr
    assert "reward.code.allow_unisolated=true" in proc.stderr and "--cap-add SYS_ADMIN" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any model, checkpoint or log
