"""Records from JSONL or Parquet (one file or a directory), and the built-in synthetic set.

SFT: {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]} whose last message is the
response (key names configurable). RL: {"prompt": ..., <the reward's fields>}, or verl's / DARE's layout
(`rl_record`). JSONL is read line by line so that a malformed line is reported with its file and line number;
Parquet goes through Hugging Face `datasets` from the local path, each row named by its file and row number.
"""

from __future__ import annotations

import json
import os
import random

from dare_mega.errors import ConfigError


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".json", ".parquet")))
        if not files:
            raise ConfigError(f"{path}: no .jsonl or .parquet files in this directory")
        return files
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such data file")
    return [path]


def read_records(path: str) -> list[dict]:
    records: list[dict] = []
    for file in _files(path):
        if file.endswith(".parquet"):
            from datasets import load_dataset

            rows = load_dataset("parquet", data_files=file, split="train")
            records.extend({**dict(r), "_source": f"{file}:row {i}"} for i, r in enumerate(rows))
            continue
        with open(file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{file}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from e
                if not isinstance(record, dict):
                    raise ConfigError(f"{file}:{number}: a record must be a JSON object, got {type(record).__name__}")
                record["_source"] = f"{file}:{number}"
                records.append(record)
    if not records:
        raise ConfigError(f"{path}: the dataset is empty")
    return records


def synthetic_records(count: int, seed: int = 0) -> list[dict]:
    """A small learnable task that needs no download: repeat a word three times."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    records = []
    for _ in range(count):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
        records.append({"prompt": f"Repeat three times: {word}", "response": " ".join([word] * 3)})
    return records


# verl's data_source names -> the reward that scores them (the first pattern found in the lower-cased name)
SOURCE_REWARDS = (("humaneval", "code"), ("mbpp", "code"), ("livecodebench", "code"), ("lcb", "code"),
                  ("taco", "code"), ("primeintellect", "code"), ("apps", "code"), ("codecontests", "code"),
                  ("kodcode", "code"), ("code", "code"), ("countdown", "countdown"), ("sudoku", "sudoku"),
                  ("gsm8k", "math"), ("math", "math"), ("aime", "math"), ("amc", "math"), ("numina", "math"),
                  ("deepscaler", "math"), ("olympiad", "math"))


def _reward_for(record: dict, where: str) -> str:
    task = (record.get("extra_info") or {}).get("task") if isinstance(record.get("extra_info"), dict) else None
    if task in ("math", "code", "countdown", "sudoku"):  # DARE's DLLMRewardManager dispatches on this first
        return task
    source = str(record.get("data_source", "")).lower()
    for pattern, reward in SOURCE_REWARDS:
        if pattern in source:
            return reward
    raise ConfigError(f"{where}: data_source={record.get('data_source')!r} names no reward this project knows "
                      f"(math, countdown, sudoku, code data sources); set task.reward to choose one")


def _code_tests(truth, where: str):
    """rllm / verl code ground truth -> the code reward's tests: assert code, or standard-input cases."""
    if isinstance(truth, str):
        try:
            truth = json.loads(truth)
        except ValueError:
            return truth  # assert code as it is
    if isinstance(truth, dict) and "inputs" in truth and "outputs" in truth:
        inputs, outputs = truth["inputs"], truth["outputs"]
        if len(inputs) != len(outputs):
            raise ConfigError(f"{where}: ground_truth has {len(inputs)} inputs for {len(outputs)} outputs")
        if truth.get("fn_name"):  # call-based (APPS / TACO): each input is the argument list
            name = truth["fn_name"]
            lines = []
            for args, expected in zip(inputs, outputs):
                options = [expected] + ([expected[0]] if isinstance(expected, list) and len(expected) == 1 else [])
                lines.append(f"assert {name}(*{args!r}) in {options!r}")
            return "\n".join(lines) + "\n"
        return [{"input": str(i), "output": str(o)} for i, o in zip(inputs, outputs)]
    if isinstance(truth, list) and all(isinstance(c, dict) and "input" in c and "output" in c for c in truth):
        return [{"input": str(c["input"]), "output": str(c["output"])} for c in truth]
    raise ConfigError(f"{where}: code ground_truth must be assert code, a list of {{input, output}} cases or "
                      f"{{inputs, outputs[, fn_name]}}, got {type(truth).__name__}")


def rl_record(record: dict, reward: str | None = None) -> dict:
    """An RL prompt record. verl's / DARE's parquet layout ({"prompt": [chat messages], "data_source",
    "reward_model": {"ground_truth"}, "extra_info"}) becomes {"prompt": messages, "_reward": name, <fields>}
    with the reward chosen from extra_info.task or data_source (or `reward`, task.reward); other records pass
    through as they are."""
    where = record.get("_source", "record")
    if "reward_model" not in record:
        return record
    model = record["reward_model"]
    if not isinstance(model, dict) or model.get("ground_truth") is None:
        raise ConfigError(f"{where}: reward_model must hold a ground_truth")
    name = reward or _reward_for(record, where)
    truth = model["ground_truth"]
    out = {"prompt": record.get("prompt"), "_reward": name, "_source": where,
           "data_source": record.get("data_source")}
    if isinstance(out["prompt"], list):
        out["prompt"] = [dict(m) for m in out["prompt"]]
        if not all(isinstance(m.get("content"), str) and m.get("role") for m in out["prompt"]):
            raise ConfigError(f"{where}: prompt messages need a role and a string content")
    if name == "code":
        out["tests"] = _code_tests(truth, where)
    elif name == "countdown":
        if isinstance(truth, str):
            truth = json.loads(truth)
        out.update(numbers=list(truth["numbers"]), target=truth["target"])
    elif name == "sudoku":
        out["puzzle"] = str(truth)  # the solution: only it keeps every given
    else:
        out["answer"] = str(truth)
    return out
