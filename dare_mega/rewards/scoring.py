"""Scoring completions: one at a time (`score`), or a step's worth concurrently in a bounded pool
(`score_many`), and the start-up check that refuses code rewards which cannot be isolated (`prepare`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from dare_mega.rewards.jail import IsolationUnavailable
from dare_mega.rewards.types import Outcome, RewardSettings, machine_memory_mb
from dare_mega.rewards.verifiers import CODE_REWARDS, REWARDS

DEFAULT = RewardSettings()


def _one(name: str, text: str, record: dict, settings: RewardSettings, log=None) -> Outcome:
    start = time.monotonic()
    try:
        outcome = Outcome.of(REWARDS[name](text, record, settings))
    except IsolationUnavailable:
        raise  # fail closed: never a silent 0 for every sample
    except Exception as e:  # noqa: BLE001 - any failure of a reward function scores 0
        if log is not None:
            log(f"reward {name} failed on {record.get('_source', record.get('prompt', '?'))!r}: "
                f"{type(e).__name__}: {e}; completion {text[:200]!r}; scored 0")
        return Outcome(0.0, "reward_error", seconds=time.monotonic() - start, detail=f"{type(e).__name__}: {e}")
    if not outcome.seconds:
        outcome.seconds = time.monotonic() - start
    return outcome


def score(name: str, text: str, record: dict, log=None, settings: RewardSettings | None = None) -> float:
    """The reward in [0, 1], or 0 when the reward function itself fails (logged with the sample; the run goes
    on). Code rewards raise IsolationUnavailable when they cannot run isolated."""
    return _one(name, text, record, settings or DEFAULT, log).score


def pool_size(name: str, settings: RewardSettings, memory_per_sample_mb: int | None = None) -> int:
    """Concurrent samples: reward.workers, capped by the memory budget (each sample's worst case) and the CPU
    budget (cores per sample)."""
    workers = settings.workers
    if memory_per_sample_mb is None:
        memory_per_sample_mb = 256  # a math-verify worker process (sympy)
        if name in CODE_REWARDS:
            from dare_mega.rewards.code import backend_for

            memory_per_sample_mb = backend_for(settings.code).memory_per_sample_mb
    budget = settings.memory_budget_mb or machine_memory_mb() // 4
    workers = min(workers, max(1, budget // max(memory_per_sample_mb, 1)))
    if settings.cpu_budget:
        workers = min(workers, max(1, settings.cpu_budget // settings.code.cpus_per_sample))
    return max(1, workers)


def score_many(name: str, texts: list[str], records: list[dict], settings: RewardSettings | None = None,
               log=None) -> list[Outcome]:
    """Outcomes for (text, record) pairs, in order, scored concurrently: a hostile sample costs its own time
    limit, not the step's."""
    settings = settings or DEFAULT
    if len(texts) != len(records):
        raise ValueError(f"{len(texts)} completions for {len(records)} records")
    if not texts:
        return []
    workers = min(pool_size(name, settings), len(texts))
    if workers == 1:
        return [_one(name, t, r, settings, log) for t, r in zip(texts, records)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward") as pool:
        return list(pool.map(lambda pair: _one(name, pair[0], pair[1], settings, log), zip(texts, records)))


def score_records(texts: list[str], records: list[dict], settings: RewardSettings | None = None,
                  log=None) -> list[Outcome]:
    """Outcomes of completions whose records each name their reward (`_reward`, as the RL data loader sets it:
    a mixed math + code set scores each kind its own way), in order; each kind scored in the pool."""
    names = [r["_reward"] for r in records]
    out: list = [None] * len(records)
    for name in dict.fromkeys(names):
        index = [i for i, n in enumerate(names) if n == name]
        for i, outcome in zip(index, score_many(name, [texts[i] for i in index], [records[i] for i in index],
                                                settings, log)):
            out[i] = outcome
    return out


def prepare(name: str, settings: RewardSettings | None = None, log=print) -> str:
    """Start-up, before any process group or model: a code reward gets its sandbox checked end to end (a correct
    and a wrong program through the real backend); raises IsolationUnavailable with what is missing and how to
    get it. Returns a line describing where rewards run."""
    settings = settings or DEFAULT
    if name not in CODE_REWARDS:
        return f"reward {name}: in process (math-verify in worker processes)" if name == "math" else \
            f"reward {name}: in process"
    from dare_mega.rewards.code import backend_for

    backend = backend_for(settings.code, log)
    return f"reward {name}: {backend.describe()}, {pool_size(name, settings)} sample(s) at once"

