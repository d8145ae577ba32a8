"""A loopback stand-in for an SGLang dLLM server: the documented routes of sglang 0.5.23 (generate, health,
model_info, flush_cache, pause/continue, the weight-update session, update_weights_from_tensor / _distributed /
_disk, init/destroy_weights_update_group), recording every call.

Weights that arrive are decoded as SGLang decodes them (allowlisted unpickling, flattened buckets, one
payload per TP rank, a broadcast in the update group) and kept by HF name; with a model directory the server
also generates with the native engine under them (as SGLang's dLLM LowConfidence would, greedily).

Runs in a thread (`FakeSGLang(...).start()`) or as a process:
  python tests/fake_sglang.py --port P [--hf DIR | --model-path DIR] [--tp-size N] [--fail ROUTE:CALL[:TIMES]]
                              [--die-on-generate N [--die-once FILE]]   (other SGLang flags are ignored)
Test-only routes: GET /_calls (the log), POST /_dump {"path"} (torch.save of the received weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeSGLang:
    def __init__(self, port: int = 0, hf: str | None = None, tp: int = 1, fail: dict | None = None,
                 die_on_generate: int | None = None, version: str = "default", die_once: str | None = None):
        self.tp, self.hf, self.version = tp, hf, version
        self.fail = dict(fail or {})  # route -> [call number that fails (1-based), times]
        self.die_on_generate, self.die_once = die_on_generate, die_once
        self.calls: list[dict] = []
        self.counts: dict[str, int] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.paused = False
        self.session = False
        self.groups: dict = {}
        self.lock = threading.Lock()
        self.engine = None
        if hf:
            from dare_mega.rollout.engine import NativeEngine

            self.engine = NativeEngine.from_pretrained(hf)
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeSGLang":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- routes ----------------------------------------------------------------------------------------
    def _record(self, route: str, body) -> int:
        with self.lock:
            self.counts[route] = self.counts.get(route, 0) + 1
            summary = {k: v for k, v in (body or {}).items() if k != "serialized_named_tensors"}
            if body and "serialized_named_tensors" in body:
                summary["payloads"] = len(body["serialized_named_tensors"])
            self.calls.append({"route": route, "body": summary, "version": self.version})
            return self.counts[route]

    def _should_fail(self, route: str, count: int) -> bool:
        spec = self.fail.get(route)
        if spec and spec[0] <= count < spec[0] + spec[1]:
            return True
        return False

    def handle(self, method: str, route: str, body: dict | None, query: dict):
        count = self._record(route, body)
        if self._should_fail(route, count):
            return 500, {"error": {"message": f"injected failure of {route} call {count}"}}
        if route == "/health":
            return 200, None
        if route == "/model_info":
            return 200, {"model_path": self.hf, "weight_version": self.version, "is_generation": True}
        if route == "/generate":
            return self._generate(body)
        if route == "/flush_cache":
            return 200, "Cache flushed."
        if route == "/pause_generation":
            self.paused = True
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if route == "/continue_generation":
            self.paused = False
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if route == "/begin_weight_update":
            if self.session:
                return 400, {"success": False, "message": "a weight-update session is already open"}
            self.session = True
            return 200, {"success": True, "message": ""}
        if route == "/end_weight_update":
            self.session = False
            return 200, {"success": True, "message": ""}
        if route == "/update_weights_from_tensor":
            return self._from_tensor(body)
        if route == "/init_weights_update_group":
            return self._init_group(body)
        if route == "/destroy_weights_update_group":
            group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
            if group is None:
                return 400, {"success": False, "message": "The group to be destroyed does not exist."}
            return 200, {"success": True, "message": ""}
        if route == "/update_weights_from_distributed":
            return self._from_distributed(body)
        if route == "/update_weights_from_disk":
            return self._from_disk(body)
        if route == "/get_weights_by_name":
            tensor = self.weights.get(body["name"])
            if tensor is None:
                return 400, {"error": {"message": f"no parameter {body['name']}"}}
            return 200, tensor.flatten()[: body.get("truncate_size", 100)].tolist()
        if route == "/_calls":
            return 200, self.calls
        if route == "/_dump":
            torch.save(dict(self.weights), body["path"])
            return 200, {"success": True}
        return 404, {"detail": "Not Found"}

    def _store(self, named, version):
        for name, tensor in named:
            self.weights[name] = tensor.clone()
        if self.engine is not None:
            self.engine.load_weights([(n, t.clone()) for n, t in named])
        if version is not None:
            self.version = str(version)

    def _from_tensor(self, body):
        from dare_mega.weight_sync.wire import deserialize, unflatten

        if not self.session:
            return 400, {"success": False, "message": "update_weights_from_tensor must run between "
                         "begin_weight_update() and end_weight_update()"}
        payloads = body["serialized_named_tensors"]
        if len(payloads) < self.tp:
            return 400, {"success": False, "message": f"{len(payloads)} payloads for tp_size {self.tp}"}
        decoded = []
        for rank in range(self.tp):  # each TP rank opens its own entry
            obj = deserialize(payloads[rank])
            named = unflatten(obj) if body.get("load_format") == "flattened_bucket" else list(obj)
            decoded.append([(n, t.clone()) for n, t in named])
        for other in decoded[1:]:
            if [n for n, _ in other] != [n for n, _ in decoded[0]] or any(
                    not torch.equal(a, b) for (_, a), (_, b) in zip(other, decoded[0])):
                return 400, {"success": False, "message": "TP ranks received different weights"}
        self._store(decoded[0], body.get("weight_version"))
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def _init_group(self, body):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from dare_mega.weight_sync.transports import custom_process_group

        name = body.get("group_name", "weight_update_group")
        self.groups[name] = custom_process_group(body.get("backend", "nccl"), body["master_address"],
                                                 body["master_port"], body["world_size"], body["rank_offset"], name)
        return 200, {"success": True, "message": ""}

    def _from_distributed(self, body):
        import torch.distributed as dist

        from dare_mega.weight_sync.wire import unflatten

        if not self.session:
            return 400, {"success": False, "message": "update_weights_from_distributed must run between "
                         "begin_weight_update() and end_weight_update()"}
        group = self.groups[body.get("group_name", "weight_update_group")]
        dtypes = [getattr(torch, d) for d in body["dtypes"]]
        metadata, start = [], 0
        import types

        for name, dtype, shape in zip(body["names"], dtypes, body["shapes"]):
            size = torch.empty((), dtype=dtype).element_size()
            nbytes = size * int(torch.tensor(shape).prod().item()) if shape else size
            if start % size:
                return 400, {"success": False, "message": f"Unaligned received tensor {name}"}
            metadata.append(types.SimpleNamespace(name=name, shape=torch.Size(shape), dtype=dtype, start_idx=start,
                                                  end_idx=start + nbytes, numel=nbytes))
            start += nbytes
        flat = torch.empty(start, dtype=torch.uint8)
        dist.broadcast(flat, src=0, group=group)
        self._store(unflatten({"flattened_tensor": flat, "metadata": metadata}), body.get("weight_version"))
        return 200, {"success": True, "message": ""}

    def _from_disk(self, body):
        from safetensors.torch import load_file

        path = body["model_path"]
        index = os.path.join(path, "model.safetensors.index.json")
        files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else \
            [f for f in os.listdir(path) if f.endswith(".safetensors")]
        named = [item for f in files for item in load_file(os.path.join(path, f)).items()]
        self._store(named, body.get("weight_version"))
        return 200, {"success": True, "message": "", "num_paused_requests": 0}

    def _generate(self, body):
        from dare_mega.rollout.types import SamplingParams

        count = self.counts["/generate"]
        if self.die_on_generate is not None and count >= self.die_on_generate:
            if self.die_once is None or not os.path.exists(self.die_once):
                if self.die_once:
                    open(self.die_once, "w").close()
                os._exit(1)  # the server process dies mid-rollout (once, with --die-once FILE)
        if self.engine is None:
            return 400, {"error": {"message": "no model loaded"}}
        prompts = body["input_ids"]
        single = prompts and isinstance(prompts[0], int)
        prompts = [prompts] if single else prompts
        sp = body.get("sampling_params") or {}
        sp = sp[0] if isinstance(sp, list) else sp
        stops = sp.get("stop_token_ids")  # LowConfidence: greedy, threshold 0.95, whatever the temperature
        params = SamplingParams(max_new_tokens=sp.get("max_new_tokens", 128), temperature=0.0, threshold=0.95,
                                stop_token_ids=tuple(stops) if stops else None)
        out = []
        for c in self.engine.generate(prompts, params):
            out.append({"text": c.text, "output_ids": c.completion_ids,
                        "meta_info": {"finish_reason": {"type": c.finish_reason},
                                      "completion_tokens": len(c.completion_ids), "weight_version": self.version}})
        return 200, out[0] if single else out

    # ---- HTTP plumbing ---------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, method):
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                try:
                    status, payload = fake.handle(method, parsed.path, body, parse_qs(parsed.query))
                except Exception as e:  # noqa: BLE001 - the server answers as SGLang does
                    status, payload = 400, {"error": {"message": f"{type(e).__name__}: {e}"}}
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hf")
    p.add_argument("--model-path")  # what the SGLang launcher passes
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--fail", action="append", default=[])
    p.add_argument("--die-on-generate", type=int)
    p.add_argument("--die-once")
    options, _ = p.parse_known_args()
    fail = {}
    for spec in options.fail:
        route, call, *times = spec.split(":")
        fail[route] = [int(call), int(times[0]) if times else 1]
    server = FakeSGLang(options.port, options.hf or options.model_path, options.tp_size, fail, options.die_on_generate,
                        die_once=options.die_once)
    print(f"fake sglang on {server.url}", flush=True)
    server.server.serve_forever()


if __name__ == "__main__":
    main()
