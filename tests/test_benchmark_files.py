"""Every benchmark read from its published file layout, with the prompt of the OpenCompass config it follows,
and the multiple-choice / BBH rewards that score it."""

from __future__ import annotations

import csv
import json

import pytest

from dare_mega.errors import ConfigError
from dare_mega.eval.benchmarks import BENCHMARKS, load
from dare_mega.rewards import score
from dare_mega.rewards.verifiers import choice_letter


def write_jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_multiple_choice_layouts(tmp_path):
    # MMLU ships one header-less CSV per subject under data/test/
    (tmp_path / "mmlu/test").mkdir(parents=True)
    for subject, rows in (("astronomy", [["What orbits the Earth?", "Sun", "Moon", "Mars", "Venus", "B"]]),
                          ("anatomy", [["Bones in the adult body?", "206", "106", "306", "12", "A"],
                                       ["Largest organ?", "Liver", "Heart", "Skin", "Lung", "C"]])):
        with open(tmp_path / f"mmlu/test/{subject}_test.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    mmlu = load("mmlu", str(tmp_path))
    assert [r["answer"] for r in mmlu] == ["A", "C", "B"]  # subjects in name order, rows in file order
    assert mmlu[0]["prompt"].startswith("Answer the following multiple choice question. The last line of your response "
                                        "should be of the following format: 'ANSWER: $LETTER'")
    assert "\n\nBones in the adult body?\n\nA) 206\nB) 106\nC) 306\nD) 12" in mmlu[0]["prompt"]
    assert mmlu[1]["_source"].endswith("anatomy_test.csv:2")

    # ARC: AI2's JSONL, labels A-E or 1-4
    write_jsonl(tmp_path / "ARC-Challenge/ARC-Challenge-Test.jsonl", [
        {"id": "q1", "question": {"stem": "Which is a gas?", "choices": [
            {"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}, {"text": "rock", "label": "3"}]},
         "answerKey": "2"}])
    (arc,) = load("arc_c", str(tmp_path))
    assert arc["prompt"] == "Question: Which is a gas?\nA. ice\nB. steam\nC. rock\nAnswer:"
    assert arc["answer"] == "B" and arc["letters"] == "ABC" and arc["id"] == "q1"

    write_jsonl(tmp_path / "hellaswag/hellaswag_val.jsonl", [
        {"ind": 4, "ctx": "A man sits down.", "endings": ["He sleeps.", "He flies.", "He eats.", "He sings."],
         "label": "2"}])
    (hs,) = load("hellaswag", str(tmp_path))
    assert hs["answer"] == "C" and hs["prompt"].endswith("D. He sings.\nYou may choose from 'A', 'B', 'C', 'D'.\nAnswer:")

    # GPQA's CSV lists the correct answer first; the shown order is a fixed shuffle per question
    (tmp_path / "gpqa").mkdir()
    with open(tmp_path / "gpqa/gpqa_diamond.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                               "Incorrect Answer 3", "Record ID"])
        w.writeheader()
        for i in range(8):
            w.writerow({"Question": f"Q{i}?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
                        "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3", "Record ID": f"r{i}"})
    gpqa = load("gpqa", str(tmp_path))
    for r in gpqa:
        assert f"{r['answer']}) right" in r["prompt"]
    assert len({r["answer"] for r in gpqa}) > 1  # not always the first letter
    assert [r["answer"] for r in gpqa] == [r["answer"] for r in load("gpqa", str(tmp_path))]  # stable

    # BBH: one JSON per task with {"examples": [{"input", "target"}]}
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh/boolean_expressions.json").write_text(json.dumps(
        {"examples": [{"input": "not ( True ) and ( True ) is", "target": "False"}]}))
    (tmp_path / "bbh/date_understanding.json").write_text(json.dumps(
        {"examples": [{"input": "Today is ... Options:\n(A) 01/01\n(B) 02/01", "target": "(B)"}]}))
    bbh = load("bbh", str(tmp_path))
    assert [r["answer"] for r in bbh] == ["False", "(B)"] and bbh[1]["id"].endswith("date_understanding.json#0")
    (tmp_path / "bbh/broken.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"broken.json: not a BBH task file"):
        load("bbh", str(tmp_path))


def test_math_layouts(tmp_path):
    write_jsonl(tmp_path / "math500/test.jsonl", [{"problem": "What is $1+1$?", "answer": "2", "level": 1}])
    write_jsonl(tmp_path / "aime2024/aime2024.jsonl", [{"ID": "2024-I-1", "Problem": "Find x.", "Answer": 204}])
    write_jsonl(tmp_path / "aime2025/aime2025.jsonl", [{"question": "Find y.", "answer": "70"}])
    (m,) = load("math500", str(tmp_path))
    assert m["prompt"] == "What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}."
    (a,) = load("aime2024", str(tmp_path))
    (b,) = load("aime2025", str(tmp_path))
    assert (a["answer"], b["answer"]) == ("204", "70")
    assert score("math", "so \\boxed{204}", a) == 1.0 and score("math", "so \\boxed{205}", a) == 0.0


def test_every_benchmark_names_its_expected_path(tmp_path):
    for name, bench in BENCHMARKS.items():
        with pytest.raises(ConfigError, match=rf"{name}: expected .* at {tmp_path}/{bench.path} .*never downloaded"):
            load(name, str(tmp_path))


@pytest.mark.parametrize("text,letters,expected", [
    ("Reasoning...\nANSWER: C", "ABCD", "C"),
    ("the answer is (B).", "ABCD", "B"),
    ("The answer is D", "ABCD", "D"),
    ("\\boxed{A}", "ABCD", "A"),
    ("B. because it is", "ABCD", "B"),
    ("E", "ABCD", None),  # not an option
    ("Amazing question", "ABCD", None),  # a word that starts with a letter is not a choice
    ("ANSWER: A\nwait, ANSWER: D", "ABCD", "D"),  # the last one
])
def test_choice_letter(text, letters, expected):
    assert choice_letter(text, letters) == expected


def test_choice_and_bbh_rewards():
    assert score("choice", "ANSWER: B", {"answer": "B"}) == 1.0
    assert score("choice", "ANSWER: A", {"answer": "B"}) == 0.0
    assert score("choice", "E.", {"answer": "E", "letters": "ABCDE"}) == 1.0
    assert score("bbh", "It flips twice. So the answer is True.", {"answer": "True"}) == 1.0
    assert score("bbh", "So the answer is true", {"answer": "True"}) == 1.0
    assert score("bbh", "So the answer is False.", {"answer": "True"}) == 0.0
    assert score("bbh", "So the answer is (B).", {"answer": "(B)"}) == 1.0
    assert score("bbh", "So the answer is B) 02/01", {"answer": "(B)"}) == 1.0
    assert score("bbh", "So the answer is (C).", {"answer": "(B)"}) == 0.0
    assert score("bbh", "So the answer is 12.", {"answer": "12"}) == 1.0
    assert score("bbh", "So the answer is 121.", {"answer": "12"}) == 0.0
