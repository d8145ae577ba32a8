"""Model families (one folder each: config, mapping table, reference, registered in its __init__) and the
Megatron model built from them. Every sub-package of this folder is a family and is imported here, so a new
family is one folder; a family kept outside the tree is one importable package named in $DARE_MEGA_FAMILIES
(comma-separated), imported here too, so every entry point (trainers, tools, torchrun workers) knows it."""

import importlib
import os
import pkgutil

from dare_mega.models.args import DiffusionArgs, ModelArgs, MoEArgs
from dare_mega.models.family import family_for, known_architectures

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")
for _name in filter(None, (n.strip() for n in os.environ.get("DARE_MEGA_FAMILIES", "").split(","))):
    try:
        importlib.import_module(_name)
    except ImportError as error:
        raise ImportError(f"DARE_MEGA_FAMILIES names {_name!r}, which cannot be imported: {error}") from error

__all__ = ["DiffusionArgs", "ModelArgs", "MoEArgs", "family_for", "known_architectures"]
