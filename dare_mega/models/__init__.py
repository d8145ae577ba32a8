"""Model families (one folder each: config, mapping table) and the Megatron model built from them."""

from dare_mega.models import llada2, sdar  # noqa: F401  (register the families)
from dare_mega.models.args import DiffusionArgs, ModelArgs, MoEArgs
from dare_mega.models.family import family_for, known_architectures

__all__ = ["DiffusionArgs", "ModelArgs", "MoEArgs", "family_for", "known_architectures"]
