"""Conversion round trips at one world size (under torchrun); rank 0 writes the figures as JSON.

argv: a JSON spec {"root": dir, "cases": [{"name", "hf", "save": layout, "load": [layouts]}]}, then the output.
For each case: HF -> torch_dist at `save`, torch_dist -> HF, then the torch_dist checkpoint is loaded at every
`load` layout and its logits compared with the model loaded from the HF source at that layout.
"""

import json
import os
import sys

from _common import finish


def main():
    import torch

    from dare_mega.checkpoint.export import export_to_hf
    from dare_mega.checkpoint.torch_dist import args_of, load_into, save_from_hf
    from dare_mega.cli.parity import parity_batch
    from dare_mega.models.builder import build_from_hf, build_model
    from dare_mega.models.runner import Runner
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel
    from dare_mega.storage.safetensors_io import CheckpointReader

    env = init_distributed()
    spec = json.load(open(sys.argv[1]))
    results = []
    for case in spec["cases"]:
        mcore = os.path.join(spec["root"], case["name"] + "-mcore")
        hf_out = os.path.join(spec["root"], case["name"] + "-hf")
        layout = ParallelLayout(**case["save"])
        init_model_parallel(layout)
        save_from_hf(case["hf"], mcore, layout)
        export_to_hf(mcore, hf_out, max_shard_bytes=case.get("max_shard_bytes", 600_000))
        record = {"name": case["name"], "saved_at": layout.describe(), "loads": []}
        if env.is_main:
            source, exported = CheckpointReader(case["hf"]), CheckpointReader(hf_out)
            mismatched = [n for n in source.names()
                          if n not in exported or source.dtype(n) != exported.dtype(n)
                          or not torch.equal(source.get(n), exported.get(n))]
            record.update(
                names_equal=sorted(source.names()) == sorted(exported.names()),
                bit_exact=not mismatched, mismatched=mismatched[:5],
                exported_names=sorted(exported.names()),
                exported_files=sorted(os.listdir(hf_out)),
            )
        for load in case["load"]:
            load_layout = ParallelLayout(**load)
            init_model_parallel(load_layout)
            args = args_of(mcore)
            chunks = build_model(args, load_layout, RuntimeOptions(init_weights=False))
            load_into(chunks, mcore)
            batch = parity_batch(args, "full" if args.diffusion.attention == "full" else "block")
            from_mcore = Runner(chunks, args).logits(batch)
            reference_chunks, _ = build_from_hf(case["hf"], load_layout)
            from_hf = Runner(reference_chunks, args).logits(batch)
            record["loads"].append({"layout": load_layout.describe(),
                                    "max_abs_logit_diff": (from_mcore - from_hf).abs().max().item()})
        results.append(record)
    finish(env, sys.argv[2], results)


if __name__ == "__main__":
    main()
