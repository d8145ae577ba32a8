"""Generate and score benchmark records: shared by `python -m dare_mega.eval` and the RL loop's evaluations."""

from __future__ import annotations


def evaluate(engine, records: list[dict], reward: str, params, batch_size: int = 32) -> list[dict]:
    """Completions and scores for the records, in order (batches of `batch_size` prompts)."""
    from tqdm import tqdm

    from dare_mega.rewards import score

    out = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch", leave=False):
        chunk = records[start : start + batch_size]
        for record, completion in zip(chunk, engine.generate([r["prompt"] for r in chunk], params)):
            out.append({"id": record.get("id", record["_source"]), "prompt": record["prompt"],
                        "completion": completion.text, "score": score(reward, completion.text, record)})
    return out


def score_benchmarks(engine, benchmarks: dict, params_for) -> dict:
    """{task: accuracy} for {task: records}; `params_for(benchmark)` gives its SamplingParams."""
    from dare_mega.eval.benchmarks import BENCHMARKS

    out = {}
    for task, records in benchmarks.items():
        items = evaluate(engine, records, BENCHMARKS[task].reward, params_for(BENCHMARKS[task]))
        out[task] = sum(i["score"] for i in items) / max(len(items), 1)
    return out
