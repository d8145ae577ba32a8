"""SGLang's server with the project's dLLM algorithm registered:

    python -m dare_mega.rollout.sglang_server --model-path DIR --dllm-algorithm DareMegaDecoding \
        --dllm-algorithm-config FILE.yaml [any other sglang.launch_server flag]

It registers DareMegaDecoding (rollout/sglang_algorithm.py) in this process, then runs `sglang.launch_server` as
its own `__main__`; SGLang's worker processes register it through the plugin entry point (rollout/sglang_plugin.py).
"""

import runpy
import sys

from dare_mega.rollout.sglang_plugin import register


def main() -> None:
    register()
    sys.argv[0] = "sglang.launch_server"
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
