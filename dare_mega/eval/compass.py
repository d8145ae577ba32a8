"""The OpenCompass plugin: dLLMs evaluated by the released opencompass package, not a fork of it.

- `DareMegaDLLM` (registered in OpenCompass's MODELS): generates with dare_mega's native engine or with
  running SGLang servers, decoding as the model family's authors report (ModelFamily.decoding: policy,
  threshold, steps, temperature; the block size comes from the checkpoint), in the batches OpenCompass
  hands it. Any OpenCompass config can use it: `models = [dict(type='DareMegaDLLM', path=..., ...)]`.
- `LocalBenchmarkDataset` (LOAD_DATASET) reads a benchmark from a local directory with the same table as
  the project's own scorer (dare_mega/eval/benchmarks.py): OpenCompass never resolves a dataset id, so it
  never downloads.
- `RewardEvaluator` (ICL_EVALUATORS) scores with dare_mega's rewards, concurrently: math-verify for answers,
  the code judge in its sandbox (nsjail or SandboxFusion, `reward` settings) for HumanEval and MBPP.

`run(...)` writes a config that uses the three, runs OpenCompass on it in this process, and gathers its
summary, scores and per-item predictions under one directory.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys

from datasets import Dataset
from opencompass.datasets.base import BaseDataset
from opencompass.models.base import BaseModel
from opencompass.openicl.icl_evaluator import BaseEvaluator
from opencompass.openicl.icl_inferencer import GenInferencer
from opencompass.openicl.icl_prompt_template import PromptTemplate
from opencompass.openicl.icl_retriever import ZeroRetriever
from opencompass.registry import ICL_EVALUATORS, LOAD_DATASET, MODELS

from dare_mega.errors import ConfigError
from dare_mega.eval.benchmarks import BENCHMARKS, data_path, load
from dare_mega.eval.engines import decoding_for, engine_for


@MODELS.register_module(force=True)
class DareMegaDLLM(BaseModel):
    """A block-diffusion or masked-diffusion LLM decoded by dare_mega. Generation only: every benchmark here
    is scored from generated text (as DARE does, MMLU and HellaSwag included); perplexity-based configs are
    refused with that reason."""

    def __init__(self, path: str, backend: str = "native", urls=(), device: str | None = None,
                 dtype: str = "float32", decoding: dict | None = None, max_seq_len: int = 4096,
                 meta_template: dict | None = None, generation_kwargs: dict | None = None, **unused):
        super().__init__(path=path, max_seq_len=max_seq_len, meta_template=meta_template,
                         generation_kwargs=dict(generation_kwargs or {}))
        from dare_mega.rollout.types import SamplingParams

        self.engine = engine_for(path, backend, urls, device, dtype)
        self.decoding = {**decoding_for(path), **dict(decoding or {})}
        unknown = set(self.decoding) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"DareMegaDLLM decoding: unknown setting(s) {sorted(unknown)}; "
                              f"known: {sorted(SamplingParams.__dataclass_fields__)}")
        self.tokenizer = self.engine.tokenizer

    def generate(self, inputs: list[str], max_out_len: int, **kwargs) -> list[str]:
        from dare_mega.rollout.types import SamplingParams

        params = SamplingParams(**{"seed": 0, **self.decoding, "max_new_tokens": int(max_out_len)})
        return [c.text for c in self.engine.generate([str(p) for p in inputs], params)]

    def get_ppl(self, inputs, mask_length=None):
        raise NotImplementedError("DareMegaDLLM scores generated text only (a diffusion LM has no left-to-right "
                                  "perplexity); use the *_gen dataset configs")

    def get_ppl_tokenwise(self, inputs, label, mask_length=None):
        return self.get_ppl(inputs, mask_length)

    def encode(self, prompt: str):
        import torch

        return torch.tensor([self.tokenizer.encode(prompt)])

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens.reshape(-1).tolist())

    def get_token_len(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt))


@LOAD_DATASET.register_module(force=True)
class LocalBenchmarkDataset(BaseDataset):
    """A benchmark from DATA_DIR in its published layout (dare_mega.eval.benchmarks): a `prompt` column and
    the whole record (JSON) as the reference the RewardEvaluator scores against."""

    @staticmethod
    def load(benchmark: str, data_dir: str, limit: int | None = None) -> Dataset:
        records = load(benchmark, data_dir, limit)
        return Dataset.from_list([{"prompt": r["prompt"], "record": json.dumps(r)} for r in records])


@ICL_EVALUATORS.register_module(force=True)
class RewardEvaluator(BaseEvaluator):
    """Accuracy under a dare_mega reward (code runs in the sandbox)."""

    def __init__(self, reward: str, settings: dict | None = None, pred_postprocessor=None):
        from dare_mega.config import from_dict
        from dare_mega.rewards import RewardSettings

        super().__init__(pred_postprocessor=pred_postprocessor)
        self.reward = reward
        self.settings = from_dict(RewardSettings, settings or {}, "RewardEvaluator settings")

    def score(self, predictions, references):
        from dare_mega.rewards import score_many

        if len(predictions) != len(references):
            return {"error": f"{len(predictions)} predictions for {len(references)} references"}
        records = [json.loads(reference) for reference in references]
        outcomes = score_many(self.reward, list(predictions), records, self.settings,
                              log=lambda m: print(m, file=sys.stderr))
        details = []
        for prediction, record, outcome in zip(predictions, records, outcomes):
            details.append({"id": record["id"], "pred": prediction, "score": outcome.score,
                            "correct": outcome.score == 1.0, "tests_passed": outcome.tests_passed,
                            "tests_total": outcome.tests_total})
        total = sum(d["score"] for d in details)
        return {"accuracy": 100.0 * total / max(len(details), 1), "details": details}


def model_config(hf: str, backend: str = "native", urls=(), device: str | None = None, dtype: str = "float32",
                 batch_size: int = 32, decoding: dict | None = None, abbr: str | None = None) -> dict:
    """An OpenCompass `models` entry for a checkpoint."""
    import torch

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    gpus = 1 if backend == "native" and on_gpu else 0  # what OpenCompass's runners reserve outside --debug
    return dict(type=DareMegaDLLM, abbr=abbr or os.path.basename(os.path.normpath(hf)), path=os.path.abspath(hf),
                backend=backend, urls=list(urls), device=device, dtype=dtype, decoding=dict(decoding or {}),
                batch_size=batch_size, run_cfg=dict(num_gpus=gpus))


def dataset_configs(tasks, data_dir: str, limit: int | None = None, max_new_tokens: int | None = None,
                    reward_settings: dict | None = None) -> list:
    """OpenCompass `datasets` entries; every file is checked here, before any model is built."""
    out = []
    for task in tasks:
        data_path(task, data_dir)
        bench = BENCHMARKS[task]
        out.append(dict(
            abbr=task, type=LocalBenchmarkDataset, benchmark=task, data_dir=os.path.abspath(data_dir), limit=limit,
            reader_cfg=dict(input_columns=["prompt"], output_column="record"),
            infer_cfg=dict(prompt_template=dict(type=PromptTemplate, template="{prompt}"),
                           retriever=dict(type=ZeroRetriever),
                           inferencer=dict(type=GenInferencer, max_out_len=max_new_tokens or bench.max_new_tokens)),
            eval_cfg=dict(evaluator=dict(type=RewardEvaluator, reward=bench.reward,
                                         settings=dict(reward_settings or {}))),
        ))
    return out


def _source(value, imports: dict) -> str:
    """Python source for a config value; classes become their names, imported at the top of the file."""
    if isinstance(value, type):
        imports.setdefault(value.__module__, set()).add(value.__name__)
        return value.__name__
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={_source(v, imports)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_source(v, imports) for v in value) + "]"
    return repr(value)


def write_config(path: str, model: dict, datasets: dict) -> str:
    """An OpenCompass config file for `model_config(**model)` on `dataset_configs(**datasets)`: plain dicts and
    imported classes, as OpenCompass's own configs are (it can be run again with `opencompass FILE`)."""
    imports: dict[str, set] = {}
    models_src = _source([model_config(**model)], imports)
    datasets_src = _source(dataset_configs(**datasets), imports)
    lines = ["# Written by python -m dare_mega.eval: OpenCompass on dare_mega's model class and local datasets.",
             f"# Run it again with: opencompass {path} --debug -w WORK_DIR"]
    lines += [f"from {module} import {', '.join(sorted(names))}" for module, names in sorted(imports.items())]
    lines += ["", f"models = {models_src}", "", f"datasets = {datasets_src}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def run(config_path: str, work_dir: str) -> str:
    """Run OpenCompass on the config in this process (its --debug mode); returns the run's directory."""
    from opencompass.cli.main import main as opencompass_main

    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    before = set(os.listdir(work_dir))
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["opencompass", config_path, "--debug", "-w", work_dir]
    os.chdir(work_dir)  # OpenCompass keeps a .cache/ in the working directory
    try:
        opencompass_main()
    finally:
        sys.argv = argv
        os.chdir(cwd)
    # OpenCompass names each run by its start time (YYYYMMDD_HHMMSS); tmp/ and .cache/ sit beside them
    new = sorted(d for d in set(os.listdir(work_dir)) - before if re.fullmatch(r"\d{8}_\d{6}", d))
    if not new:
        raise ConfigError(f"OpenCompass wrote no run under {work_dir}")
    return os.path.join(work_dir, new[-1])


def collect(run_dir: str, model_abbr: str, tasks, out: str) -> dict:
    """Copy OpenCompass's summary to OUT/summary.{md,txt,csv}; write OUT/<task>.jsonl and return {task: accuracy}
    (a fraction, as the project's own scorer gives it)."""
    for path in glob.glob(os.path.join(run_dir, "summary", "summary_*")):
        shutil.copyfile(path, os.path.join(out, "summary" + os.path.splitext(path)[1]))
    scores = {}
    for task in tasks:
        result_file = os.path.join(run_dir, "results", model_abbr, f"{task}.json")
        prediction_file = os.path.join(run_dir, "predictions", model_abbr, f"{task}.json")
        if not os.path.isfile(result_file):
            raise ConfigError(f"OpenCompass produced no result for {task} ({result_file}); see the logs under "
                              f"{run_dir}")
        with open(result_file) as f:
            result = json.load(f)
        with open(prediction_file) as f:
            predictions = json.load(f)
        # OpenCompass groups each item's details over replicas (a list per field); there is one replica here
        details = [{k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in d.items()}
                   for d in result.get("details", [])]
        items = [{"id": d["id"], "prompt": predictions[str(i)]["origin_prompt"], "completion": d["pred"],
                  "score": d["score"]} for i, d in enumerate(details)]
        with open(os.path.join(out, f"{task}.jsonl"), "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        # the same arithmetic as the project's own scorer (OpenCompass's own figure is a percentage)
        scores[task] = sum(i["score"] for i in items) / max(len(items), 1)
    return scores
