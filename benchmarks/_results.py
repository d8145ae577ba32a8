"""Where the benchmarks' JSON results go, and how they name the machine."""

from __future__ import annotations

import json
import os
import platform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(threads: int) -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or 'x86_64'}, {threads} threads)"


def write_result(name: str, result: dict, out: str | None = None) -> str:
    """benchmarks/results/<name>-<cuda|cpu>.json (or `out`); returns the path."""
    import torch

    path = out or os.path.join(REPO, "benchmarks", "results", f"{name}-{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return path
