"""Weight syncs from a Megatron model at one layout to (fake) SGLang servers through each transport (torchrun).

argv: a JSON spec {"hf", "layout", "bucket_bytes", "root", "cases": [{"name", "kind", "urls", ...}]}, then the
output path. Before each case every tensor is moved by an amount that depends on its name and the case, so
each sync carries new weights; rank 0 saves what the exporter produced (the expected HF weights) and the
sync reports. kinds: colocated (engine_ranks), distributed (engine_tp, port), disk (dir).
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from _common import finish


def offset(name: str, salt: str) -> float:
    return int(hashlib.sha256((salt + name).encode()).hexdigest()[:6], 16) / 2**24 - 0.5


def run(env, spec: dict) -> list[dict]:
    """The cases of `spec` in this launch (torch.distributed already up); the reports of each case."""
    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.hf_loader import megatron_tensors, unwrap
    from dare_mega.parallel import ParallelLayout, init_model_parallel
    from dare_mega.rollout.sglang_client import SGLangClient
    from dare_mega.weight_sync.export import WeightExporter
    from dare_mega.weight_sync.sync import SGLangWeightCheck, WeightSync, check_against_checkpoint
    from dare_mega.weight_sync.transports import ColocatedTensorTransport, DiskTransport, DistributedTransport

    layout = ParallelLayout(**spec["layout"])
    init_model_parallel(layout)
    chunks, args = build_from_hf(spec["hf"], layout)
    table = mapping_for(args)
    exporter = WeightExporter(chunks, args, table, spec["bucket_bytes"])
    results = []
    for case in spec["cases"]:
        clients = [SGLangClient(url, timeout=120) for url in case["urls"]]
        if case["kind"] == "colocated":
            transport = ColocatedTensorTransport(clients, case["engine_ranks"])
        elif case["kind"] == "distributed":
            transport = DistributedTransport(clients, case["engine_tp"], "127.0.0.1", case["port"], backend="gloo")
        else:
            transport = DiskTransport(clients, case["dir"], assets_dir=spec["hf"] if case.get("assets") else None)
        check_against_checkpoint(exporter.plan, spec["hf"])
        # the weights move before every sync, so the checked first sync is a repeated one (resync)
        sync = WeightSync(exporter, transport, retries=case.get("retries", 2),
                          check=SGLangWeightCheck(transport.clients, resync=True))
        reports = []
        for version in case["versions"]:
            with torch.no_grad():
                for chunk in chunks:
                    for name, _, tensor in megatron_tensors(unwrap(chunk), table):
                        tensor.add_(offset(name, f"{case['name']}-{version}"))
            expected = {n: t.clone() for b in exporter.buckets(0) for n, t in b.tensors}
            if env.is_main:
                torch.save(expected, os.path.join(spec["root"], f"expected-{case['name']}-{version}.pt"))
            reports.append(sync.sync(version))
            dist.barrier()
        if hasattr(transport, "close"):
            transport.close()
        results.append({"name": case["name"], "reports": reports, "buckets": len(exporter.plan.buckets)})
    return results


def main():
    from dare_mega.parallel import init_distributed

    env = init_distributed()
    finish(env, sys.argv[2], run(env, json.load(open(sys.argv[1]))))


if __name__ == "__main__":
    main()
