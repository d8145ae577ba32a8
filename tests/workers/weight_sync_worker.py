"""export_worker's cases, then sync_worker's, in one torchrun launch (8 processes start once: about 25 s on 2
CPU cores); rank 0 writes {"export": [...], "sync": [...]}.

argv: export_worker's JSON spec, sync_worker's JSON spec, then the output path.
"""

import json
import sys

import export_worker
import sync_worker
from _common import finish


def main():
    from dare_mega.parallel import init_distributed

    env = init_distributed()
    exported = export_worker.run(env, json.load(open(sys.argv[1])))
    synced = sync_worker.run(env, json.load(open(sys.argv[2])))
    finish(env, sys.argv[3], {"export": exported, "sync": synced})


if __name__ == "__main__":
    main()
