#!/usr/bin/env python
"""Megatron vs HF reference logits at a parallel layout; see dare_mega/cli/check_logits.py.

    torchrun --nproc-per-node 4 tools/check_logits.py --hf DIR --tp 2 --ep 2 [--mask block|causal] [--save F]
"""

import sys

from dare_mega.cli.check_logits import main

if __name__ == "__main__":
    sys.exit(main())
