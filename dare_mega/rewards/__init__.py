"""Verifiable rewards (math, arithmetic, countdown, sudoku, code, ...), the code judge and its sandbox.

`score(name, text, record)` scores one completion; `score_many` a batch concurrently; `prepare(name, settings)`
is the start-up check that refuses code rewards which cannot run isolated.
"""

from dare_mega.rewards.jail import IsolationUnavailable
from dare_mega.rewards.scoring import prepare, score, score_many, score_records
from dare_mega.rewards.types import CodeSettings, Outcome, RewardSettings
from dare_mega.rewards.verifiers import CODE_REWARDS, REWARDS, check_fields

__all__ = ["CODE_REWARDS", "REWARDS", "CodeSettings", "IsolationUnavailable", "Outcome", "RewardSettings",
           "check_fields", "prepare", "score", "score_many", "score_records"]
