"""What every torchrun worker ends with: rank 0 writes the JSON result, then the groups are torn down."""

import json


def finish(env, path: str, data) -> None:
    from dare_mega.parallel import destroy_distributed

    if env.is_main:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    destroy_distributed()
