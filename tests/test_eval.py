"""Evaluation on local benchmark files: readers, scoring, the CLI, and clear errors for missing datasets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, clean_env

from dare_mega.errors import ConfigError
from dare_mega.eval.benchmarks import load
from dare_mega.rewards import score

GSM8K = [{"question": "Tom has 1,200 apples and buys 34 more. How many now?", "answer": "1200+34 = 1234\n#### 1,234"},
         {"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"}]
HUMANEVAL = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
              "canonical_solution": "    return a + b\n", "entry_point": "add",
              "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}]


def write(data_dir, relative: str, lines: list[dict]) -> None:
    path = data_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_readers_and_scoring(tmp_path):
    write(tmp_path, "gsm8k/test.jsonl", GSM8K)
    write(tmp_path, "humaneval/HumanEval.jsonl", HUMANEVAL)
    gsm8k = load("gsm8k", str(tmp_path))
    assert [r["answer"] for r in gsm8k] == ["1234", "42"] and gsm8k[0]["_source"].endswith("test.jsonl:1")
    assert score("math", "so the answer is \\boxed{1234}", gsm8k[0]) == 1.0
    assert score("math", "so the answer is \\boxed{1243}", gsm8k[0]) == 0.0
    assert score("math", "6 times 7 is 42", gsm8k[1]) == 1.0  # the last number when nothing is boxed
    (task,) = load("humaneval", str(tmp_path))
    assert score("humaneval", "    return a + b\n", task) == 1.0  # a body after the prompt's signature
    assert score("humaneval", "```python\ndef add(a, b):\n    return a + b\n```", task) == 1.0  # a whole function
    assert score("humaneval", "    return a - b\n", task) == 0.0
    assert score("humaneval", "    while True: pass\n", task) == 0.0  # stopped by the sandbox's time limit


def test_missing_or_malformed_datasets_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"gsm8k: expected the dataset at .*gsm8k/test.jsonl .*never downloaded"):
        load("gsm8k", str(tmp_path))
    write(tmp_path, "gsm8k/test.jsonl", [{"question": "q"}])
    with pytest.raises(ConfigError, match=r"test.jsonl:1: not a gsm8k item \(KeyError"):
        load("gsm8k", str(tmp_path))
    with pytest.raises(ConfigError, match="benchmark 'gsm9k'; known: aime2024, .*gsm8k, hellaswag, humaneval"):
        load("gsm9k", str(tmp_path))
    with pytest.raises(ConfigError, match=r"mmlu: expected a folder of per-subject files at .*mmlu/test"):
        load("mmlu", str(tmp_path))


def test_cli_scores_every_item_and_checks_data_first(tiny_dir, tmp_path):
    write(tmp_path / "data", "gsm8k/test.jsonl", GSM8K)
    write(tmp_path / "data", "humaneval/HumanEval.jsonl", HUMANEVAL)
    command = [sys.executable, "-m", "dare_mega.eval", "--harness", "native", "--hf", tiny_dir["sdar_moe"],
               "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "out"), "--max-new-tokens", "8"]
    missing = subprocess.run([*command, "--tasks", "gsm8k,mbpp"], cwd=REPO, env=clean_env(), capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and "mbpp: expected the dataset at" in missing.stderr
    assert not (tmp_path / "out").exists()  # refused before the model was loaded or anything written
    done = subprocess.run([*command, "--tasks", "gsm8k,humaneval"], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert set(scores) == {"gsm8k", "humaneval"}
    for task, records in (("gsm8k", load("gsm8k", str(tmp_path / "data"))),
                          ("humaneval", load("humaneval", str(tmp_path / "data")))):
        items = [json.loads(x) for x in (tmp_path / "out" / f"{task}.jsonl").read_text().splitlines()]
        assert len(items) == len(records)
        reward = "math" if task == "gsm8k" else "humaneval"
        assert [i["score"] for i in items] == [score(reward, i["completion"], r) for i, r in zip(items, records)]
        assert scores[task] == sum(i["score"] for i in items) / len(items)


@pytest.mark.distributed
def test_rl_loop_scores_benchmarks_every_n_steps(tmp_path):
    """eval.tasks: the RL loop scores local benchmark files every eval.every steps and logs bench_<task>."""
    from conftest import completed, start_torchrun, torchrun

    write(tmp_path / "data", "gsm8k/test.jsonl", GSM8K)
    common = ["-m", "dare_mega.trainer.rl", "--config", "configs/recipes/rl_tiny_sdar_moe.yaml", "task.heldout=2",
              "eval.samples=1", "rollout.prompts_per_step=2", "rollout.n=2", "logging.progress=false",
              "checkpoint.every=1000", "eval.every=1", "eval.max_new_tokens=4", "train.steps=2"]
    # the refused run alongside the one that trains (one process, one thread each)
    missing = start_torchrun(1, [*common, f"run_dir={tmp_path / 'x'}", "eval.tasks=[humaneval]",
                                 f"eval.data={tmp_path / 'data'}"])
    proc = torchrun(1, [*common, f"run_dir={tmp_path / 'run'}", "eval.tasks=[gsm8k]", f"eval.data={tmp_path / 'data'}"],
                    timeout=600)
    missing = completed(missing, timeout=300)
    assert missing.returncode != 0 and "humaneval: expected the dataset at" in missing.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(0.0 <= s["bench_gsm8k"] <= 1.0 for s in steps)


def test_cli_refuses_code_benchmarks_without_isolation_unless_told(tiny_dir, tmp_path):
    write(tmp_path / "data", "humaneval/HumanEval.jsonl", HUMANEVAL)
    command = [sys.executable, "-m", "dare_mega.eval", "--harness", "native", "--hf", tiny_dir["sdar_moe"],
               "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--max-new-tokens", "4",
               "--tasks", "humaneval", "--reward", "code.nsjail=/bin/false"]
    refused = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "code rewards refused" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # before the model was loaded
    allowed = subprocess.run([*command, "--reward", "code.allow_unisolated=true"], cwd=REPO, env=clean_env(),
                             capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "WARNING: reward.code.allow_unisolated=true" in allowed.stderr and "UNISOLATED" in allowed.stdout
    assert "humaneval" in json.loads((tmp_path / "out" / "scores.json").read_text())
    bad = subprocess.run([*command[:-2], "--reward", "code.wall_seconds=0"], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "reward.code.wall_seconds=0" in bad.stderr
