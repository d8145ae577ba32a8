"""Training metrics: a progress bar, one JSON line per step in RUN_DIR/metrics.jsonl, and wandb when enabled."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist


def reduce_sums(values: dict, group=None, device=None) -> dict[str, float]:
    """Each named value summed over the ranks of `group` (every rank when None), in one all-reduce (float64)."""
    names = list(values)
    summed = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(summed, group=group)
    return dict(zip(names, summed.tolist()))


@contextmanager
def timed(times: dict, phase: str):
    """Adds the seconds the block takes to times[phase]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - start


class Metrics:
    """Rank 0 writes; other ranks hold a disabled instance. wandb runs offline unless configured online."""

    def __init__(self, run_dir: str, logging_cfg, total_steps: int, start_step: int, enabled: bool, config: dict,
                 name: str = "sft", postfix: tuple[str, ...] = ("loss", "tokens_per_s")):
        self.enabled = enabled
        self.file = None
        self.wandb = None
        self.bar = None
        self.postfix = postfix
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if logging_cfg.wandb != "off":
            os.environ.setdefault("WANDB_MODE", logging_cfg.wandb)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=logging_cfg.project, name=logging_cfg.name, dir=run_dir, config=config,
                                    mode=logging_cfg.wandb, resume="allow")
        if logging_cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.bar is not None:
            self.bar.update(1)
            shown = {k: record[k] for k in self.postfix if isinstance(record.get(k), (int, float))}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
