"""Benchmarks read from a local directory, in the files they ship as: never downloaded at run time.

One table drives both evaluation paths (`python -m dare_mega.eval`'s own scorer and the OpenCompass plugin):
where each benchmark's file lives under the data directory and how it is read, the prompt (the text of
OpenCompass's zero-shot config named in `prompt_from`, so scores compare with the standard harness), the
reward that scores a completion (the functions RL uses: math-verify for answers, the code sandbox for
programs, letter / answer-phrase matching for multiple choice and BBH) and a default generation length.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import random
from dataclasses import dataclass
from typing import Callable

from dare_mega.errors import ConfigError

REASON_BOXED = "\nPlease reason step by step, and put your final answer within \\boxed{}."
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: str  # relative to the data directory, as the dataset ships: a file, or a folder of per-subject files
    read: Callable[[dict], dict]  # one line / row -> {"prompt", what the reward needs}
    reward: str
    max_new_tokens: int
    prompt_from: str  # the OpenCompass dataset config whose prompt this is
    files: str = "jsonl"  # jsonl | csv (header row) | mmlu_csv (no header, per subject) | bbh_json (per task)


def _gsm8k(line: dict) -> dict:
    # GSM8K answers end with "#### <number>" (commas as thousands separators)
    final = line["answer"].split("####")[-1].strip().replace(",", "")
    return {"prompt": line["question"] + REASON_BOXED, "answer": final}


def _math(line: dict) -> dict:
    problem = line.get("problem", line.get("Problem", line.get("question")))
    answer = line.get("answer", line.get("Answer"))
    if problem is None or answer is None:
        raise KeyError("problem/question and answer")
    return {"prompt": str(problem) + REASON_BOXED, "answer": str(answer)}


def _humaneval(line: dict) -> dict:
    return {"prompt": "Read the following function signature and docstring, and fully implement the function "
                      "described. Your response should only contain the code for this function.\n" + line["prompt"],
            "prefix": line["prompt"], "tests": line["test"] + f"\ncheck({line['entry_point']})\n",
            "id": line["task_id"]}


def _mbpp(line: dict) -> dict:
    tests = "\n".join(line["test_list"])
    return {"prompt": f"You are an expert Python programmer, and here is your task:\n{line['text']}\nYour code should "
                      f"pass these tests:\n\n{tests}\n You should submit your final solution in the following format: "
                      f"```python\n\n```", "tests": tests, "id": str(line.get("task_id", ""))}


def _choices_prompt(question: str, choices: list[str], letter_line: bool) -> str:
    """OpenCompass's simple-evals multiple-choice prompt (letter_line) or its 'Answer:' completion prompt."""
    options = "\n".join(f"{LETTERS[i]}{')' if letter_line else '.'} {c}" for i, c in enumerate(choices))
    if letter_line:
        return ("Answer the following multiple choice question. The last line of your response should be of the "
                "following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of "
                f"{LETTERS[:len(choices)]}. Think step by step before answering.\n\n{question}\n\n{options}")
    return f"Question: {question}\n{options}\nAnswer:"


def _mmlu(row: dict) -> dict:
    # the published CSVs have no header: question, A, B, C, D, answer letter
    return {"prompt": _choices_prompt(row[0], [row[1], row[2], row[3], row[4]], True), "answer": row[5].strip(),
            "letters": "ABCD"}


def _arc(line: dict) -> dict:
    choices = line["question"]["choices"]
    labels = [c["label"] for c in choices]  # A-E, or 1-4 in a few questions
    gold = LETTERS[labels.index(line["answerKey"])]
    return {"prompt": _choices_prompt(line["question"]["stem"], [c["text"] for c in choices], False),
            "answer": gold, "letters": LETTERS[: len(choices)], "id": line.get("id", "")}


def _hellaswag(line: dict) -> dict:
    options = "\n".join(f"{LETTERS[i]}. {e}" for i, e in enumerate(line["endings"]))
    return {"prompt": f"{line['ctx']}\nQuestion: Which ending makes the most sense?\n{options}\n"
                      f"You may choose from 'A', 'B', 'C', 'D'.\nAnswer:",
            "answer": LETTERS[int(line["label"])], "letters": "ABCD", "id": str(line.get("ind", ""))}


def _gpqa(row: dict) -> dict:
    # the published CSV lists the correct answer first; the order shown is a fixed shuffle per question
    # (seeded by the question text) so every run and both evaluation paths see the same letters
    options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    order = list(range(4))
    random.Random(row["Question"]).shuffle(order)
    shown = [options[i].strip() for i in order]
    return {"prompt": _choices_prompt(row["Question"].strip(), shown, True), "answer": LETTERS[order.index(0)],
            "letters": "ABCD", "id": row.get("Record ID", "")}


def _bbh(line: dict) -> dict:
    return {"prompt": f"Question: {line['input']}\n You must give your final answer by starting with 'So the answer is' ",
            "answer": line["target"]}


BENCHMARKS = {b.name: b for b in [
    Benchmark("gsm8k", "gsm8k/test.jsonl", _gsm8k, "math", 512, "gsm8k_0shot_v2_gen_a58960"),
    Benchmark("math500", "math500/test.jsonl", _math, "math", 1024, "math_prm800k_500_0shot_cot_gen_11c4b5"),
    Benchmark("aime2024", "aime2024/aime2024.jsonl", _math, "math", 2048, "aime2024_gen_17d799"),
    Benchmark("aime2025", "aime2025/aime2025.jsonl", _math, "math", 2048, "aime2025_cascade_eval_gen (prompt)"),
    Benchmark("humaneval", "humaneval/HumanEval.jsonl", _humaneval, "humaneval", 512,
              "humaneval_openai_sample_evals_gen_dcae0e"),
    Benchmark("mbpp", "mbpp/mbpp.jsonl", _mbpp, "code", 512, "sanitized_mbpp_mdblock_0shot_nocot_gen_a2e416"),
    Benchmark("mmlu", "mmlu/test", _mmlu, "choice", 512, "mmlu_openai_simple_evals_gen_b618ea", "mmlu_csv"),
    Benchmark("arc_c", "ARC-Challenge/ARC-Challenge-Test.jsonl", _arc, "choice", 32, "ARC_c_gen_1e0de5"),
    Benchmark("hellaswag", "hellaswag/hellaswag_val.jsonl", _hellaswag, "choice", 32, "hellaswag_gen_6faab5"),
    Benchmark("gpqa", "gpqa/gpqa_diamond.csv", _gpqa, "choice", 1024, "gpqa_openai_simple_evals_gen_5aeece", "csv"),
    Benchmark("bbh", "bbh", _bbh, "bbh", 512, "bbh_0shot_nocot_academic_gen", "bbh_json"),
]}


def _rows(bench: Benchmark, path: str):
    """(where, raw row) for every item, in a fixed order."""
    if bench.files == "jsonl":
        with open(path) as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    yield f"{path}:{number}", lambda raw=raw: json.loads(raw)
    elif bench.files == "csv":
        with open(path, newline="") as f:
            for number, row in enumerate(csv.DictReader(f), 2):
                yield f"{path}:{number}", lambda row=row: row
    elif bench.files == "mmlu_csv":
        for name in sorted(glob.glob(os.path.join(path, "*_test.csv"))):
            with open(name, newline="") as f:
                for number, row in enumerate(csv.reader(f), 1):
                    yield f"{name}:{number}", lambda row=row: row
    elif bench.files == "bbh_json":
        for name in sorted(glob.glob(os.path.join(path, "*.json"))):
            with open(name) as f:
                try:
                    examples = json.load(f)["examples"]
                except (ValueError, KeyError) as e:
                    raise ConfigError(f"{name}: not a BBH task file ({type(e).__name__}: {e})") from None
            for number, example in enumerate(examples):
                yield f"{name}#{number}", lambda example=example: example


def data_path(name: str, data_dir: str) -> str:
    """Where the benchmark must be; a missing file (or an empty folder) names the path it expects."""
    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    bench = BENCHMARKS[name]
    path = os.path.abspath(os.path.join(data_dir, bench.path))
    folder = bench.files in ("mmlu_csv", "bbh_json")
    present = os.path.isdir(path) and glob.glob(os.path.join(path, "*_test.csv" if bench.files == "mmlu_csv" else "*.json")) \
        if folder else os.path.isfile(path)
    if not present:
        what = "a folder of per-subject files" if folder else "the dataset"
        raise ConfigError(f"{name}: expected {what} at {path} (as it ships: {bench.path} under --data); "
                          f"datasets are never downloaded at run time")
    return path


def load(name: str, data_dir: str, limit: int | None = None) -> list[dict]:
    """The benchmark's records from DATA_DIR/<its path>, each with `_source` (file:line) and an `id`."""
    bench = BENCHMARKS[name] if name in BENCHMARKS else None
    path = data_path(name, data_dir)
    records = []
    for where, row in _rows(bench, path):
        try:
            record = bench.read(row())
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ConfigError(f"{where}: not a {name} item ({type(e).__name__}: {e})") from None
        records.append({**record, "id": record.get("id") or where, "_source": where})
        if limit and len(records) >= limit:
            break
    return records
