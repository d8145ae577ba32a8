"""Where the project's data files live (presets, recipes): the repository's configs/ folder."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = Path(os.environ.get("DARE_MEGA_CONFIGS", REPO_ROOT / "configs"))
MODEL_PRESETS_DIR = CONFIGS_DIR / "models"
