"""Score a model on local benchmark files:
`python -m dare_mega.eval --hf DIR --tasks gsm8k,humaneval --data DIR --out DIR`.

By default the released OpenCompass package runs the evaluation (dare_mega's model class, local datasets,
sandboxed code scoring; dare_mega/eval/compass.py); `--harness native` scores with the project's own loop,
which uses the same prompts, decoding and rewards and needs no OpenCompass. Either way OUT holds
scores.json ({task: accuracy}) and <task>.jsonl (id, prompt, completion, score per item); the OpenCompass
harness adds its summary (summary.md / .txt / .csv), the config it ran (opencompass_config.py) and its work
directory (opencompass/). Every dataset is checked before the model is loaded; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dare_mega.errors import ConfigError, exit_status

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dare_mega.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="an HF checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated: gsm8k, math500, aime2024, aime2025, humaneval, "
                   "mbpp, mmlu, arc_c, hellaswag, gpqa, bbh")
    p.add_argument("--data", default=os.environ.get("COMPASS_DATA_CACHE"), help="benchmark files (default "
                   "$COMPASS_DATA_CACHE), each in its published layout, e.g. DIR/gsm8k/test.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--harness", choices=("opencompass", "native"), default="opencompass")
    p.add_argument("--limit", type=int, default=None, help="first N items of each benchmark")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's")
    p.add_argument("--decoding", default="{}", help="JSON overrides of the family's decoding settings, e.g. "
                   "'{\"threshold\": 0.95, \"temperature\": 0}'")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sglang-url", action="append", default=[], help="generate on this running SGLang server "
                   "(repeat for several); default: the native engine")
    p.add_argument("--device", default=None, help="native engine device (default: cuda when present)")
    p.add_argument("--reward", action="append", default=[], metavar="KEY=VALUE",
                   help="reward settings, as the RL config's reward section (repeat): e.g. workers=16, "
                        "code.backend=sandbox_fusion, code.sandbox_fusion_url=http://host:8080, "
                        "code.allow_unisolated=true (docs/algorithms.md)")
    return p


def reward_settings(options):
    from dare_mega.config import apply_overrides, from_dict
    from dare_mega.rewards import RewardSettings

    settings = from_dict(RewardSettings, apply_overrides({}, options.reward, "--reward"), "--reward")
    settings.check("--reward")
    return settings


def _check(options) -> tuple[list[str], dict]:
    from dare_mega.eval.benchmarks import BENCHMARKS, data_path
    from dare_mega.rewards import prepare

    if not options.data:
        raise ConfigError("--data (or $COMPASS_DATA_CACHE) must name the directory of benchmark files")
    if not os.path.isfile(os.path.join(options.hf, "config.json")):
        raise ConfigError(f"--hf {options.hf}: no config.json there (an HF checkpoint directory is expected)")
    tasks = [t.strip() for t in options.tasks.split(",") if t.strip()]
    for task in tasks:
        data_path(task, options.data)  # all checked before the model
    try:
        decoding = json.loads(options.decoding)
    except ValueError as e:
        raise ConfigError(f"--decoding is not JSON: {e}") from None
    settings = reward_settings(options)
    for reward in dict.fromkeys(BENCHMARKS[t].reward for t in tasks):  # code rewards refused before the model
        print(prepare(reward, settings, log=lambda m: print(m, file=sys.stderr, flush=True)), flush=True)
    options.reward_settings = settings
    return tasks, decoding


def native(options, tasks, decoding) -> dict:
    from dare_mega.eval.benchmarks import BENCHMARKS, load
    from dare_mega.eval.engines import decoding_for, engine_for
    from dare_mega.eval.scoring import evaluate
    from dare_mega.rollout.types import SamplingParams

    backend = "sglang" if options.sglang_url else "native"
    engine = engine_for(options.hf, backend, options.sglang_url, options.device, batch_size=options.batch_size)
    settings = {**decoding_for(options.hf), **decoding}
    scores = {}
    for task in tasks:
        bench = BENCHMARKS[task]
        params = SamplingParams(**{"seed": 0, **settings,
                                   "max_new_tokens": options.max_new_tokens or bench.max_new_tokens})
        items = evaluate(engine, load(task, options.data, options.limit), bench.reward, params, options.batch_size,
                         options.reward_settings)
        with open(os.path.join(options.out, f"{task}.jsonl"), "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        scores[task] = sum(i["score"] for i in items) / max(len(items), 1)
    return scores


def opencompass(options, tasks, decoding) -> dict:
    from dare_mega.config import to_dict

    try:
        from dare_mega.eval import compass
    except ImportError as e:
        raise ConfigError(f"the OpenCompass harness needs the opencompass package ({e}); install it with "
                          f"pip install 'dare_mega[eval]', or use --harness native") from None
    model = dict(hf=os.path.abspath(options.hf), backend="sglang" if options.sglang_url else "native",
                 urls=options.sglang_url, device=options.device, batch_size=options.batch_size, decoding=decoding)
    datasets = dict(tasks=tasks, data_dir=os.path.abspath(options.data), limit=options.limit,
                    max_new_tokens=options.max_new_tokens, reward_settings=to_dict(options.reward_settings))
    config = compass.write_config(os.path.join(os.path.abspath(options.out), "opencompass_config.py"), model, datasets)
    run_dir = compass.run(config, os.path.join(os.path.abspath(options.out), "opencompass"))
    return compass.collect(run_dir, compass.model_config(**model)["abbr"], tasks, options.out)


def evaluate(options) -> None:
    tasks, decoding = _check(options)
    os.makedirs(options.out, exist_ok=True)
    clock = time.perf_counter()
    scores = (native if options.harness == "native" else opencompass)(options, tasks, decoding)
    with open(os.path.join(options.out, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    for task, value in scores.items():
        print(f"{task}: {value:.4f}", flush=True)
    print(f"eval ({options.harness}): {len(tasks)} task(s) in {time.perf_counter() - clock:.1f} s; scores in "
          f"{os.path.join(options.out, 'scores.json')}", flush=True)


def main(argv=None) -> int:
    options = _parser().parse_args(argv)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    return exit_status(lambda: evaluate(options))

if __name__ == "__main__":
    sys.exit(main())
