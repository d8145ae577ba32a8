"""Model families (one folder each: config, mapping table) and the Megatron model built from them."""

from dare_mega.models import sdar  # noqa: F401  (registers the SDAR family)
from dare_mega.models.args import DiffusionArgs, ModelArgs, MoEArgs
from dare_mega.models.family import family_for, known_architectures

__all__ = ["DiffusionArgs", "ModelArgs", "MoEArgs", "family_for", "known_architectures"]
