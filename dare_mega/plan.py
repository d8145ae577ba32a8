"""The memory plan of a recipe on a cluster, before anything is launched:

    python -m dare_mega.plan --config RECIPE --nodes N --gpus-per-node G --gpu-memory-gib M [section.key=value ...]

prints, per GPU, the bytes of each part (parameters, gradients, optimizer state, activations, logits, KV cache,
engine weights, communication buffers) and the peak of each phase (rollout, train, sync), and whether it fits
(exit status 0) or not (1). The SFT and RL trainers run the same plan before building anything
(trainer/setup.check_plan). The model's config.json comes from model.hf when that directory exists, else from
the preset of the same name in configs/models/ (a recipe's /checkpoints/SDAR-30B-A3B-Chat reads
sdar-30b-a3b-chat.json), else from model.preset.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from dare_mega.config import load_config
from dare_mega.errors import ConfigError, exit_status
from dare_mega.rollout.memory import GIB


def model_args(cfg):
    """(ModelArgs, where they came from) for a config whose checkpoint may live on another machine."""
    from dare_mega.models.builder import args_from_config, load_model_args
    from dare_mega.models.presets import list_presets, load_preset, preset_file

    m = cfg.model
    if m.hf and os.path.isdir(m.hf):
        return load_model_args(m.hf, m.mask_token_id, m.block_size), m.hf
    name = os.path.basename(os.path.normpath(m.hf)).lower() if m.hf else m.preset
    if name not in list_presets():
        raise ConfigError(f"model.hf={m.hf}: no such directory here and no preset {name!r} in configs/models/ "
                          f"({', '.join(list_presets())}); point model.hf at the checkpoint or name a preset")
    source = str(preset_file(name))
    return args_from_config(load_preset(name), source, mask_token_id=m.mask_token_id, block_size=m.block_size), source


def is_rl(path: str | None) -> bool:
    if path is None:
        return False
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return bool({"rollout", "task", "algorithm"} & set(data))


def run(options) -> int:
    from dare_mega.trainer.config import RLConfig, SFTConfig
    from dare_mega.trainer.memory_plan import plan

    rl = options.kind == "rl" if options.kind else is_rl(options.config)
    cfg = load_config(RLConfig if rl else SFTConfig, options.config, options.overrides)
    args, source = model_args(cfg)
    if options.nodes < 1 or options.gpus_per_node < 1 or options.gpu_memory_gib <= 0:
        raise ConfigError(f"--nodes {options.nodes} and --gpus-per-node {options.gpus_per_node} must be >= 1, "
                          f"--gpu-memory-gib {options.gpu_memory_gib} > 0")
    world = options.nodes * options.gpus_per_node
    result = plan(cfg, args, world, int(options.gpu_memory_gib * GIB), rl)
    p = cfg.parallel
    print(f"{'rl' if rl else 'sft'}: {args.architecture} ({source}) on {options.nodes} x {options.gpus_per_node} "
          f"GPUs of {options.gpu_memory_gib:g} GiB, TP={p.tp} PP={p.pp} EP={p.ep}"
          f"{f' VPP={p.vpp}' if p.vpp else ''}, dtype {cfg.model.dtype}")
    print(result.table())
    return 0 if result.fits else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dare_mega.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="an SFT or RL recipe (configs/recipes/)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory-gib", type=float, required=True)
    p.add_argument("--kind", choices=("sft", "rl"), help="default: rl when the recipe has rollout / task keys")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    options = p.parse_args(argv)
    verdict = []
    failed = exit_status(lambda: verdict.append(run(options)))
    return failed or verdict[0]


if __name__ == "__main__":
    sys.exit(main())
