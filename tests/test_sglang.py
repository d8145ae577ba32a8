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
        check_usable(config, "trajectory", {"step_maps", "rollout_logprobs"}, 1.0, 8, ("d1", "ebpo"))
    with pytest.raises(ConfigError, match="LowConfidence decodes greedily .* 8 completions of a group"):
        check_usable(config, "ebpo", frozenset(), 1.0, 8)
    check_usable(config, "ebpo", frozenset(), 0.0, 1)  # greedy evaluation is fine
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


@pytest.mark.distributed
def test_rl_loop_on_sglang_servers(tmp_path):
    """rollout.backend=sglang: two RL steps whose rollouts come from a (fake) SGLang server and whose weights go
    back to it through the disk transport, read back and checked after every sync; the server answers with
    the new version each step. The trajectory estimator and greedy groups are refused up front."""
    import json

    from conftest import torchrun

    from dare_mega.checkpoint.tiny import cached_tiny_checkpoint

    hf = cached_tiny_checkpoint("tiny-sdar-moe")
    server = FakeSGLang(hf=hf).start()
    try:
        common = ["--config", "configs/recipes/rl_tiny_sdar_moe.yaml", "rollout.backend=sglang",
                  f"sglang.urls=[{server.url}]", "sglang.transport=disk", "task.heldout=2", "eval.samples=1",
                  "rollout.prompts_per_step=2", "logging.progress=false", "checkpoint.every=1000"]
        refused = torchrun(1, ["-m", "dare_mega.trainer.rl", *common, f"run_dir={tmp_path / 'x'}"], timeout=300)
        assert refused.returncode != 0 and "estimator=trajectory replays each token's denoising step" in refused.stderr
        proc = torchrun(1, ["-m", "dare_mega.trainer.rl", *common, f"run_dir={tmp_path / 'run'}", "train.steps=2",
                            "algorithm.estimator=d1", "rollout.n=1", "rollout.temperature=0"], timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "rollouts on SGLangEngine" in proc.stdout
        steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["weight_version"] for r in steps] == [1, 2]
        generated = [c["version"] for c in server.calls if c["route"] == "/generate"]
        assert {"0", "1", "2"} <= set(generated)  # held-out eval at 0, step 1 at 0... the final eval at 2
        assert server.version == "2" and (tmp_path / "run" / "weights" / "v2").is_dir()
        assert sum(c["route"] == "/get_weights_by_name" for c in server.calls) == 3 * 3  # syncs 0, 1, 2
    finally:
        server.stop()
