"""Verifiable rewards (math, arithmetic, countdown, sudoku, code) and the code-execution sandbox."""

from dare_mega.rewards.verifiers import REWARDS, check_fields, score

__all__ = ["REWARDS", "check_fields", "score"]
