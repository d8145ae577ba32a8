#!/usr/bin/env python
"""Code reward throughput: benign samples per second, the sandbox's overhead per sample, and a step's worth of
samples with hostile ones among them, pool vs one at a time.

    python benchmarks/rewards.py [--samples 64] [--loops 8] [--workers 8] [--wall 2]

- benign: `--samples` correct programs (an `add` and two asserts) through `score_many("code", ...)` in the pool;
  samples per second;
- overhead: the median time of one sample through the nsjail backend, minus the median time of the same judge
  run as a plain subprocess (the opt-out backend): what the jail itself costs;
- step: `--samples` samples of which `--loops` are infinite loops (time limit `--wall` s), scored in the pool
  and one at a time (workers=1).
Result: benchmarks/results/rewards-<device>.json; docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
LOOP = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--loops", type=int, default=8)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--wall", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=15, help="samples timed one by one for the overhead")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "rewards-cpu.json"))
    args = p.parse_args(argv)

    from dare_mega.rewards import CodeSettings, RewardSettings, prepare, score_many
    from dare_mega.rewards.code import UnisolatedBackend, backend_for, judge

    code = CodeSettings(wall_seconds=args.wall)
    pool = RewardSettings(workers=args.workers, memory_budget_mb=1 << 20, code=code)
    serial = RewardSettings(workers=1, code=code)
    where = prepare("code", pool)
    print(where, flush=True)
    record = {"tests": TESTS}

    start = time.perf_counter()
    outcomes = score_many("code", [GOOD] * args.samples, [record] * args.samples, pool)
    benign_s = time.perf_counter() - start
    assert all(o.score == 1.0 for o in outcomes)

    jailed, plain = [], []
    nsjail, unisolated = backend_for(code), UnisolatedBackend(code)
    for _ in range(args.repeat):
        for backend, times in ((nsjail, jailed), (unisolated, plain)):
            start = time.perf_counter()
            assert judge(backend, GOOD.split("\n", 1)[1].rsplit("```", 1)[0], TESTS, code).score == 1.0
            times.append(time.perf_counter() - start)

    texts = [LOOP] * args.loops + [GOOD] * (args.samples - args.loops)
    step = {}
    for name, settings in (("pool", pool), ("serial", serial)):
        start = time.perf_counter()
        outcomes = score_many("code", texts, [record] * len(texts), settings)
        step[name] = time.perf_counter() - start
        assert [o.score for o in outcomes] == [0.0] * args.loops + [1.0] * (args.samples - args.loops)

    result = {
        "date": time.strftime("%Y-%m-%d"), "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "backend": where, "samples": args.samples, "workers": args.workers, "wall_seconds": args.wall,
        "benign_samples_per_s": args.samples / benign_s,
        "median_sample_s_nsjail": statistics.median(jailed), "median_sample_s_subprocess": statistics.median(plain),
        "sandbox_overhead_s": statistics.median(jailed) - statistics.median(plain),
        "infinite_loops": args.loops, "step_s_pool": step["pool"], "step_s_serial": step["serial"],
        "speedup": step["serial"] / step["pool"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"rewards: {result['benign_samples_per_s']:.1f} benign samples/s, sandbox overhead "
          f"{result['sandbox_overhead_s'] * 1000:.0f} ms/sample; {args.samples} samples with {args.loops} infinite "
          f"loops: {step['pool']:.1f} s in the pool vs {step['serial']:.1f} s one at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
