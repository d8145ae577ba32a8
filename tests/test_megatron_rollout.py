"""rollout.backend=megatron: block-diffusion decoding on the trainer's own Megatron shards, at any layout.

Every layout must give the native engine's tokens, step maps and log-probs on the same weights (float32;
greedy and seeded sampling; with and without the block KV cache on either side), with replicas decoding uneven
shares of the prompts (so that one replica idles in the other's expert-parallel forwards). The same shards also
replay the completions from their tokens alone (rollout/replay.py, what the trainer does with SGLang's
responses): the native engine's step maps and log-probs again."""

import dataclasses
import json

import pytest
from conftest import completed, start_torchrun, torchrun

from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.types import SamplingParams

PROMPTS = [[5], [11, 12, 13, 14, 15], [7] * 9, list(range(30, 56)), [40, 41, 42]]
PARAMS = [
    dict(max_new_tokens=8, temperature=0.0, stop_token_ids=()),
    dict(max_new_tokens=10, temperature=1.0, top_p=0.9, steps=3, stop_token_ids=()),
    # stops on a sampled stop token (a fifth of the vocabulary, so that some requests stop early)
    dict(max_new_tokens=12, temperature=1.0, policy="low_confidence_dynamic", threshold=0.5,
         stop_token_ids=list(range(100, 200))),
]
FAMILIES = ("sdar", "sdar_moe", "llada2_moe")


def decode(tmp_path, nproc: int, cases: list[dict], tiny_dir, native: dict) -> list[dict]:
    """The worker's results for `cases`; meanwhile this process decodes what the native engine expects."""
    spec, out = tmp_path / f"spec-{nproc}.json", tmp_path / f"out-{nproc}.json"
    spec.write_text(json.dumps({"cases": cases, "prompts": PROMPTS}))
    started = start_torchrun(nproc, ["tests/workers/megatron_rollout_worker.py", str(spec), str(out)])
    for case in cases:
        for fields in case["params"]:
            for cache in (True, False):
                expected(tiny_dir, case["hf"], fields, cache, native)
    proc = completed(started, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def expected(tiny_dir, hf: str, fields: dict, cache: bool, native: dict):
    """The native engine's completions of PROMPTS for one checkpoint, sampling parameters and cache setting,
    decoded once (seeded: the same every time) and kept in `native`."""
    family = next(f for f in FAMILIES if tiny_dir[f] == hf)
    key = (family, json.dumps(fields, sort_keys=True), cache)
    if key not in native:
        if family not in native:
            native[family] = NativeEngine.from_pretrained(tiny_dir[family])
        params = SamplingParams(**{**fields, "seeds": tuple(1000 + i for i in range(len(PROMPTS)))})
        native[key] = native[family].generate(PROMPTS, params, cache=cache)
    return native[key]


def check_against_native(results, tiny_dir, native: dict | None = None):
    native_runs = {} if native is None else native
    for result in results:
        family = next(f for f in FAMILIES if tiny_dir[f] == result["hf"])
        for cache in (True, False):
            native = expected(tiny_dir, result["hf"], result["params"], cache, native_runs)
            name = f"{family} {result['layout']} {result['params']} (cache={result['cache']}, native cache={cache})"
            assert len(result["completions"]) == len(native), name
            for mine, theirs in zip(result["completions"], native):
                assert mine["generated_ids"] == theirs.generated_ids, name
                assert mine["completion_ids"] == theirs.completion_ids, name
                assert mine["generated_reveal_steps"] == theirs.generated_reveal_steps, name
                assert mine["finish_reason"] == theirs.finish_reason, name
                gap = max(abs(a - b) for a, b in zip(mine["generated_logprobs"], theirs.generated_logprobs))
                assert gap <= 1e-5, f"{name}: log-probs differ by {gap:.2e}"
                assert mine["forwards"] == theirs.forwards or cache != result["cache"], name  # the same loop
            for replayed, theirs in zip(result.get("replayed", ()), native):
                assert replayed["generated_ids"] == theirs.generated_ids, f"{name}, replayed"
                assert replayed["generated_reveal_steps"] == theirs.generated_reveal_steps, f"{name}, replayed"
                gap = max(abs(a - b) for a, b in zip(replayed["generated_logprobs"], theirs.generated_logprobs))
                assert gap <= 1e-5, f"{name}, replayed: log-probs differ by {gap:.2e}"
            assert result.get("replay_mismatched", 0) == 0, name


def test_one_process_matches_the_native_engine(tiny_dir, world1):
    """TP=1, in this process (the worker's code path without torchrun)."""
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout
    from dare_mega.rollout.megatron_engine import MegatronEngine
    from dare_mega.rollout.replay import replay

    results = []
    for family in FAMILIES:
        chunks, args = build_from_hf(tiny_dir[family], ParallelLayout())
        engine = MegatronEngine(Runner(chunks, args))
        for fields in PARAMS:
            params = SamplingParams(**{**fields, "seeds": tuple(1000 + i for i in range(len(PROMPTS)))})
            for cache in (True, False):
                completions = engine.generate(PROMPTS, params, cache=cache)
                results.append({"hf": tiny_dir[family], "layout": {}, "params": fields, "cache": cache,
                                "completions": [c.to_dict() for c in completions]})
            bare = [dataclasses.replace(c, logprobs=[], reveal_steps=[], generated_ids=[], generated_logprobs=[],
                                        generated_reveal_steps=[]) for c in completions]
            replayed, stats = replay(engine, bare, params, logits_bytes=1)  # one row per forward
            results[-1].update(replayed=[c.to_dict() for c in replayed], replay_mismatched=stats.mismatched)
    check_against_native(results, tiny_dir)
    assert any(c["finish_reason"] == "stop" for r in results for c in r["completions"])  # EOS handling is seen


@pytest.mark.distributed
def test_pipeline_stages_match_the_native_engine(tiny_dir, tmp_path):
    """PP=2 for every family, and PP=2 with two virtual stages each (one layer per chunk) for LLaDA2-MoE."""
    cases = [{"hf": tiny_dir[f], "layout": {"pp": 2}, "params": PARAMS} for f in FAMILIES]
    cases.append({"hf": tiny_dir["llada2_moe"], "layout": {"pp": 2, "vpp": 2}, "params": PARAMS})
    native = {}
    results = decode(tmp_path, 2, cases, tiny_dir, native)
    assert sum(r["layout"].get("vpp") == 2 for r in results) == 2 * len(PARAMS)
    check_against_native(results, tiny_dir, native)


@pytest.mark.distributed
def test_tensor_expert_and_data_parallel_match_the_native_engine(tiny_dir, tmp_path):
    """TP=2 (sequence parallel) x EP=2 on 4 ranks: two replicas decode 3 and 2 of the prompts."""
    cases = [{"hf": tiny_dir["sdar"], "layout": {"tp": 2}, "params": PARAMS}]
    cases += [{"hf": tiny_dir[f], "layout": {"tp": 2, "ep": 2}, "params": PARAMS} for f in ("sdar_moe", "llada2_moe")]
    native = {}
    check_against_native(decode(tmp_path, 4, cases, tiny_dir, native), tiny_dir, native)


@pytest.mark.distributed
def test_the_cli_writes_what_the_native_cli_writes(tiny_dir, tmp_path):
    """`torchrun -m dare_mega.rollout --backend megatron` at EP=2 (two replicas; batches of 2 over 5 prompts,
    so one replica has nothing in the last round), both with the block KV cache, writes the native CLI's JSON
    lines, in the prompts' order."""
    import subprocess
    import sys

    from conftest import REPO, clean_env

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    common = ["--hf", tiny_dir["sdar_moe"], "--prompts", str(prompts), "--max-new-tokens", "8", "--batch-size", "2",
              "--temperature", "1.0", "--seed", "3"]
    proc = torchrun(2, ["-m", "dare_mega.rollout", "--backend", "megatron", "--ep", "2", *common,
                        "--json", str(tmp_path / "megatron.jsonl")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "summary: 5 completions" in proc.stdout
    native = subprocess.run([sys.executable, "-m", "dare_mega.rollout", *common, "--json", str(tmp_path / "native.jsonl")],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert native.returncode == 0, native.stderr[-3000:]
    ours, theirs = ([json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                    for n in ("megatron", "native"))
    assert len(ours) == len(theirs) == len(PROMPTS)
    for a, b in zip(ours, theirs):
        assert set(a) == set(b)
        for key in a:
            if key.endswith("logprobs"):
                assert max(abs(x - y) for x, y in zip(a[key], b[key])) <= 1e-5
            else:
                assert a[key] == b[key], key


@pytest.mark.distributed
def test_every_estimator_steps_alike_at_tp2_ep2_and_in_one_process(tiny_dir, world1, tmp_path):
    """Every built-in estimator: rollouts on the trainer's own shards (block KV cache, sampled), one policy update;
    at TP=2 (sequence parallel) x EP=2 on 4 ranks, two replicas with 1 and 2 of the prompts, the loss, gradient
    norm, response tokens and every updated weight equal those of one process."""
    import importlib
    import sys

    import torch
    from conftest import REPO

    sys.path.insert(0, str(REPO / "tests" / "workers"))
    worker = importlib.import_module("estimator_step_worker")
    spec = {"hf": tiny_dir["sdar_moe"], "prompts": [[5], [11, 12, 13, 14, 15], [7] * 6]}
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    # the four ranks run while this process takes its own steps
    spec_file, out = tmp_path / "spec.json", tmp_path / "names.json"
    spec_file.write_text(json.dumps({**spec, "layout": {"tp": 2, "ep": 2}, "out_dir": str(tmp_path / "four")}))
    started = start_torchrun(4, ["tests/workers/estimator_step_worker.py", str(spec_file), str(out)])
    names = worker.run_estimators({**spec, "layout": {}, "out_dir": str(tmp_path / "one")})
    proc = completed(started, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    assert json.loads(out.read_text()) == names and len(names) == 7
    start = NativeEngine.from_pretrained(tiny_dir["sdar_moe"], tokenizer=False)
    for name in names:
        one, four = (torch.load(tmp_path / d / f"{name}.pt") for d in ("one", "four"))
        assert one["tokens"] == four["tokens"], name
        assert one["grad_norm"] > 0 and abs(one["grad_norm"] - four["grad_norm"]) <= 1e-5 * max(1, one["grad_norm"]), name
        assert abs(one["loss"] - four["loss"]) <= 1e-5 * max(1.0, abs(one["loss"])), name
        assert set(one["weights"]) == set(four["weights"]), name
        worst = max(float((one["weights"][n] - four["weights"][n]).abs().max()) for n in one["weights"])
        assert worst <= 1e-5, (name, worst)
        moved = one["weights"]["model.embed_tokens.weight"] - start.model.weights["embedding.word_embeddings.weight"]
        assert float(moved.abs().max()) > 1e-4, name  # the update did move the weights
