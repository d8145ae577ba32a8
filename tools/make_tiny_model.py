#!/usr/bin/env python
"""Write a random HF checkpoint in a family's exact published layout, from a tiny preset.

    python tools/make_tiny_model.py --family sdar_moe --out /tmp/tiny-sdar-moe
"""

from __future__ import annotations

import argparse
import sys

from dare_mega.checkpoint.tiny import make_tiny_checkpoint
from dare_mega.models.presets import tiny_preset_for

FAMILIES = ("sdar", "sdar_moe", "llada2_moe")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    parser.add_argument("--preset", help="a preset of configs/models/ instead of the family's tiny one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--max-shard-bytes", type=int, default=2**20,
                        help="shard size; the default splits tiny models into several shards with an index")
    args = parser.parse_args(argv)
    preset = args.preset or tiny_preset_for(args.family)
    import torch

    make_tiny_checkpoint(args.out, preset=preset, seed=args.seed, max_shard_bytes=args.max_shard_bytes,
                         dtype=getattr(torch, args.dtype))
    print(f"wrote {preset} ({args.family}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
