"""SGLang general plugin (entry point group `sglang.srt.plugins`, pyproject.toml): SGLang calls `register` early in
every one of its processes (the launcher, each scheduler), so `--dllm-algorithm DareMegaDecoding` resolves
wherever dare_mega is installed next to sglang. Nothing here runs outside SGLang."""


def register() -> None:
    from sglang.srt.dllm import algorithm as registry

    from dare_mega.rollout.sglang_algorithm import DareMegaDecoding

    registry.algo_name_to_cls[DareMegaDecoding.__name__] = DareMegaDecoding
