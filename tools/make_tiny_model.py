#!/usr/bin/env python
"""Write a random HF checkpoint in a family's exact published layout, from a preset of configs/models/.

    python tools/make_tiny_model.py --preset tiny-sdar-moe --out /tmp/tiny-sdar-moe

The tiny presets are those the families declare (dare_mega/models/<family>/: `tiny_presets`); any other
preset of configs/models/ works too (the published sizes: large).
"""

from __future__ import annotations

import argparse
import sys

from dare_mega.checkpoint.tiny import make_tiny_checkpoint
from dare_mega.models.family import families


def main(argv=None) -> int:
    tiny = [p for f in families() for p in f.tiny_presets]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help=f"a preset of configs/models/ or a .json file (tiny ones: {', '.join(tiny)})")
    parser.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--max-shard-bytes", type=int, default=2**20,
                        help="shard size; the default splits tiny models into several shards with an index")
    args = parser.parse_args(argv)
    import torch

    make_tiny_checkpoint(args.out, preset=args.preset, seed=args.seed, max_shard_bytes=args.max_shard_bytes,
                         dtype=getattr(torch, args.dtype))
    print(f"wrote {args.preset} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
