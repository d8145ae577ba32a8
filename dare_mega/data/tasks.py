"""Synthetic verifiable tasks (no download): prompts, the fields their reward needs, and a gold response.

    records = make_task("arithmetic", count=512, seed=0)   # {"prompt", "response", "answer", ...}

Each task pairs with a reward of dare_mega/rewards (`TASK_REWARDS`); the gold response serves the SFT
warm-up. Held-out prompts come from a disjoint seed range of the same generator.
"""

from __future__ import annotations

import itertools
import random

from dare_mega.errors import ConfigError

TASK_REWARDS = {"arithmetic": "arithmetic", "countdown": "countdown", "sudoku": "sudoku", "reverse": "exact", "max": "arithmetic"}


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 19), rng.randint(0, 19)
    return {"prompt": f"{a}+{b}=", "response": str(a + b), "answer": a + b}


def countdown(rng: random.Random) -> dict:
    while True:
        numbers = [rng.randint(1, 9) for _ in range(3)]
        ops = [rng.choice("+-*") for _ in range(2)]
        order = rng.sample(numbers, 3)
        expression = f"({order[0]}{ops[0]}{order[1]}){ops[1]}{order[2]}"
        target = eval(expression, {"__builtins__": {}})  # our own digits and operators only
        if 0 < target <= 99:
            return {"prompt": f"Use {' '.join(map(str, numbers))} to make {target}:", "response": expression,
                    "numbers": numbers, "target": target}


def maximum(rng: random.Random) -> dict:
    digits = [rng.randint(0, 9) for _ in range(4)]
    return {"prompt": "max " + " ".join(map(str, digits)), "response": str(max(digits)), "answer": max(digits)}


def reverse(rng: random.Random) -> dict:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(4))
    return {"prompt": f"reverse {digits}", "response": digits[::-1], "answer": digits[::-1]}


_BASE = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]


def sudoku(rng: random.Random) -> dict:
    digits = rng.sample([1, 2, 3, 4], 4)
    rows = [r for band in rng.sample([[0, 1], [2, 3]], 2) for r in rng.sample(band, 2)]
    cols = [c for stack in rng.sample([[0, 1], [2, 3]], 2) for c in rng.sample(stack, 2)]
    grid = [[digits[_BASE[r][c] - 1] for c in cols] for r in rows]
    solution = "".join(str(d) for row in grid for d in row)
    blanks = set(rng.sample(range(16), 6))
    puzzle = "".join("0" if i in blanks else ch for i, ch in enumerate(solution))
    return {"prompt": f"Sudoku {puzzle}:", "response": solution, "puzzle": puzzle}


TASKS = {"arithmetic": arithmetic, "countdown": countdown, "sudoku": sudoku, "reverse": reverse, "max": maximum}


def make_task(name: str, count: int, seed: int = 0, exclude: set[str] | None = None) -> list[dict]:
    """`count` distinct records (distinct prompts, none in `exclude`)."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r}; known: {', '.join(sorted(TASKS))}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    for attempt in itertools.count():
        if len(out) == count:
            return out
        if attempt > 100 * count + 1000:
            raise ConfigError(f"task {name}: cannot make {count} distinct prompts (only {len(out)})")
        record = TASKS[name](rng)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            out.append(record)
    return out
