"""The SGLang client and engine against loopback servers (tests/fake_sglang.py): errors, batching, restarts."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, free_port
from fake_sglang import FakeSGLang

from dare_mega.errors import ConfigError
from dare_mega.rollout.sglang_client import SGLangClient, SGLangError
from dare_mega.rollout.sglang_engine import SGLangEngine, SGLangServerConfig, check_usable
from dare_mega.rollout.types import SamplingParams


def test_client_errors_name_the_route_and_the_server():
    server = FakeSGLang(fail={"/begin_weight_update": [1, 1]}).start()
    try:
        client = SGLangClient(server.url, timeout=10)
        with pytest.raises(SGLangError, match=r"/begin_weight_update: HTTP 500: injected failure"):
            client.begin_weight_update()
        with pytest.raises(SGLangError, match="must run between begin_weight_update"):
            client.update_weights_from_tensor(["x"])  # no session open: refused as SGLang refuses it
        client.begin_weight_update()
        with pytest.raises(SGLangError, match="already open"):
            client.begin_weight_update()
        assert client.weight_version() == "default"
    finally:
        server.stop()
    port = free_port()  # nothing listens there
    with pytest.raises(SGLangError, match=f"127.0.0.1:{port}/model_info: ConnectionError"):
        SGLangClient(f"http://127.0.0.1:{port}", timeout=2).model_info()


def test_sglang_refuses_what_it_cannot_train():
    config = SGLangServerConfig(model_path="/m")
    with pytest.raises(ConfigError, match="estimator=trajectory replays each token's denoising step"):
        check_usable(config, "trajectory", 1.0, 8)
    with pytest.raises(ConfigError, match="LowConfidence decodes greedily .* 8 completions of a group"):
        check_usable(config, "ebpo", 1.0, 8)
    check_usable(config, "ebpo", 0.0, 1)  # greedy evaluation is fine
    command = SGLangServerConfig("/m", tp=4, dllm_config={"block_size": 4}).command(30000, "/w", "/c.yaml")
    assert command[-2:] == ["--dllm-algorithm-config", "/c.yaml"] and "--max-running-requests" in command
    assert command[command.index("--tp-size") + 1] == "4" and command[command.index("--model-path") + 1] == "/w"


def test_engine_restarts_a_dead_server_and_the_rollout_completes(tiny_dir, tmp_path):
    """Two servers; the first dies on its second batch. It is restarted from the newest exported weights
    (`weights_path`), `on_restart` is told, the batch is sent again and every completion comes back, equal to
    what a healthy server gives for the same weights (greedy)."""
    from dare_mega.rollout.engine import NativeEngine

    flag = tmp_path / "died"
    launcher = [sys.executable, str(REPO / "tests" / "fake_sglang.py"), "--die-on-generate", "2", "--die-once",
                str(flag)]
    config = SGLangServerConfig(tiny_dir["sdar_moe"], dllm_config={"block_size": 4, "threshold": 0.95},
                                launcher=launcher)
    restarted = []
    engine = SGLangEngine(config, [free_port(), free_port()], batch_size=2, startup_timeout=120,
                          on_restart=restarted.append, log_dir=str(tmp_path / "logs"))
    try:
        engine.weights_path = tiny_dir["sdar_moe"]
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19], [20], [21, 22]]
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
        assert flag.exists() and restarted == [0] and engine.restarts == [1, 0]
        assert [c.prompt_ids for c in completions] == prompts
        reference = NativeEngine.from_pretrained(tiny_dir["sdar_moe"]).generate(
            prompts, SamplingParams(max_new_tokens=8, temperature=0.0, threshold=0.95))
        assert [c.completion_ids for c in completions] == [c.completion_ids for c in reference]
        assert all(c.completion_ids for c in completions)
        assert (tmp_path / "logs" / "dllm_config.yaml").read_text().strip().splitlines() == ["block_size: 4",
                                                                                            "threshold: 0.95"]
    finally:
        engine.shutdown()


def test_weight_check_fails_loudly_on_a_mismatch():
    import torch

    from dare_mega.weight_sync.sync import SGLangWeightCheck, WeightSyncError

    server = FakeSGLang().start()
    try:
        server.weights["lm_head.weight"] = torch.arange(12.0).reshape(3, 4)
        check = SGLangWeightCheck([SGLangClient(server.url)])
        check(3, {"lm_head.weight": [float(x) for x in range(12)]})  # what was sent is what the engine holds
        with pytest.raises(WeightSyncError, match=r"lm_head.weight after the sync to version 3 differs .* 1 > 0"):
            check(3, {"lm_head.weight": [float(x) for x in range(1, 13)]})
    finally:
        server.stop()
