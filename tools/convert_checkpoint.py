#!/usr/bin/env python
"""HF <-> Megatron torch_dist conversion, streamed; see dare_mega/cli/convert.py.

    torchrun --nproc-per-node 4 tools/convert_checkpoint.py --direction hf2mcore --hf DIR --mcore OUT --tp 2 --ep 2
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py --direction mcore2hf --mcore DIR --hf OUT [--verify]
"""

import sys

from dare_mega.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
