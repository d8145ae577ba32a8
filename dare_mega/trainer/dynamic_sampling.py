"""Dynamic sampling (DAPO; slime's and verl's `filter_groups`): rollout.filter=reward_variance.

A group whose rewards all agree has zero advantage under group normalisation and carries no gradient. With the
filter on, a step draws its prompts in rounds: round 0 is exactly the step's usual draw (the same prompts and
seeds as rollout.filter=none), round r > 0 draws prompts_per_step fresh prompts not yet drawn this step. After
each round every data-parallel rank knows every group's verdict (an all-gather of the round's groups), so all
ranks stop after the same round: once prompts_per_step informative groups (rewards not all equal) are in hand,
or after rollout.filter_max_rounds rounds. The kept batch is the first prompts_per_step informative groups in
draw order; when the rounds run out first, it is filled with the earliest uninformative groups (so the batch
and its data-parallel split keep their size; verl raises instead once max_num_gen_batches is exceeded), and
the fill is counted. Each rank then trains on its contiguous slice of the kept groups.

Every choice is a function of (train.seed, step, round, global index): the prompts of a round, the seed of each
request, the verdicts, the kept order and the position (`first`) that seeds the update's noise, so a step is
the same at any layout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Group:
    """One prompt's rollout.n completions, at its global position in the step's draw."""

    position: int  # round * prompts_per_step + index within the round
    requests: list[dict]
    completions: list
    values: torch.Tensor  # [n, 4]: reward, tests passed, tests total, timed out (rl_phases.Scored)

    @property
    def informative(self) -> bool:
        rewards = self.values[:, 0]
        return bool(rewards.max() != rewards.min())


def round_prompts(seed: int, step: int, round_: int, train_size: int, count: int, drawn: set[int]) -> list[int]:
    """The prompts of one round: round 0 is the step's usual draw; later rounds draw from the prompts this step
    has not drawn yet (fewer, or none, when the training set runs out)."""
    if round_ == 0:
        return random.Random(seed * 1_000_003 + step).sample(range(train_size), count)
    left = [i for i in range(train_size) if i not in drawn]
    return random.Random((seed * 1_000_003 + step) * 1_000_033 + round_).sample(left, min(count, len(left)))


def request_seed(seed: int, step: int, request: int) -> int:
    """The sampling seed of the step's request at global position `request` (over all rounds)."""
    return seed * 7919 + step * 100_003 + request


def share(count: int, ranks: int, rank: int) -> tuple[int, int]:
    """The contiguous [lo, hi) of `count` items that data-parallel rank `rank` of `ranks` takes."""
    return count * rank // ranks, count * (rank + 1) // ranks


def keep_informative(groups: list[Group], batch: int) -> tuple[list[Group], int]:
    """(the first `batch` informative groups in draw order, filled up with the earliest uninformative ones when
    there are fewer; how many were filled). The kept groups stay in draw order."""
    ordered = sorted(groups, key=lambda g: g.position)
    chosen = {g.position for g in [g for g in ordered if g.informative][:batch]}
    filled = [g for g in ordered if not g.informative][: batch - len(chosen)]
    chosen |= {g.position for g in filled}
    return [g for g in ordered if g.position in chosen], len(filled)


def enough(groups: list[Group], batch: int) -> bool:
    return sum(g.informative for g in groups) >= batch
