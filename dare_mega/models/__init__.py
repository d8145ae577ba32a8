"""Model families (one folder each: config, mapping table, reference, registered in its __init__) and the
Megatron model built from them. Every sub-package of this folder is a family and is imported here, so a new
family is one folder."""

import importlib
import pkgutil

from dare_mega.models.args import DiffusionArgs, ModelArgs, MoEArgs
from dare_mega.models.family import family_for, known_architectures

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DiffusionArgs", "ModelArgs", "MoEArgs", "family_for", "known_architectures"]
