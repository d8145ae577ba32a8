"""Errors that name the problem: the config key, the tensor and both shapes, the file."""

import sys


class DareMegaError(Exception):
    """Base class of dare_mega's own errors."""


class ConfigError(DareMegaError, ValueError):
    """A model config, preset or parallel layout that cannot work; raised before any model is built."""


class CheckpointError(DareMegaError, ValueError):
    """A checkpoint that is missing a tensor, has a mis-shaped one, or is incomplete."""


def exit_status(work) -> int:
    """A command's exit status: 0 when `work()` returns, 2 when it raises one of dare_mega's own errors, which is
    printed as `error: ...` on stderr (the message names the problem; a traceback would bury it)."""
    try:
        work()
    except DareMegaError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
