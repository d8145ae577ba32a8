"""Model presets in configs/models/: HF config.json contents (published numbers, or tiny ones for tests).

A preset file is an HF config with one extra key, `_preset`, describing where the numbers come from.
"""

from __future__ import annotations

import json
from pathlib import Path

from dare_mega.errors import ConfigError
from dare_mega.paths import MODEL_PRESETS_DIR


def list_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.json"))


def preset_file(name: str):
    """configs/models/<name>.json, or `name` itself when it is the path of a .json file."""
    if name.endswith(".json") and Path(name).is_file():
        return Path(name)
    path = MODEL_PRESETS_DIR / f"{name}.json"
    if not path.exists():
        raise ConfigError(f"unknown model preset {name!r} (no {path}); presets: {', '.join(list_presets())}")
    return path


def load_preset(name: str) -> dict:
    """The HF config dict of a preset (without the `_preset` note)."""
    with open(preset_file(name)) as f:
        cfg = json.load(f)
    cfg.pop("_preset", None)
    return cfg


