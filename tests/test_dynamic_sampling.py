"""Dynamic sampling (rollout.filter=reward_variance, trainer/dynamic_sampling.py): only groups with reward
variance are kept, the batch is always full, and a step is the same at any data-parallel layout."""

import itertools
import json
import random
import sys

import pytest
import torch
from conftest import REPO, completed, start_torchrun

from dare_mega.config import load_config
from dare_mega.errors import ConfigError
from dare_mega.trainer.config import RLConfig
from dare_mega.trainer.dynamic_sampling import Group, keep_informative

FILTER = ["rollout.prompts_per_step=4", "rollout.n=2", "rollout.filter=reward_variance"]


def _group(position, rewards):
    values = torch.zeros(len(rewards), 4, dtype=torch.float64)
    values[:, 0] = torch.tensor(rewards, dtype=torch.float64)
    return Group(position, [{}] * len(rewards), [None] * len(rewards), values)


def test_keep_informative_by_exhaustive_enumeration():
    """Every assignment of rewards in {0, 0.5, 1} to 4 groups of 2, every batch size, groups in any order."""
    outcomes = list(itertools.product((0.0, 0.5, 1.0), repeat=2))
    for pattern in itertools.product(outcomes, repeat=4):
        groups = [_group(p, list(r)) for p, r in zip((3, 0, 2, 1), pattern)]  # handed over out of order
        by_position = sorted(groups, key=lambda g: g.position)
        varied = [g.position for g in by_position if len(set(g.values[:, 0].tolist())) > 1]
        flat = [g.position for g in by_position if len(set(g.values[:, 0].tolist())) == 1]
        for batch in range(1, 5):
            kept, filled = keep_informative(groups, batch)
            positions = [g.position for g in kept]
            assert len(kept) == batch
            assert positions == sorted(positions)  # draw order
            assert set(positions) == set(varied[:batch] + flat[: max(0, batch - len(varied))])
            assert filled == max(0, batch - len(varied))


HARD = {"overrides": [*FILTER, "rollout.filter_max_rounds=3"], "hard": True}  # no prompt has reward variance
PLAIN = {"overrides": FILTER[:2]}  # rollout.filter=none: DARE's step
# 6 prompts, 4 a round: round 1 draws the last 2 (at 4 ranks two of them decode nothing) and the draws stop;
# only prompts 2 and 5 have reward variance, so the batch is filled with 2 of round 0's
EXHAUSTED = {"overrides": FILTER, "steps": [1, 2], "prompts": 6}


def _start(tmp_path, nproc, cases):
    """The worker at `nproc` ranks, in the background; `_result` waits for it."""
    path = tmp_path / f"spec-{nproc}.json"
    path.write_text(json.dumps([{"steps": [1, 2, 3], "prompts": 30, **case} for case in cases]))
    out = tmp_path / f"out-{nproc}.json"
    return start_torchrun(nproc, ["tests/workers/dynamic_sampling_worker.py", str(path), str(out)]), out


def _result(started):
    proc, out = started
    proc = completed(proc, timeout=300)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world1):
    """The filtered steps at 1 (in this process), 2 and 4 data-parallel ranks; at 2 also the hard and the
    unfiltered cases."""
    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from dynamic_sampling_worker import run_case

    tmp = tmp_path_factory.mktemp("dynamic_sampling")
    # the launches run while this process computes its own (one thread per rank; the start-ups overlap)
    two = _start(tmp, 2, [{"overrides": FILTER}, HARD, PLAIN])
    four = _start(tmp, 4, [{"overrides": FILTER}, EXHAUSTED])
    one = [run_case({"steps": [1, 2, 3], "prompts": 30, "overrides": FILTER}, world1), run_case(EXHAUSTED, world1)]
    return {1: one, 2: _result(two), 4: _result(four)}


@pytest.mark.distributed
def test_dynamic_sampling_keeps_varied_groups_fills_the_batch_and_is_the_same_at_any_layout(runs):
    for step in range(3):
        views = {}
        for nproc, cases in runs.items():
            ranks = cases[0][step]["ranks"]
            kept = [row for r in ranks for row in r["kept"]]
            firsts = [r["first"] for r in ranks]
            # each rank's slice starts where the previous ones end, in the kept order
            assert firsts == [sum(len(r["kept"]) for r in ranks[:i]) for i in range(len(ranks))]
            assert len({r["calls"] for r in ranks}) == 1  # a lockstep engine: every rank decodes each round
            assert len({json.dumps(r["stats"]) for r in ranks}) == 1
            views[nproc] = (kept, ranks[0]["stats"])
        kept, stats = views[1]
        assert all(view == views[1] for view in views.values()), step  # the same groups, seeds, rewards, stats
        assert len(kept) == 4 * 2  # the batch is full
        groups = [kept[i : i + 2] for i in range(0, len(kept), 2)]
        assert stats["filter_filled"] == 0
        assert all(a[0] == b[0] and a[2] != b[2] for a, b in groups)  # every kept group has reward variance
        assert all(a[0] % 3 == 2 for a, _ in groups)  # ... which only the mixed prompts have
        assert 0 < stats["filter_kept_fraction"] < 1 and stats["filter_rounds"] >= 2


@pytest.mark.distributed
def test_without_varied_groups_the_batch_is_filled_and_round_zero_is_the_usual_draw(runs):
    _, hard, plain = runs[2]
    for filtered, usual in zip(hard, plain):
        stats = filtered["ranks"][0]["stats"]
        assert stats == {"filter_kept_fraction": 0.0, "filter_rounds": 3, "filter_filled": 4}
        assert all(r["calls"] == 3 for r in filtered["ranks"])
        # the fill is the earliest groups, i.e. round 0: the very prompts and seeds of the unfiltered step
        for a, b in zip(filtered["ranks"], usual["ranks"]):
            assert [row[:2] for row in a["kept"]] == [row[:2] for row in b["kept"]]
            assert a["first"] == b["first"] and a["requests"] == b["requests"]
        assert usual["ranks"][0]["stats"] == {}
        # ... which is the step's draw as it was before the filter: Random(seed * 1_000_003 + step), rank r of 2
        # the r-th half, seeds seed * 7919 + step * 100_003 + global request index
        seed, step = load_config(RLConfig, None, []).train.seed, usual["step"]
        chosen = random.Random(seed * 1_000_003 + step).sample(range(30), 4)
        for r, rank in enumerate(usual["ranks"]):
            assert rank["first"] == r * 2 * 2
            assert [row[:2] for row in rank["kept"]] == [[i, seed * 7919 + step * 100_003 + r * 4 + k]
                                                         for k, i in enumerate(x for x in chosen[2 * r : 2 * r + 2]
                                                                               for _ in range(2))]


@pytest.mark.distributed
def test_when_the_prompts_run_out_the_draws_stop_and_the_batch_is_filled_at_any_layout(runs):
    seed = load_config(RLConfig, None, []).train.seed
    for one, four in zip(runs[1][1], runs[4][1]):
        kept = [row for r in one["ranks"] for row in r["kept"]]
        assert kept == [row for r in four["ranks"] for row in r["kept"]]
        assert [r["first"] for r in four["ranks"]] == [0, 2, 4, 6]
        assert all(r["calls"] == 2 for r in four["ranks"])  # the idle ranks of round 1 decode too (lockstep)
        for rank in (*one["ranks"], *four["ranks"]):
            assert rank["stats"] == {"filter_kept_fraction": 2 / 6, "filter_rounds": 2, "filter_filled": 2}
        # kept: both varied prompts (2 and 5) and the earliest 2 flat ones of round 0, in draw order
        first_round = random.Random(seed * 1_000_003 + one["step"]).sample(range(6), 4)
        fill = [i for i in first_round if i % 3 != 2][:2]
        head = [i for i in first_round if i % 3 == 2 or i in fill]
        prompts = [row[0] for row in kept[::2]]
        assert prompts[: len(head)] == head and sorted(prompts[len(head) :]) == sorted({2, 5} - set(first_round))


def test_filter_keys_are_checked():
    with pytest.raises(ConfigError, match=r"rollout\.filter_max_rounds=0 must be >= 1"):
        load_config(RLConfig, None, ["rollout.filter=reward_variance", "rollout.filter_max_rounds=0"])
    with pytest.raises(ConfigError, match=r"rollout\.filter"):
        load_config(RLConfig, None, ["rollout.filter=variance"])
