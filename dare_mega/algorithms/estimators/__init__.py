"""RL log-prob estimators for diffusion LLMs, one file each (formulas: docs/algorithms.md; the interface:
base.py). Every module of this folder is imported here, so a new estimator is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from dare_mega.algorithms.estimators.base import ESTIMATORS, Estimator, Rows, Sample, Totals, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def options_for(name: str, options: dict | None, source: str = "config"):
    """The estimator's Options from `algorithm.options` (unknown keys and wrong types named)."""
    from dare_mega.config import from_dict
    from dare_mega.errors import ConfigError

    if name not in ESTIMATORS:
        raise ConfigError(f"algorithm.estimator={name!r}; known: {', '.join(sorted(ESTIMATORS))}")
    return from_dict(ESTIMATORS[name].Options, options or {}, source, prefix="algorithm.options.")


def build(name: str, mask_token_id: int, options: dict | None = None, source: str = "config", **overrides):
    """An estimator by name; `options` (and keyword overrides) are its Options' fields."""
    return ESTIMATORS[name](mask_token_id, options_for(name, {**(options or {}), **overrides}, source)) \
        if name in ESTIMATORS else options_for(name, None, source)


__all__ = ["ESTIMATORS", "Estimator", "Rows", "Sample", "Totals", "build", "options_for", "register"]
