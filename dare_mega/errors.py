"""Errors that name the problem: the config key, the tensor and both shapes, the file."""


class DareMegaError(Exception):
    """Base class of dare_mega's own errors."""


class ConfigError(DareMegaError, ValueError):
    """A model config, preset or parallel layout that cannot work; raised before any model is built."""


class CheckpointError(DareMegaError, ValueError):
    """A checkpoint that is missing a tensor, has a mis-shaped one, or is incomplete."""
