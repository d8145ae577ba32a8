#!/usr/bin/env python
"""CUDA-IPC weight sync, end to end: trainer shards -> ColocatedTensorTransport -> an engine in another process.

    python benchmarks/cuda_ipc_check.py [--layers 2] [--experts 8] [--hidden 512] [--bucket-mb 64] [--versions 2]

This process is the trainer (one rank, TP=1; NCCL on a GPU, gloo without): it builds an SDAR-MoE from a
checkpoint it makes, exports it in buckets and pushes each bucket through the colocated SGLang transport
(dare_mega/weight_sync/transports.py): a flattened uint8 bucket on the GPU, serialized with torch's
ForkingPickler, so the payload carries CUDA-IPC handles, not the bytes. The receiver is the loopback SGLang
stand-in of the tests (tests/fake_sglang.py) started as a separate process: it decodes the payload with
SGLang's own code (monkey_patch_torch_reductions, MultiprocessingSerializer, FlattenedTensorBucket; sglang must be
importable: the Docker image, or `pip install --no-deps sglang==0.5.23` with the test extra), which maps the
trainer's GPU memory through the handle's GPU UUID, and keeps a copy of every tensor. SGLang's weight checker
(snapshot, reset, compare) wraps the first sync. After each sync the receiver dumps what it holds (POST /_dump) and every tensor is compared
bit-exactly (dtype, shape, values) with what the exporter produced. Before each version every weight is moved
by a name-dependent amount, so each sync carries new numbers.

Checks, each of which fails the run (exit status 1, last line FAIL):
  - on a GPU, the serialized payload holds CUDA-IPC handles (torch's rebuild_cuda_tensor), and the receiver's
    tensors are CUDA tensors (opened from the handles, not sent by value);
  - every tensor of every version arrives bit-exactly, and the receiver reports the new weight version;
  - the comparison itself can fail: one element changed by one ulp is reported as a mismatch.
Timing: seconds per sync (export + serialize + HTTP + the receiver's decode and copy), GB/s. Result:
benchmarks/results/cuda_ipc-<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def model_config(layers: int, experts: int, hidden: int) -> dict:
    from _models import small_sdar_moe

    return small_sdar_moe(hidden_size=hidden, num_hidden_layers=layers, num_experts=experts,
                          intermediate_size=2 * hidden, moe_intermediate_size=hidden, vocab_size=32768)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offset(name: str, salt: str) -> float:
    return int(hashlib.sha256((salt + name).encode()).hexdigest()[:6], 16) / 2**24 - 0.5


def mismatches(got: dict, expected: dict) -> list[str]:
    import torch

    bad = sorted(set(got) ^ set(expected))
    for name in sorted(set(got) & set(expected)):
        a, b = got[name], expected[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            bad.append(name)
    return bad


def start_receiver(port: int, log_path: str, model: str) -> subprocess.Popen:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from fake_sglang import serving_flags

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fake_sglang.py"), "--port", str(port),
                             *serving_flags(model, os.path.dirname(log_path))],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--versions", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()

    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        print("FAIL: sglang is not importable, and the receiver decodes with SGLang's own code: install it "
              "(`pip install --no-deps sglang==0.5.23` with the test extra, or use the Docker image)")
        return 1
    import requests
    import torch

    from dare_mega.checkpoint.tiny import make_tiny_checkpoint
    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.hf_loader import megatron_tensors, unwrap
    from dare_mega.parallel import ParallelLayout, destroy_distributed, init_distributed, init_model_parallel
    from dare_mega.rollout.sglang_client import SGLangClient
    from dare_mega.weight_sync.export import WeightExporter
    from dare_mega.weight_sync.sync import SGLangWeightCheck, WeightSync
    from dare_mega.weight_sync.transports import ColocatedTensorTransport
    from dare_mega.weight_sync.wire import flatten, serialize

    on_gpu = torch.cuda.is_available()
    failures: list[str] = []
    workdir = tempfile.mkdtemp(prefix="cuda_ipc_")
    port = free_port()
    receiver = None
    url = f"http://127.0.0.1:{port}"
    result = {"benchmark": "cuda_ipc", "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "syncs": []}
    try:
        hf = make_tiny_checkpoint(os.path.join(workdir, "model"), preset=model_config(args.layers, args.experts,
                                  args.hidden), max_shard_bytes=1 << 30)
        receiver = start_receiver(port, os.path.join(workdir, "receiver.log"), hf)
        env = init_distributed()
        init_model_parallel(ParallelLayout())
        chunks, model_args = build_from_hf(hf, ParallelLayout())
        table = mapping_for(model_args)
        exporter = WeightExporter(chunks, model_args, table, int(args.bucket_mb * 1024**2))
        result.update(backend=env.backend, model_bytes=exporter.plan.total_bytes,
                      buckets=len(exporter.plan.buckets), tensors=len(exporter.plan.entries))
        print(f"trainer: {env.backend} on {env.device}; model {exporter.plan.total_bytes / 1e6:.1f} MB in "
              f"{len(exporter.plan.buckets)} buckets, {len(exporter.plan.entries)} tensors", flush=True)

        # what goes on the wire: CUDA-IPC handles on a GPU (by value on a CPU); probed with the smallest tensor
        # of bucket 0 (a handle nobody opens keeps its memory until exit: torch's CUDA-IPC reference counting)
        first = next(iter(exporter.buckets("all")))
        probe = [min(first.tensors, key=lambda item: item[1].numel())]
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        raw = base64.b64decode(serialize(flatten(probe, device=device)))
        ipc = b"rebuild_cuda_tensor" in raw
        nbytes = probe[0][1].numel() * probe[0][1].element_size()
        result.update(probe_payload_bytes=len(raw), probe_tensor_bytes=nbytes, payload_has_cuda_ipc_handles=ipc)
        print(f"payload of {probe[0][0]}: {len(raw)} bytes for {nbytes} bytes of tensor, CUDA-IPC handles: {ipc}",
              flush=True)
        if on_gpu and not ipc:
            failures.append("the payload holds no CUDA-IPC handles")
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid) if on_gpu else None
        result["payload_names_gpu_uuid"] = bool(uuid) and uuid.encode() in raw
        if on_gpu and not result["payload_names_gpu_uuid"]:
            failures.append(f"the payload's CUDA handle does not name the GPU by its UUID {uuid}")
        del first, probe, raw

        client = SGLangClient(url, timeout=300)
        deadline = time.time() + 300
        while not client.healthy(timeout=5):
            if receiver.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the receiver at {url} did not come up (exit status {receiver.poll()})")
            time.sleep(0.2)
        transport = ColocatedTensorTransport([client], [[0]])
        # the weights move before every version, so the checked first sync is a repeated one
        sync = WeightSync(exporter, transport, retries=0, check=SGLangWeightCheck([client], resync=True))
        for version in range(1, args.versions + 1):
            with torch.no_grad():
                for chunk in chunks:
                    for name, _, tensor in megatron_tensors(unwrap(chunk), table):
                        tensor.add_(offset(name, f"v{version}"))
            expected = {n: t.clone() for b in exporter.buckets("all") for n, t in b.tensors}
            if on_gpu:
                torch.cuda.synchronize()
            report = sync.sync(version)
            dump = os.path.join(workdir, f"received-{version}.pt")
            requests.post(url + "/_dump", json={"path": dump}, timeout=300).raise_for_status()
            got = torch.load(dump, weights_only=True)  # tensors come back on the device the receiver held them on
            os.remove(dump)
            devices = sorted({t.device.type for t in got.values()})
            bad = mismatches(got, expected)
            reported = client.weight_version()
            row = {**report, "tensors_received": len(got), "mismatched": len(bad), "receiver_devices": devices,
                   "receiver_version": reported}
            result["syncs"].append(row)
            print(f"version {version}: {report['seconds']:.3f} s, {report['gb_per_s']:.2f} GB/s, "
                  f"{len(got)} tensors on {devices} in the receiver, {len(bad)} mismatched, receiver reports "
                  f"version {reported}", flush=True)
            if bad:
                failures.append(f"version {version}: {len(bad)} tensors differ, e.g. {bad[:3]}")
            if len(got) != len(expected):
                failures.append(f"version {version}: {len(got)} tensors received, {len(expected)} expected")
            if reported != str(version):
                failures.append(f"version {version}: the receiver reports version {reported}")
            if on_gpu and devices != ["cuda"]:
                failures.append(f"version {version}: the receiver holds tensors on {devices}, not CUDA")
            # negative control: the comparison notices a one-ulp change in one element
            name = max(got.items(), key=lambda item: item[1].numel())[0]
            tampered = dict(got)
            flat = got[name].clone().view(-1)
            bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
            bits[0] ^= 1  # the lowest bit of the first element
            tampered[name] = flat.view(got[name].shape)
            if mismatches(tampered, expected) != [name]:
                failures.append("the comparison did not notice a one-ulp change")
            del got, tampered, expected
        result["control_detects_one_ulp"] = "the comparison did not notice a one-ulp change" not in failures
        destroy_distributed()
    except Exception as e:  # noqa: BLE001 - reported as a failure of the check
        import traceback

        traceback.print_exc()
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        if receiver is not None:
            receiver.terminate()
            try:
                receiver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                receiver.kill()
        log_path = os.path.join(workdir, "receiver.log")
        log = open(log_path).read() if os.path.exists(log_path) else ""
        if failures and log.strip():
            print("receiver log (tail):\n" + log[-3000:], flush=True)
    result["failures"] = failures
    result["passed"] = not failures
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"cuda_ipc-{'cuda' if on_gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    timing = ", ".join(f"v{r['version']} {r['seconds']:.3f} s ({r['gb_per_s']:.2f} GB/s)" for r in result["syncs"])
    print(f"wrote {out}")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    mode = "CUDA-IPC" if on_gpu else "by value (no GPU)"
    print(f"PASS: {len(result['syncs'])} syncs of {result['tensors']} tensors ({result['model_bytes'] / 1e6:.1f} MB) "
          f"bit-exact through the colocated transport, {mode}, to another process; {timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
