"""The weight exporter at one layout against the conversion tool (under torchrun); rank 0 writes JSON.

argv: a JSON spec {"root", "cases": [{"name", "hf", "layout", "bucket_bytes"}]}, then the output path.
For each case the model is loaded at the layout and every parameter (and the router's expert bias) is moved
by a deterministic amount that depends on its global name, so the export must read the live shards. Then:
  - the model is saved to torch_dist (Megatron's own save) and tools' export_to_hf writes HF safetensors;
  - the exporter yields buckets to every rank and, separately, to one rank (point-to-point);
and rank 0 compares names, dtypes, shapes and bytes, and records every bucket's size.
"""

import hashlib
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from _common import finish


def offset(name: str) -> float:
    return int(hashlib.sha256(name.encode()).hexdigest()[:6], 16) / 2**24 - 0.5


def save_live(chunks, hf_dir: str, out_dir: str, layout) -> None:
    """The live model as a torch_dist checkpoint that tools/convert_checkpoint.py can export."""
    from megatron.core import dist_checkpointing

    from dare_mega.checkpoint.torch_dist import (
        ASSETS_DIR,
        FORMAT_VERSION,
        META_FILE,
        dtype_name,
        model_sharded_state_dict,
    )
    from dare_mega.models.builder import load_model_args
    from dare_mega.models.transformer_config import padded_vocab_size
    from dare_mega.storage.safetensors_io import CheckpointReader

    if dist.get_rank() == 0:
        os.makedirs(out_dir)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), out_dir)
    if dist.get_rank() == 0:
        reader, args = CheckpointReader(hf_dir), load_model_args(hf_dir)
        meta = {"format": FORMAT_VERSION, "architecture": args.architecture,
                "hf_config": json.load(open(os.path.join(hf_dir, "config.json"))),
                "hf_tensors": {n: {"dtype": dtype_name(reader.dtype(n)), "shape": list(reader.shapes[n])}
                               for n in reader.names()},
                "hf_tensor_order": reader.names(), "padded_vocab_size": padded_vocab_size(args.vocab_size, layout.tp),
                "params_dtype": "float32", "saved_layout": layout.describe()}
        json.dump(meta, open(os.path.join(out_dir, META_FILE), "w"))
        os.makedirs(os.path.join(out_dir, ASSETS_DIR))
        shutil.copy2(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, ASSETS_DIR, "config.json"))
    dist.barrier()


def run(env, spec: dict) -> list[dict]:
    """The cases of `spec` in this launch (torch.distributed already up); rank 0's records are complete."""
    from dare_mega.checkpoint.export import export_to_hf
    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.hf_loader import megatron_tensors, unwrap
    from dare_mega.parallel import ParallelLayout, init_model_parallel
    from dare_mega.storage.safetensors_io import CheckpointReader
    from dare_mega.weight_sync.export import WeightExporter

    results = []
    for case in spec["cases"]:
        layout = ParallelLayout(**case["layout"])
        init_model_parallel(layout)
        chunks, args = build_from_hf(case["hf"], layout)
        table = mapping_for(args)
        with torch.no_grad():
            for chunk in chunks:
                for name, _, tensor in megatron_tensors(unwrap(chunk), table):
                    tensor.add_(offset(name))  # the same amount for every shard of one global tensor
        mcore = os.path.join(spec["root"], case["name"] + "-mcore")
        converted = os.path.join(spec["root"], case["name"] + "-hf")
        save_live(chunks, case["hf"], mcore, layout)
        export_to_hf(mcore, converted)
        source = CheckpointReader(case["hf"])
        exporter = WeightExporter(chunks, args, table, case["bucket_bytes"],
                                  dtypes={n: source.dtype(n) for n in source.names()})
        everywhere = [[(n, t.clone()) for n, t in bucket.tensors] for bucket in exporter.buckets("all")]
        at_last = [[(n, t.clone()) for n, t in b.tensors] for b in exporter.buckets(dist.get_world_size() - 1)]
        # every rank got the same tensors (compare a checksum per rank on rank 0)
        checksum = torch.tensor([float(sum(t.double().sum() for b in everywhere for _, t in b))], dtype=torch.float64)
        sums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
        dist.all_gather(sums, checksum)
        # the point-to-point export reached the last rank only: send it to rank 0 to compare
        last = dist.get_world_size() - 1
        got_last = [None]
        if env.rank == last:
            dist.send_object_list([at_last], dst=0)
        elif env.rank == 0:
            dist.recv_object_list(got_last, src=last)
        peak = torch.tensor([exporter.peak_held_bytes], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record = {"name": case["name"], "layout": layout.describe(), "bucket_bytes": case["bucket_bytes"],
                  "plan_total_bytes": exporter.plan.total_bytes, "peak_held_bytes": float(peak)}
        if env.is_main:
            written = CheckpointReader(converted)
            flat = [(n, t) for bucket in everywhere for n, t in bucket]
            names = [n for n, _ in flat]
            record.update(
                names_equal=sorted(names) == sorted(written.names()),
                unique=len(names) == len(set(names)),
                mismatched=[n for n, t in flat if n not in written.names() or t.dtype != written.dtype(n)
                            or tuple(t.shape) != tuple(written.shapes[n]) or not torch.equal(t, written.get(n))][:5],
                differs_from_source=sum(not torch.equal(t, source.get(n)) for n, t in flat),
                bucket_sizes=[sum(t.numel() * t.element_size() for _, t in b) for b in everywhere],
                bucket_count=len(everywhere), plan_buckets=len(exporter.plan.buckets),
                order_is_plan=names == [e[0] for e in exporter.plan.entries],
                ranks_agree=len({float(s) for s in sums}) == 1,
                rank0_got_nothing_p2p=not at_last,
                p2p_equal=[[n for n, _ in b] for b in got_last[0]] == [[n for n, _ in b] for b in everywhere]
                and all(torch.equal(a, b) for x, y in zip(got_last[0], everywhere) for (_, a), (_, b) in zip(x, y)),
                largest_tensor=max(t.numel() * t.element_size() for _, t in flat),
            )
        results.append(record)
    return results


def main():
    from dare_mega.parallel import init_distributed

    env = init_distributed()
    finish(env, sys.argv[2], run(env, json.load(open(sys.argv[1]))))


if __name__ == "__main__":
    main()
