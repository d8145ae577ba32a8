"""The engine an evaluation generates with (native, or running SGLang servers) and the decoding it uses: shared by
both harnesses, importable without OpenCompass."""

from __future__ import annotations

import os

from dare_mega.errors import ConfigError

_ENGINES: dict[tuple, object] = {}  # one engine per checkpoint in a process: OpenCompass builds a model per task


def decoding_for(path: str) -> dict:
    """The model family's reported decoding settings for the checkpoint at `path`."""
    from dare_mega.models.builder import load_model_args
    from dare_mega.models.family import family_for

    return dict(family_for(load_model_args(path).architecture).decoding)


def engine_for(path: str, backend: str = "native", urls=(), device: str | None = None, dtype: str = "float32",
               batch_size: int = 64):
    """The rollout engine that generates for `path`: the native engine, or running SGLang servers."""
    key = (os.path.abspath(path), backend, tuple(urls), device, dtype)
    if key not in _ENGINES:
        import torch

        if backend == "native":
            from dare_mega.rollout.engine import NativeEngine

            _ENGINES[key] = NativeEngine.from_pretrained(path, dtype=getattr(torch, dtype), device=device)
        elif backend == "sglang":
            if not urls:
                raise ConfigError("backend='sglang' needs the servers' URLs (urls=[...], --sglang-url)")
            from dare_mega.data.tokenizer import load_tokenizer
            from dare_mega.models.builder import load_model_args
            from dare_mega.rollout.sglang_engine import SGLangEngine, SGLangServerConfig

            args = load_model_args(path)
            server = SGLangServerConfig.for_model(path, args, dllm_algorithm=None)  # whatever the servers run
            _ENGINES[key] = SGLangEngine.connect(list(urls), server, batch_size, tokenizer=load_tokenizer(path))
        else:
            raise ConfigError(f"backend={backend!r}; expected 'native' or 'sglang'")
    return _ENGINES[key]
