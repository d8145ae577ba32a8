"""The SGLang client, engine, launch command and weight checks against loopback servers built of sglang 0.5.23's
own code (tests/fake_sglang.py), and dare_mega's wire format, reductions and registry against sglang's code
(tests/workers/sglang_checks.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, clean_env, free_port
from fake_sglang import Servers

from dare_mega.errors import ConfigError
from dare_mega.rollout.sglang_client import SGLangClient, SGLangError
from dare_mega.rollout.sglang_engine import SGLangEngine, SGLangServerConfig, check_usable
from dare_mega.rollout.types import SamplingParams


def sglang_checks(tmp_path, *checks: str) -> dict:
    out = tmp_path / "checks.json"
    proc = subprocess.run([sys.executable, "tests/workers/sglang_checks.py", str(out), *checks], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def started(tmp_path_factory, tiny_dir):
    """One fake server (DareMegaDecoding on the tiny SDAR-MoE) for the tests that do not kill it, and the
    /health answers seen while it started."""
    import time

    import requests

    servers = Servers(tmp_path_factory.mktemp("sglang"))
    url = servers.start("one", tiny_dir["sdar_moe"], "--fail", "/begin_weight_update:1")
    codes = []
    deadline = time.time() + 240
    while 200 not in codes and time.time() < deadline:
        try:
            codes.append(requests.get(url + "/health", timeout=5).status_code)
        except requests.RequestException:  # not listening yet
            pass
        time.sleep(0.2)
    servers.wait(url)
    yield url, codes
    servers.stop()


@pytest.fixture
def server(started):
    return started[0]


def test_wire_format_reductions_and_defaults_are_sglangs(tmp_path):
    """What dare_mega sends, decoded by SGLang's own code: the flattened bucket bit-exactly through
    MultiprocessingSerializer + FlattenedTensorBucket, and through FlattenedTensorBucket.empty (the distributed
    route's receive buffer) at the same offsets; a CUDA handle's device is the GPU's UUID, which SGLang's patched
    rebuild maps to the receiver's own index of that GPU (the trainer's GPU 2 is the engine's GPU 0); each
    family's SGLang block size and mask id equal SGLang's DllmConfig; the launch command parses with SGLang's
    parser (an unknown flag exits 2) and names DareMegaDecoding, found through SGLang's plugin loading."""
    got = sglang_checks(tmp_path, "payload", "uuid_reduction", "dllm_defaults", "launch_command", "bad_flag")
    payload = got["payload"]
    assert payload["exact"] == payload["sent"] == payload["exact_via_empty"] and payload["layout_equal"]
    assert got["uuid_reduction"] == {"wire_device": "GPU-cccc", "receiver_device": 0, "other_args_kept": True}
    for arch, pair in got["dllm_defaults"].items():
        assert pair["sglang"] == pair["registry"], arch
    assert set(got["dllm_defaults"]) == {"SDARForCausalLM", "SDARMoeForCausalLM", "LLaDA2MoeModelLM", "LLaDAModelLM",
                                         "DreamModel", "LLaDAMoEModelLM"}
    for arch in ("LLaDAModelLM", "DreamModel", "LLaDAMoEModelLM"):  # not SGLang dLLMs: refused as such
        assert got["dllm_defaults"][arch]["sglang"] is None, arch
    launch = got["launch_command"]
    assert launch["launcher"] == ["-m", "dare_mega.rollout.sglang_server"] and launch["model_path"]
    assert (launch["tp_size"], launch["port"], launch["max_running_requests"]) == (2, 30123, 64)
    assert launch["dllm_algorithm"] == launch["algorithm_class"] == "DareMegaDecoding"
    # SGLang fills blocks with its SDAR default; the algorithm decodes with the model's mask token
    assert (launch["block_size"], launch["fill_id"], launch["model_mask_id"], launch["threshold"]) == \
        (4, 151669, 259, 0.8)
    assert got["bad_flag"] == {"exit": 2}  # SGLang's parser refuses what the fake server would refuse


def test_client_errors_name_the_route_and_the_server(server):
    client = SGLangClient(server, timeout=30)
    with pytest.raises(SGLangError, match=r"/begin_weight_update: HTTP 500: injected failure"):
        client.begin_weight_update()
    with pytest.raises(SGLangError, match="update_weights_from_tensor must run between begin_weight_update"):
        client.update_weights_from_tensor(["eA=="])  # no session open: refused as SGLang's scheduler refuses it
    with pytest.raises(SGLangError, match="no weight-update session is open"):
        client.end_weight_update()
    client.begin_weight_update()
    with pytest.raises(SGLangError, match="already open"):
        client.begin_weight_update()
    client.end_weight_update()
    # a body SGLang's request struct rejects: FastAPI's 422, its fields named
    with pytest.raises(SGLangError, match=r"HTTP 422: serialized_named_tensors: .*base64"):
        client.update_weights_from_tensor(["not base64!"])
    with pytest.raises(SGLangError, match=r"/generate: HTTP 400: .*Unexpected keyword argument 'bogus'"):
        client.generate([[1, 2]], {"max_new_tokens": 2, "bogus": 1})
    assert client.weight_version() == "default"
    port = free_port()  # nothing listens there
    with pytest.raises(SGLangError, match=f"127.0.0.1:{port}/model_info: ConnectionError"):
        SGLangClient(f"http://127.0.0.1:{port}", timeout=2).model_info()


def test_health_is_503_while_starting_then_200(started):
    """SGLang's /health answers 503 until the server is ready (here: importing SGLang and loading the model
    after the port opened), then 200 after a one-token generation."""
    codes = started[1]
    assert set(codes) == {503, 200} and codes[-1] == 200 and codes.index(200) == len(codes) - 1


def test_sglang_refuses_what_it_cannot_train_or_would_decode_wrong(tiny_dir):
    from dare_mega.models.builder import load_model_args

    with pytest.raises(ConfigError, match="estimator=trajectory replays each token's denoising step.* replaying "
                                          "DareMegaDecoding, not SGLang's LowConfidence"):
        check_usable("LowConfidence", "trajectory", {"step_maps", "rollout_logprobs"}, 0.0, 1, ("d1", "ebpo"))
    # the trainer replays DareMegaDecoding's trajectories (tests/test_replay.py)
    check_usable("DareMegaDecoding", "trajectory", {"step_maps", "rollout_logprobs"}, 1.0, 8, ("d1", "ebpo"))
    with pytest.raises(ConfigError, match="LowConfidence decodes greedily .* 8 completions of a group"):
        check_usable("LowConfidence", "ebpo", frozenset(), 1.0, 8)
    check_usable("LowConfidence", "ebpo", frozenset(), 0.0, 1)  # greedy evaluation is fine
    check_usable("DareMegaDecoding", "ebpo", frozenset(), 1.0, 8)  # it samples
    hf = tiny_dir["sdar_moe"]
    args = load_model_args(hf)
    assert SGLangServerConfig.for_model(hf, args, dllm_config={"threshold": 0.9}).algorithm_config() == \
        {"threshold": 0.9, "block_size": 4, "mask_id": 259}
    with pytest.raises(ConfigError, match=r"SGLang's LowConfidence fills blocks with mask id 151669 \(its default "
                                          r"for SDARMoeForCausalLM\) but the model's mask token is 259"):
        SGLangServerConfig.for_model(hf, args, dllm_algorithm="LowConfidence").algorithm_config()
    with pytest.raises(ConfigError, match="dllm_config block_size=8 differs from the model's block_size=4"):
        SGLangServerConfig.for_model(hf, args, dllm_config={"block_size": 8}).algorithm_config()


def test_connect_checks_the_servers_block_size_and_mask_id(server, tiny_dir):
    """A server that decodes another block size (or mask id) than the model's is refused on connect, with both
    values named; a server running another algorithm than configured too."""
    import dataclasses

    from dare_mega.models.builder import load_model_args

    hf = tiny_dir["sdar_moe"]
    config = SGLangServerConfig.for_model(hf, load_model_args(hf))
    engine = SGLangEngine.connect([server], config)
    assert engine.algorithm == "DareMegaDecoding"
    with pytest.raises(SGLangError, match=r"block_size=8 \(the trainer's model\) but the server decodes with "
                                          r"block_size=4"):
        SGLangEngine.connect([server], dataclasses.replace(config, block_size=8))
    with pytest.raises(SGLangError, match=r"mask_id=7 \(the trainer's model\) but the server decodes with mask_id=259"):
        SGLangEngine.connect([server], dataclasses.replace(config, mask_id=7))
    with pytest.raises(SGLangError, match="runs --dllm-algorithm DareMegaDecoding, but sglang.dllm_algorithm is "
                                          "LowConfidence"):
        SGLangEngine.connect([server], dataclasses.replace(config, dllm_algorithm="LowConfidence"))


def test_sampled_groups_are_seeded_like_the_native_engine(server, tiny_dir):
    """DareMegaDecoding on the server samples with each request's seed (sent as its rid's '#<seed>'): a group of
    completions differs, and each equals the native engine's with that seed."""
    from dare_mega.models.builder import load_model_args
    from dare_mega.rollout.engine import NativeEngine

    hf = tiny_dir["sdar_moe"]
    engine = SGLangEngine.connect([server], SGLangServerConfig.for_model(hf, load_model_args(hf)))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, seeds=(11, 12, 13, 14), threshold=0.95,
                            stop_token_ids=())
    prompts = [[5, 6, 7]] * 4
    got = [c.completion_ids for c in engine.generate(prompts, params)]
    native = [c.completion_ids for c in NativeEngine.from_pretrained(hf).generate(prompts, params)]
    assert got == native and len({tuple(c) for c in got}) > 1


def test_engine_restarts_a_dead_server_and_the_rollout_completes(tiny_dir, tmp_path):
    """The server dies on its second batch. It is restarted from the newest exported weights (`weights_path`),
    `on_restart` is told, the batch is sent again and every completion comes back, equal to what a healthy
    server gives for the same weights (greedy)."""
    from dare_mega.models.builder import load_model_args
    from dare_mega.rollout.engine import NativeEngine

    flag = tmp_path / "died"
    launcher = [sys.executable, str(REPO / "tests" / "fake_sglang.py"), "--die-on-generate", "2", "--die-once",
                str(flag)]
    hf = tiny_dir["sdar_moe"]
    config = SGLangServerConfig.for_model(hf, load_model_args(hf), dllm_config={"threshold": 0.95},
                                          launcher=launcher)
    restarted = []
    engine = SGLangEngine(config, [free_port()], batch_size=2, startup_timeout=240,
                          on_restart=restarted.append, log_dir=str(tmp_path / "logs"))
    try:
        engine.weights_path = hf
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19], [20], [21, 22]]
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
        assert flag.exists() and restarted == [0] and engine.restarts == [1]
        assert [c.prompt_ids for c in completions] == prompts
        reference = NativeEngine.from_pretrained(hf).generate(
            prompts, SamplingParams(max_new_tokens=8, temperature=0.0, threshold=0.95))
        assert [c.completion_ids for c in completions] == [c.completion_ids for c in reference]
        assert all(c.completion_ids for c in completions)
        assert (tmp_path / "logs" / "dllm_config.yaml").read_text().strip().splitlines() == \
            ["block_size: 4", "mask_id: 259", "threshold: 0.95"]
    finally:
        engine.shutdown()


def test_weight_check_and_name_check_fail_loudly(server, tiny_dir, tmp_path):
    """SGLang's weight checker around a sync: a sync that writes every tensor passes; one that leaves a tensor
    out (here a disk load without it) fails, naming it. The name check refuses a plan whose names or shapes
    differ from the checkpoint's."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    from dare_mega.weight_sync.export import ExportPlan
    from dare_mega.weight_sync.sync import SGLangWeightCheck, WeightSyncError, check_against_checkpoint

    hf = tiny_dir["sdar_moe"]
    client = SGLangClient(server, timeout=120)
    check = SGLangWeightCheck([client])
    check.before(1)
    client.update_weights_from_disk(hf, "1")  # every tensor, the values the server started from
    check.after(1)
    partial = tmp_path / "partial"
    partial.mkdir()
    tensors = {}
    for f in sorted(p for p in os.listdir(hf) if p.endswith(".safetensors")):
        tensors.update(load_file(f"{hf}/{f}"))
    left_out = "model.layers.1.mlp.experts.3.up_proj.weight"
    save_file({n: t for n, t in tensors.items() if n != left_out}, str(partial / "model.safetensors"))
    check.before(2)
    client.update_weights_from_disk(str(partial), "2")
    with pytest.raises(WeightSyncError, match=f"(?s)compare.*{left_out.replace('.', '[.]')}"):
        check.after(2)
    client.update_weights_from_disk(hf, "3")  # leave the shared server whole

    entries = [(n, torch.float32, tuple(t.shape)) for n, t in sorted(tensors.items())]
    check_against_checkpoint(ExportPlan(entries, [list(range(len(entries)))]), hf)
    bad = [("model.layers.0.mlp.gate_proj.weight", torch.float32, (3, 3)), *entries[1:]]
    bad[1] = (bad[1][0], bad[1][1], (1, 2))
    with pytest.raises(WeightSyncError, match=r"gate_proj.weight is sent but is not a tensor of the checkpoint; "
                                              rf"{entries[0][0].replace('.', '[.]')} .* never sent; .*: sent \[1, 2\]"):
        check_against_checkpoint(ExportPlan(bad, []), hf)


@pytest.mark.distributed
def test_rl_loop_on_sglang_servers(tmp_path):
    """rollout.backend=sglang at TP=2: two RL steps of the trajectory estimator on GRPO groups (n=2, temperature
    1) sampled by DareMegaDecoding on a (fake) SGLang server with the trainer's unmasking settings, each request
    sent once by the replica's first rank (the other gets its completions); each token's
    reveal step and log-prob from the trainer's replay (no token differs: the same float32 model), weights back
    through the disk transport; SGLang's weight checker around the first sync (snapshot, reset, compare); the
    server answers with the new version each step."""
    from conftest import torchrun

    from dare_mega.checkpoint.tiny import cached_tiny_checkpoint

    hf = cached_tiny_checkpoint("tiny-sdar-moe")
    servers = Servers(tmp_path)
    try:
        url = servers.start("rl", hf)
        servers.wait(url)
        common = ["--config", "configs/recipes/rl_tiny_sdar_moe.yaml", "rollout.backend=sglang",
                  f"sglang.urls=[{url}]", "sglang.transport=disk", "task.heldout=2", "eval.samples=1",
                  "rollout.prompts_per_step=2", "logging.progress=false", "checkpoint.every=1000"]
        proc = torchrun(2, ["-m", "dare_mega.trainer.rl", *common, f"run_dir={tmp_path / 'run'}", "train.steps=2",
                            "algorithm.estimator=trajectory", "rollout.n=2", "rollout.temperature=1.0",
                            "rollout.threshold=0.6", "parallel.tp=2"], timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "rollouts on SGLangEngine" in proc.stdout and "estimator trajectory replay" in proc.stdout
        steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["weight_version"] for r in steps] == [1, 2]
        assert all(r["replay_mismatch"] == 0 and r["replay_forwards"] >= 1 and r["time_replay"] > 0 for r in steps)
        assert all(r["rollout_train_gap"] <= 1e-5 for r in steps)  # the replay's log-probs are the trainer's
        calls = servers.calls(url)
        generated = [c["version"] for c in calls if c["route"] == "/generate"]
        assert {"0", "1", "2"} <= set(generated)  # held-out eval at 0, step 1 at 0... the final eval at 2
        assert calls[-1]["version"] == "2" and (tmp_path / "run" / "weights" / "v2").is_dir()
        checker = [c["body"]["action"] for c in calls if c["route"] == "/weights_checker"]
        assert checker == ["snapshot", "reset_tensors", "compare"]  # around the first sync only
        decoding = [c["body"] for c in calls
                    if c["route"] == "/generate" and c["body"]["sampling_params"].get("max_new_tokens", 0) > 1]
        # at TP=2 one rank of the replica asks, once per request: 2 steps x 4, and 2 held-out evaluations x 2 x 2
        assert sum(len(b["input_ids"]) for b in decoding) == 2 * 4 + 2 * 4
        claims = [b["sampling_params"]["custom_params"]["dare_mega"] for b in decoding]
        assert claims and all(c == {"block_size": 4, "mask_id": 259, "policy": "low_confidence_dynamic",
                                    "threshold": 0.6, "steps": None, "entropy_bound": 0.35, "eps": 1e-3,
                                    "alg_temp": 0.0} for c in claims)
    finally:
        servers.stop()
