"""Rewards: each reward(text, record) -> float in [0, 1], registered by name.

- math: the last \\boxed{...} (or, failing that, the last number) against record["answer"], checked with
  Hugging Face's math-verify (symbolic and numeric equivalence);
- arithmetic: the first integer of the answer equals record["answer"] exactly;
- exact: the first word of the answer is record["answer"];
- countdown: an arithmetic expression that uses record["numbers"], each exactly once, and evaluates to
  record["target"] (parsed with `ast`, never `eval`);
- sudoku: a full grid (digits, any separators) that keeps record["puzzle"]'s givens and is valid;
- code: the completion's last code block against record["tests"] (assert code, or standard-input cases),
  judged inside the sandbox (rewards/code.py): 1 when every test passed as the judge saw it;
- humaneval: the HumanEval candidate (the prompt's signature + completion, or the model's whole function)
  against its check(), judged the same way;
- choice: the letter the answer picks ('ANSWER: X', \\boxed{X}, 'the answer is (X)', or a leading 'X.') is
  record["answer"], among record["letters"];
- bbh: the phrase after the last 'the answer is' equals record["answer"] (case and a trailing period aside;
  '(A)' targets also accept 'A').
"""

from __future__ import annotations

import ast
import math
import operator
import re

from dare_mega.errors import ConfigError
from dare_mega.rewards.types import Outcome, RewardSettings

CODE_REWARDS = ("code", "humaneval")

REWARDS = {}
REQUIRED_FIELDS = {"math": ("answer",), "arithmetic": ("answer",), "exact": ("answer",), "choice": ("answer",),
                   "bbh": ("answer",),
                   "countdown": ("numbers", "target"), "sudoku": ("puzzle",), "code": ("tests",),
                   "humaneval": ("prefix", "tests")}


def register(name):
    def wrap(fn):
        REWARDS[name] = fn
        return fn

    return wrap


def check_fields(name: str, record: dict, where: str = "record") -> None:
    if name not in REWARDS:
        raise ConfigError(f"reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    missing = [k for k in REQUIRED_FIELDS.get(name, ()) if k not in record]
    if missing:
        raise ConfigError(f"{where}: the {name} reward needs field(s) {', '.join(missing)}")
    if name in CODE_REWARDS:
        from dare_mega.rewards.code import check_tests

        check_tests(record["tests"], where)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    begin = i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin : i - 1] if depth == 0 else None


@register("math")
def math_reward(text: str, record: dict, settings: RewardSettings) -> Outcome:
    from dare_mega.rewards.math_pool import math_workers

    answer = _last_boxed(text)
    if answer is None:
        numbers = re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?", text)
        if not numbers:
            return Outcome(0.0, "no_answer")
        answer = numbers[-1]
    same, status = math_workers(settings.math_seconds).equivalent(str(record["answer"]), answer)
    return Outcome(1.0 if same else 0.0, status)


@register("arithmetic")
def arithmetic_reward(text: str, record: dict, settings=None) -> float:
    match = re.search(r"-?\d+", text)
    return 1.0 if match and int(match.group()) == int(record["answer"]) else 0.0


@register("exact")
def exact_reward(text: str, record: dict, settings=None) -> float:
    words = text.split()
    return 1.0 if words and words[0] == str(record["answer"]) else 0.0


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node, used: list[int]):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return node.value
    raise ValueError("only + - * / and integers")


@register("countdown")
def countdown_reward(text: str, record: dict, settings=None) -> float:
    candidates = re.findall(r"[\d\s+\-*/()]+", text.split("=")[0])
    for expression in sorted(candidates, key=len, reverse=True):
        expression = expression.strip()
        if not expression or not re.search(r"\d", expression):
            continue
        try:
            used: list[int] = []
            value = _evaluate(ast.parse(expression, mode="eval"), used)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            continue
        if sorted(used) == sorted(record["numbers"]) and math.isclose(value, record["target"], abs_tol=1e-9):
            return 1.0
        return 0.0
    return 0.0


@register("sudoku")
def sudoku_reward(text: str, record: dict, settings=None) -> float:
    puzzle = [int(c) for c in re.sub(r"\D", "", str(record["puzzle"]))]
    size = int(round(len(puzzle) ** 0.5))
    box = int(round(size**0.5))
    digits = [int(c) for c in re.sub(r"\D", "", text)][: size * size]
    if len(digits) != size * size or any(not 1 <= d <= size for d in digits):
        return 0.0
    if any(p and p != d for p, d in zip(puzzle, digits)):
        return 0.0
    grid = [digits[r * size : (r + 1) * size] for r in range(size)]
    full = set(range(1, size + 1))
    rows = all(set(row) == full for row in grid)
    cols = all({grid[r][c] for r in range(size)} == full for c in range(size))
    boxes = all({grid[r][c] for r in range(br, br + box) for c in range(bc, bc + box)} == full
                for br in range(0, size, box) for bc in range(0, size, box))
    return 1.0 if rows and cols and boxes else 0.0


@register("code")
def code_reward(text: str, record: dict, settings: RewardSettings) -> Outcome:
    from dare_mega.rewards.code import backend_for, extract_code, judge

    backend = backend_for(settings.code)
    return judge(backend, extract_code(text), record["tests"], settings.code, record.get("timeout"))


@register("humaneval")
def humaneval_reward(text: str, record: dict, settings: RewardSettings) -> Outcome:
    from dare_mega.rewards.code import backend_for, humaneval_code, humaneval_tests, judge

    backend = backend_for(settings.code)
    return judge(backend, humaneval_code(text, record), humaneval_tests(record), settings.code,
                 record.get("timeout"))


def choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The option a multiple-choice answer picks, or None."""
    set_ = f"[{re.escape(letters)}]"
    patterns = [rf"ANSWER\s*:\s*\(?({set_})\)?", rf"\\boxed{{\(?({set_})\)?}}",
                rf"answer is:?\s*\(?({set_})\)?(?![A-Za-z])"]
    for pattern in patterns:
        found = re.findall(pattern, text, flags=re.I if pattern.startswith("answer") else 0)
        if found:
            return found[-1].upper()
    lead = re.match(rf"\s*\(?({set_})\)?(?:[.):\s]|$)", text)
    return lead.group(1) if lead else None


@register("choice")
def choice_reward(text: str, record: dict, settings=None) -> float:
    return 1.0 if choice_letter(text, record.get("letters", "ABCD")) == str(record["answer"]).strip() else 0.0


def _bbh_phrase(text: str) -> str:
    tail = re.split(r"answer is:?", text, flags=re.I)[-1]
    line = tail.strip().split("\n")[0].strip()
    return line.rstrip(".").strip().lower()


@register("bbh")
def bbh_reward(text: str, record: dict, settings=None) -> float:
    target, said = str(record["answer"]).strip().lower(), _bbh_phrase(text)
    if re.fullmatch(r"\([a-z]\)", target):  # multiple choice: "(A)" or "A" (then anything)
        return 1.0 if re.match(rf"\(?{target[1]}\)?(?![a-z])", said) else 0.0
    return 1.0 if said == target else 0.0
