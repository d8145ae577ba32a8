"""Benchmarks read from a local directory, in the files they ship as: never downloaded at run time.

Each benchmark: where its file lives under the data directory, how a line becomes a record (a `prompt` and
what its reward needs), the reward that scores a completion (the same functions RL uses: math-verify for
answers, the code sandbox for programs) and a default generation length.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from dare_mega.errors import ConfigError


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: str  # relative to the data directory, as the dataset ships
    read: Callable[[dict], dict]
    reward: str
    max_new_tokens: int


def _gsm8k(line: dict) -> dict:
    # GSM8K answers end with "#### <number>" (commas as thousands separators)
    final = line["answer"].split("####")[-1].strip().replace(",", "")
    return {"prompt": line["question"] + "\nPut the final answer in \\boxed{}.", "answer": final}


def _math500(line: dict) -> dict:
    return {"prompt": line["problem"] + "\nPut the final answer in \\boxed{}.", "answer": line["answer"]}


def _humaneval(line: dict) -> dict:
    return {"prompt": "Complete the following Python function.\n```python\n" + line["prompt"] + "```",
            "prefix": line["prompt"], "tests": line["test"] + f"\ncheck({line['entry_point']})\n",
            "id": line["task_id"]}


def _mbpp(line: dict) -> dict:
    tests = "\n".join(line["test_list"])
    return {"prompt": f"{line['text']}\nYour code should pass these tests:\n{tests}\nWrite the function in a "
                      f"```python``` block.", "tests": tests, "id": str(line.get("task_id", ""))}


BENCHMARKS = {b.name: b for b in [
    Benchmark("gsm8k", "gsm8k/test.jsonl", _gsm8k, "math", 512),
    Benchmark("math500", "math500/test.jsonl", _math500, "math", 1024),
    Benchmark("humaneval", "humaneval/HumanEval.jsonl", _humaneval, "humaneval", 512),
    Benchmark("mbpp", "mbpp/mbpp.jsonl", _mbpp, "code", 512),
]}


def load(name: str, data_dir: str, limit: int | None = None) -> list[dict]:
    """The benchmark's records from DATA_DIR/<its path>; a missing file names the path it expects."""
    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    bench = BENCHMARKS[name]
    path = os.path.join(data_dir, bench.path)
    if not os.path.isfile(path):
        raise ConfigError(f"{name}: expected the dataset at {path} (as it ships: {bench.path} under --data); "
                          f"datasets are never downloaded at run time")
    records = []
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                records.append({**bench.read(json.loads(raw)), "_source": f"{path}:{number}"})
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{number}: not a {name} line ({type(e).__name__}: {e})") from None
            if limit and len(records) >= limit:
                break
    return records


def humaneval_program(text: str, record: dict) -> str:
    """The program HumanEval runs: a fenced block if the model wrote one (a whole function), else the prompt's
    signature followed by the completion (a function body)."""
    blocks = re.findall(r"```(?:python)?\n(.*?)```", text, flags=re.S)
    body = blocks[-1] if blocks else record["prefix"] + text
    return body + "\n\n" + record["tests"]
