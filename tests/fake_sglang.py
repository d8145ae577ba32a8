"""A loopback SGLang dLLM server for the tests, made of sglang 0.5.23's own pieces (a process, never a thread:
sglang's modules patch torch's CUDA reductions and need the stand-ins of tests/sglang_standins.py).

SGLang's code decides everything a request meets on its way in:
- the command line: SGLang's own parser (`prepare_server_args`), so an unknown flag exits 2 as
  `sglang.launch_server` does, and the dLLM block size and mask id come from `DllmConfig.from_server_args`
  (per-architecture defaults, `--dllm-algorithm-config`'s block_size; config.json's values ignored);
- request bodies: SGLang's request structs, validated as its FastAPI routes validate them (a malformed body is
  422 with FastAPI's `detail`), sampling parameters through SGLang's `SamplingParams(...).verify`;
- weights: `monkey_patch_torch_reductions` + `MultiprocessingSerializer.deserialize` of this server's own TP
  rank's entry, `FlattenedTensorBucket` (the tensor route's buckets and the receive buffer of the distributed
  route), `init_custom_process_group` for the update group, the session rules of SGLang's scheduler;
- `/weights_checker`: SGLang's `WeightChecker` (snapshot / reset_tensors / compare / checksum) over the model.
What is not SGLang's: the model is the checkpoint's tensors by HF name (loaded from --model-path; a name the
model does not have is skipped, as SGLang's loaders skip it, and logged in /_calls), and generation is the native
engine decoding greedily as LowConfidence does, with SGLang's block size and mask id.
`/health` answers 503 while the server starts (it imports SGLang and loads the model after listening), then
runs a one-token generation as SGLang's does.

    python tests/fake_sglang.py [test flags] <sglang.launch_server flags: --model-path DIR --port P ...>
Test flags: --fail ROUTE:CALL[:TIMES] (inject HTTP 500), --die-on-generate N [--die-once FILE].
Test-only routes: GET /_calls (every call, and the names skipped by loads), POST /_dump {"path"} (torch.save of
the model's tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.dirname(TESTS))

STRUCTS = {  # route -> SGLang's request struct (sglang/srt/entrypoints/http_server.py)
    "/generate": "GenerateReqInput", "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput", "/end_weight_update": "EndWeightUpdateReqInput",
    "/weights_checker": "CheckWeightsReqInput", "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
}


class Unprocessable(Exception):
    """A body SGLang's route would not accept (FastAPI answers 422)."""


def import_sglang() -> SimpleNamespace:
    import sglang_standins

    sglang_standins.install()
    import sglang.srt.dllm.config as dllm_config
    from pydantic import TypeAdapter
    from sglang.srt.dllm.algorithm import get_algorithm
    from sglang.srt.managers import io_struct
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.common import init_custom_process_group
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.utils.weight_checker import WeightChecker
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    return SimpleNamespace(io=io_struct, TypeAdapter=TypeAdapter, get_algorithm=get_algorithm, load_plugins=load_plugins, dllm_config=dllm_config, get_parallel=get_parallel,
                           SamplingParams=SamplingParams, prepare_server_args=prepare_server_args,
                           Serializer=MultiprocessingSerializer, init_custom_process_group=init_custom_process_group,
                           monkey_patch_torch_reductions=monkey_patch_torch_reductions, WeightChecker=WeightChecker,
                           Bucket=FlattenedTensorBucket, Metadata=FlattenedTensorMetadata)


def dllm_config_of(sg, server_args):
    """SGLang's DllmConfig.from_server_args. Its ModelConfig needs transformers to know the architecture (real
    checkpoints bring their modeling code); the tiny checkpoints have none, so only that lookup is replaced by
    the checkpoint's config.json."""
    config = json.load(open(os.path.join(server_args.model_path, "config.json")))

    class ConfigFromJson:
        @staticmethod
        def from_server_args(server_args, model_path=None, model_revision=None):
            return SimpleNamespace(hf_config=SimpleNamespace(**config), vocab_size=config["vocab_size"])

    original = sg.dllm_config.ModelConfig
    sg.dllm_config.ModelConfig = ConfigFromJson
    try:
        return sg.dllm_config.DllmConfig.from_server_args(server_args)
    finally:
        sg.dllm_config.ModelConfig = original


class CheckpointModel:
    """The engine's model as SGLang's WeightChecker and loaders see it: named tensors (HF names)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())

    def named_buffers(self):
        return iter(())

    def named_modules(self):
        return iter([("", self)])


class FakeSGLang:
    def __init__(self, argv: list[str], fail: dict, die_on_generate: int | None, die_once: str | None):
        self.argv, self.fail = argv, fail
        self.die_on_generate, self.die_once = die_on_generate, die_once
        self.calls: list[dict] = []
        self.counts: dict[str, int] = {}
        self.version = "default"
        self.paused = False
        self.session = None  # None, or "open" between begin_weight_update and end_weight_update
        self.groups: dict = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.startup_error: str | None = None

    # ---- start-up (after the port is open, as SGLang's /health answers 503 until it is ready) -------------
    def load(self) -> None:
        try:
            import torch
            from safetensors.torch import load_file

            from dare_mega.rollout.engine import NativeEngine

            self.sg = import_sglang()
            self.sg.load_plugins()  # SGLang's plugin loading: dare_mega's entry point registers DareMegaDecoding
            self.args = self.sg.prepare_server_args(self.argv)  # SGLang's parser: unknown flags exit 2
            self.dllm = dllm_config_of(self.sg, self.args)
            self.algorithm = self.sg.get_algorithm(self.dllm)
            self.tp = self.args.tp_size
            path = self.args.model_path
            self.tensors = {}
            for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
                self.tensors.update(load_file(os.path.join(path, name)))
            self.model = CheckpointModel(self.tensors)
            placement = dict(tp_rank=0, tp_size=self.tp, dp_rank=0, attn_dp_size=1, pp_rank=0, pp_size=1)
            with self.sg.get_parallel().override(**placement):
                self.checker = self.sg.WeightChecker(get_model=lambda: self.model)
            if not torch.cuda.is_available():  # SGLang's comparator moves each chunk to the GPU it runs on
                torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
            self.engine = NativeEngine.from_pretrained(path, device="cpu")
            # decode with the block size and mask id SGLang would use, whatever config.json says
            diffusion = self.engine.args.diffusion
            import dataclasses

            self.mask_id = getattr(self.algorithm, "model_mask_id", self.dllm.mask_id)
            self.engine.args = dataclasses.replace(self.engine.args, diffusion=dataclasses.replace(
                diffusion, mask_token_id=self.mask_id))
            self.torch = torch
            self.ready.set()
        except SystemExit as e:  # SGLang's parser refused the command line
            self.startup_error = f"sglang's argument parser exited with {e.code}"
            os._exit(2)
        except Exception:  # noqa: BLE001 - the process dies as a server that cannot start does
            traceback.print_exc()
            os._exit(1)

    # ---- routes ----------------------------------------------------------------------------------------
    def _record(self, route: str, body) -> int:
        with self.lock:
            self.counts[route] = self.counts.get(route, 0) + 1
            summary = {k: v for k, v in (body or {}).items() if k != "serialized_named_tensors"}
            if body and "serialized_named_tensors" in body:
                summary["payloads"] = len(body["serialized_named_tensors"])
            self.calls.append({"route": route, "body": summary, "version": self.version})
            return self.counts[route]

    def _parse(self, route: str, raw: bytes):
        """The body as SGLang's route receives it: its struct, validated from JSON (None for routes without)."""
        name = STRUCTS.get(route)
        if name is None:
            return None
        try:
            return self.sg.TypeAdapter(getattr(self.sg.io, name)).validate_json(raw or b"{}")
        except Exception as e:  # pydantic's ValidationError: FastAPI's 422
            errors = e.errors(include_url=False) if hasattr(e, "errors") else [{"msg": str(e)}]
            raise Unprocessable(json.loads(json.dumps(errors, default=str))) from e

    def handle(self, method: str, route: str, raw: bytes):
        body = json.loads(raw) if raw else None
        count = self._record(route, body)
        spec = self.fail.get(route)
        if spec and spec[0] <= count < spec[0] + spec[1]:
            return 500, {"error": {"message": f"injected failure of {route} call {count}"}}
        if route == "/_calls":
            return 200, self.calls
        if not self.ready.is_set():
            return 503, {"error": {"message": "the server is starting"}}
        try:
            obj = self._parse(route, raw)
        except Unprocessable as e:
            return 422, {"detail": e.args[0]}
        handler = getattr(self, "route_" + route.strip("/"), None)
        if handler is None:
            return 404, {"detail": "Not Found"}
        return handler(obj) if obj is not None else handler(body)

    def route_health(self, _):
        try:
            self._decode([[1]], self.sg.SamplingParams(max_new_tokens=1, temperature=0.0))
        except Exception as e:  # noqa: BLE001
            return 503, {"error": {"message": f"health probe failed: {e}"}}
        return 200, None

    def route_model_info(self, _):
        return 200, {"model_path": self.args.model_path, "weight_version": self.version, "is_generation": True}

    def route_server_info(self, _):
        fields = ("model_path", "tp_size", "dllm_algorithm", "dllm_algorithm_config", "max_running_requests",
                  "port", "host")
        return 200, {**{k: getattr(self.args, k) for k in fields}, "launch_command": " ".join(self.argv),
                     "internal_states": [{}]}

    def route_flush_cache(self, _):
        return 200, "Cache flushed.\nPlease check backend logs for more details. (When there are running or " \
                    "waiting requests, the operation will not be performed.)\n"

    def route_pause_generation(self, obj):
        self.paused = True
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def route_continue_generation(self, obj):
        self.paused = False
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    # the session rules of sglang/srt/managers/scheduler_components/weight_updater.py
    def route_begin_weight_update(self, obj):
        if self.session is not None:
            return 400, {"success": False, "message": "a weight-update session is already open; "
                         "call end_weight_update() first"}
        self.session = "open"
        return 200, {"success": True, "message": "Success"}

    def route_end_weight_update(self, obj):
        if self.session is None:
            return 400, {"success": False, "message": "no weight-update session is open; call "
                         "begin_weight_update() first"}
        self.session = None
        return 200, {"success": True, "message": "Success"}

    def _outside_session(self, route: str):
        return 400, {"success": False, "message": f"{route} must run between begin_weight_update() and "
                     "end_weight_update()"}

    def _load(self, named, version) -> None:
        """The model's load_weights: known names are copied in (a shape mismatch fails as SGLang's weight
        loaders do), unknown names are skipped."""
        skipped = []
        for name, tensor in named:
            target = self.tensors.get(name)
            if target is None:
                skipped.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: loaded shape {tuple(tensor.shape)} != parameter {tuple(target.shape)}")
            target.copy_(tensor)
        with self.lock:
            self.calls[-1]["skipped"] = skipped
        self.engine.load_weights([(n, t.clone()) for n, t in named if n in self.tensors])
        if version is not None:
            self.version = version

    def route_update_weights_from_tensor(self, obj):
        if self.session is None:
            return self._outside_session("update_weights_from_tensor")
        if len(obj.serialized_named_tensors) < self.tp:
            return 400, {"success": False, "message": f"{len(obj.serialized_named_tensors)} payloads for "
                         f"tp_size {self.tp}"}
        self.sg.monkey_patch_torch_reductions()
        decoded = []
        try:
            for rank in range(self.tp):  # each TP rank deserializes only its own entry
                data = self.sg.Serializer.deserialize(obj.serialized_named_tensors[rank])
                if obj.load_format == "flattened_bucket":
                    metadata = [self.sg.Metadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                                 end_idx=m.end_idx, numel=m.numel) for m in data["metadata"]]
                    named = self.sg.Bucket(flattened_tensor=data["flattened_tensor"],
                                           metadata=metadata).reconstruct_tensors()
                else:
                    named = list(data)
                decoded.append([(n, t.clone()) for n, t in named])
            for other in decoded[1:]:
                if [n for n, _ in other] != [n for n, _ in decoded[0]] or any(
                        not self.torch.equal(a, b) for (_, a), (_, b) in zip(other, decoded[0])):
                    return 400, {"success": False, "message": "TP ranks received different weights"}
            self._load(decoded[0], obj.weight_version)
        except Exception as e:  # noqa: BLE001 - as the scheduler reports a failed load
            return 400, {"success": False, "message": f"Failed to update parameter online: {e}"}
        return 200, {"success": True, "message": "Success"}

    def route_init_weights_update_group(self, obj):
        import datetime

        try:
            group = self.sg.init_custom_process_group(
                backend=obj.backend, init_method=f"tcp://{obj.master_address}:{obj.master_port}",
                timeout=datetime.timedelta(seconds=300), world_size=obj.world_size, rank=obj.rank_offset,
                group_name=obj.group_name)
        except Exception as e:  # noqa: BLE001
            return 400, {"success": False, "message": f"Failed to init group: {e}."}
        self.groups[obj.group_name] = group
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def route_destroy_weights_update_group(self, obj):
        if self.groups.pop(obj.group_name, None) is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def route_update_weights_from_distributed(self, obj):
        import torch.distributed as dist

        if self.session is None:
            return self._outside_session("update_weights_from_distributed")
        if obj.group_name not in self.groups:
            return 400, {"success": False, "message": f"Group {obj.group_name} not in {list(self.groups)}. "
                         "Please call `init_weights_update_group` first."}
        try:
            if obj.load_format == "flattened_bucket":
                bucket = self.sg.Bucket.empty(obj.names, obj.dtypes, obj.shapes, "cpu")
                dist.broadcast(bucket.get_flattened_tensor(), src=0, group=self.groups[obj.group_name])
                named = bucket.reconstruct_tensors()
            else:
                named = []
                for name, dtype, shape in zip(obj.names, obj.dtypes, obj.shapes):
                    tensor = self.torch.empty(shape, dtype=getattr(self.torch, dtype))
                    dist.broadcast(tensor, src=0, group=self.groups[obj.group_name])
                    named.append((name, tensor))
            self._load(named, obj.weight_version)
        except Exception as e:  # noqa: BLE001
            return 400, {"success": False, "message": f"Failed to receive weights: {e}"}
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def route_update_weights_from_disk(self, obj):
        from safetensors.torch import load_file

        path = obj.model_path
        try:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            named = [item for f in files for item in load_file(os.path.join(path, f)).items()]
            self._load(named, obj.weight_version)
        except Exception as e:  # noqa: BLE001
            return 400, {"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}
        return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def route_get_weights_by_name(self, body):
        # SGLang's SDAR, SDAR-MoE and LLaDA2 models do not implement it
        return 400, {"error": {"message": "Get parameter by name failed"}}

    def route_weights_checker(self, obj):
        try:
            with self.torch.no_grad():
                payload = self.checker.handle(obj.action, obj.allow_quant_error, obj.skip_tensor_list,
                                              role="target")
        except Exception as e:  # noqa: BLE001 - SGLang answers 400 with the checker's message
            return 400, {"success": False, "message": str(e)}
        body = {"success": True, "message": "Success."}
        if payload is not None:
            import hashlib

            body["ranks"] = [payload]
            body["per_engine_checksum"] = hashlib.sha256(payload["per_gpu_checksum"].encode()).hexdigest()
        return 200, body

    def route_generate(self, obj):
        count = self.counts["/generate"]
        if self.die_on_generate is not None and count >= self.die_on_generate:
            if self.die_once is None or not os.path.exists(self.die_once):
                if self.die_once:
                    open(self.die_once, "w").close()
                os._exit(1)  # the server process dies mid-rollout (once, with --die-once FILE)
        obj.normalize_batch_and_arguments()
        prompts = [obj.input_ids] if obj.is_single else list(obj.input_ids)
        per_prompt = obj.sampling_params if isinstance(obj.sampling_params, list) else \
            [obj.sampling_params or {}] * len(prompts)
        rids = [obj.rid] if obj.is_single else list(obj.rid or [None] * len(prompts))
        try:
            params = []
            for sp in per_prompt:
                parsed = self.sg.SamplingParams(**(sp or {}))
                parsed.verify(self.engine.args.vocab_size)
                params.append(parsed)
        except Exception as e:  # noqa: BLE001 - SGLang answers 400 with the reason
            return 400, {"error": {"message": f"{type(e).__name__}: {e}"}}
        for sp, rid in zip(params, rids):  # the scheduler's validate_dllm_request: an abort with status 400
            error = type(self.algorithm).validate_request(SimpleNamespace(sampling_params=sp, dllm_config=self.dllm,
                                                                          rid=rid))
            if error:
                return 400, {"error": {"message": error}}
        out = []
        for prompt, sp, rid in zip(prompts, params, rids):
            completion = self._decode([prompt], sp, rid)[0]
            out.append({"text": completion.text, "output_ids": completion.completion_ids,
                        "meta_info": {"id": rid, "finish_reason": {"type": completion.finish_reason},
                                      "completion_tokens": len(completion.completion_ids),
                                      "weight_version": self.version}})
        return 200, out[0] if obj.is_single else out

    def _decode(self, prompts, sp, rid=None):
        """What the served algorithm decodes: DareMegaDecoding samples as the native engine does (the same
        function, tests/test_sglang_algorithm.py); SGLang's own algorithms take the argmax with a threshold."""
        from dare_mega.rollout.sglang_algorithm import DareMegaDecoding, request_seed, unmasking
        from dare_mega.rollout.types import SamplingParams

        stops = tuple(sp.stop_token_ids) if sp.stop_token_ids else None
        common = dict(max_new_tokens=sp.max_new_tokens, block_size=self.dllm.block_size, stop_token_ids=stops)
        if isinstance(self.algorithm, DareMegaDecoding):
            greedy = sp.top_k == 1
            options = unmasking(DareMegaDecoding.claimed.get(rid, {}), self.algorithm.options, "request")
            params = SamplingParams(**common, **options, temperature=0.0 if greedy else sp.temperature,
                                    top_p=sp.top_p, top_k=0 if greedy or sp.top_k >= 1 << 30 else sp.top_k,
                                    seeds=(request_seed(rid or ""),))
        else:
            threshold = float(getattr(self.algorithm, "threshold", 0.95))
            params = SamplingParams(**common, temperature=0.0, threshold=threshold)
        return self.engine.generate(prompts, params)

    def route__dump(self, body):
        self.torch.save(dict(self.tensors), body["path"])
        return 200, {"success": True}


def handler_for(fake: FakeSGLang):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                status, payload = fake.handle(method, self.path.split("?")[0], raw)
            except Exception as e:  # noqa: BLE001 - an unexpected failure is a 500, as in any server
                traceback.print_exc()
                status, payload = 500, {"error": {"message": f"{type(e).__name__}: {e}"}}
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

    return Handler


# ---- for the tests: fake servers as processes ------------------------------------------------------------
def serving_flags(model_path: str, directory: str, algorithm: str = "DareMegaDecoding", **settings) -> list[str]:
    """The flags SGLangEngine would launch a server with for this model (its --dllm-algorithm-config file
    written under `directory`)."""
    import yaml

    from dare_mega.models.builder import load_model_args
    from dare_mega.rollout.sglang_engine import SGLangServerConfig

    config = SGLangServerConfig.for_model(model_path, load_model_args(model_path), dllm_algorithm=algorithm,
                                          dllm_config=settings)
    path = os.path.join(directory, f"dllm-{algorithm}-{abs(hash((model_path, tuple(settings.items()))))}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config.algorithm_config(), f)
    return ["--model-path", model_path, "--dllm-algorithm", algorithm, "--dllm-algorithm-config", path]


class Servers:
    """Fake SGLang servers as processes: `start(name, model_path, *flags)` returns the URL; `wait(*urls)` until
    healthy; `calls(url)`; `stop()`. Each server imports sglang (~10 s on 2 cores): start them together."""

    def __init__(self, directory: str):
        self.directory, self.procs, self.urls = str(directory), {}, {}

    def start(self, name: str, model_path: str, *flags: str, algorithm: str = "DareMegaDecoding",
              **settings) -> str:
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, os.path.join(TESTS, "fake_sglang.py"), "--port", str(port), *flags,
                   *serving_flags(model_path, self.directory, algorithm, **settings)]
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        log = open(os.path.join(self.directory, f"server-{name}.log"), "w")
        self.procs[name] = subprocess.Popen(command, env={**env, "OMP_NUM_THREADS": "1"}, stdout=log,
                                            stderr=subprocess.STDOUT)
        self.urls[name] = f"http://127.0.0.1:{port}"
        return self.urls[name]

    def wait(self, *urls: str, timeout: float = 240) -> None:
        import time

        from dare_mega.rollout.sglang_client import SGLangClient

        deadline = time.time() + timeout
        for url in urls or tuple(self.urls.values()):
            name = next(n for n, u in self.urls.items() if u == url)
            while not SGLangClient(url).healthy(timeout=5):
                if self.procs[name].poll() is not None:
                    log = open(os.path.join(self.directory, f"server-{name}.log")).read()
                    raise AssertionError(f"fake SGLang server {name} exited with {self.procs[name].returncode}:\n"
                                         f"{log[-3000:]}")
                assert time.time() < deadline, f"{url} did not come up"
                time.sleep(0.3)

    def calls(self, url: str) -> list[dict]:
        import requests

        return requests.get(url + "/_calls", timeout=60).json()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


def main():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--fail", action="append", default=[])
    p.add_argument("--die-on-generate", type=int)
    p.add_argument("--die-once")
    own, sglang_argv = p.parse_known_args()
    fail = {}
    for spec in own.fail:
        route, call, *times = spec.split(":")
        fail[route] = [int(call), int(times[0]) if times else 1]
    port = int(sglang_argv[sglang_argv.index("--port") + 1]) if "--port" in sglang_argv else 30000
    fake = FakeSGLang(sglang_argv, fail, own.die_on_generate, own.die_once)
    server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(fake))
    threading.Thread(target=fake.load, daemon=True).start()
    print(f"fake sglang on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
