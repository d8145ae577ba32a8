"""SFT records from JSONL or Parquet (one file or a directory), and the built-in synthetic set.

A record is {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]} whose last message
is the response (key names configurable). JSONL is read line by line so that a malformed line is reported
with its file and line number; Parquet goes through Hugging Face `datasets` from the local path.
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

            records.extend(dict(r) for r in load_dataset("parquet", data_files=file, split="train"))
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
