"""rollout.backend=native beside the trainer: the engine's bytes from shapes equal what it allocates, an engine
that does not fit is refused with the numbers before a weight is read, one engine per replica, in the trainer's
dtype. (The replica's followers receiving the leader's completions and expert choices is checked at TP=2 x EP=2
by tests/test_rl.py::test_one_step_agrees_across_layouts.)"""

import pytest
import torch

from dare_mega.errors import ConfigError
from dare_mega.models.builder import load_model_args, mapping_for
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.memory import engine_bytes


def counted(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["sdar", "sdar_moe", "llada2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_bytes_are_what_the_engine_allocates(tiny_dir, family, dtype, monkeypatch):
    from dare_mega.diffusion import kv_cache
    from dare_mega.rollout.types import SamplingParams

    caches = []

    class Recorded(kv_cache.BlockKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(kv_cache, "BlockKVCache", Recorded)
    engine = NativeEngine.from_pretrained(tiny_dir[family], dtype=dtype, device="cpu", tokenizer=False)
    args = load_model_args(tiny_dir[family])
    prompts, new = [[5] * 9, [6] * 3, [7] * 20], 10
    engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=()), cache=True)
    block = args.diffusion.block_size
    predicted = engine_bytes(args, mapping_for(args), dtype, rows=3, length=-(-(20 + new) // block) * block)
    assert predicted.weights == counted(engine.model.weights.values())
    assert len(caches) == 1 and predicted.kv_cache == caches[0].nbytes
    assert predicted.total == predicted.weights + predicted.kv_cache


def rl_config(tmp_path, hf_dir, **rollout):
    from dare_mega.trainer.config import RLConfig

    cfg = RLConfig()
    cfg.model.hf = hf_dir
    cfg.run_dir = str(tmp_path)
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    return cfg


def test_an_engine_that_does_not_fit_is_refused_with_the_numbers(tiny_dir, world1, tmp_path, monkeypatch):
    from dare_mega.trainer import backends

    cfg = rl_config(tmp_path, tiny_dir["sdar_moe"], prompts_per_step=8, n=4, max_new_tokens=16)
    args = load_model_args(tiny_dir["sdar_moe"])
    prompt = "a" * 10  # the tiny tokenizer: one id per character, after the chat template if any
    built = []
    monkeypatch.setattr(NativeEngine, "from_pretrained", classmethod(lambda cls, *a, **k: built.append(a) or 1 / 0))
    need = engine_bytes(args, mapping_for(args), torch.float32, 1, 1)
    with pytest.raises(ConfigError) as refused:
        backends.native_rollout(cfg, tiny_dir["sdar_moe"], world1, prompts=[prompt], reserve_bytes=5 * 1024**3,
                                free_bytes=lambda device: 5 * 1024**3)  # the engine's few KiB too many
    message = str(refused.value)
    assert "rollout.backend=native" in message and "float32" in message and "rollout.backend=megatron" in message
    assert "optimizer state still to come 5.00 GiB, but 5.00 GiB is free" in message
    assert f"{cfg.task.heldout * cfg.eval.samples} requests" in message  # the held-out evaluation is the most
    assert f"({need.weights / 1024**2:.2f} MiB of weights in float32)" in message
    assert not built  # refused before any weight is read

    # with room, the engine is built in the trainer's dtype; one process is its own replica (no wrapper)
    monkeypatch.undo()
    cfg.model.dtype = "bfloat16"
    engine, transport = backends.native_rollout(cfg, tiny_dir["sdar_moe"], world1, prompts=[prompt],
                                                free_bytes=lambda device: 1024**4)
    assert type(engine) is NativeEngine and engine.model.dtype == torch.bfloat16 and transport.engine is engine


def test_the_optimizer_state_still_to_come_is_counted(tiny_dir, world1):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import wrap_for_training
    from dare_mega.parallel import ParallelLayout
    from dare_mega.trainer.config import RLConfig
    from dare_mega.trainer.setup import build_optimizer, pending_optimizer_state_bytes

    chunks, _ = build_from_hf(tiny_dir["sdar"], ParallelLayout())
    parameters = sum(p.numel() for c in chunks for p in c.parameters())
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    optimizer, _ = build_optimizer(RLConfig(), chunks, torch.float32)
    assert pending_optimizer_state_bytes(optimizer) == 2 * 4 * parameters  # Adam's two fp32 moments
    for chunk in chunks:
        for p in chunk.parameters():
            p.main_grad.fill_(1e-3) if hasattr(p, "main_grad") else None
    optimizer.step()
    assert pending_optimizer_state_bytes(optimizer) == 0
