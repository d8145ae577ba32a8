"""Generate and score benchmark records: shared by `python -m dare_mega.eval` and the RL loop's evaluations."""

from __future__ import annotations


def evaluate(engine, records: list[dict], reward: str, params, batch_size: int = 32, settings=None) -> list[dict]:
    """Completions and scores for the records, in order (batches of `batch_size` prompts, each batch's rewards
    scored concurrently under the `settings` of dare_mega.rewards)."""
    from tqdm import tqdm

    from dare_mega.rewards import score_many

    out = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch", leave=False):
        chunk = records[start : start + batch_size]
        completions = engine.generate([r["prompt"] for r in chunk], params)
        outcomes = score_many(reward, [c.text for c in completions], chunk, settings)
        for record, completion, outcome in zip(chunk, completions, outcomes):
            item = {"id": record.get("id", record["_source"]), "prompt": record["prompt"],
                    "completion": completion.text, "score": outcome.score}
            if outcome.tests_total is not None:
                item.update(tests_passed=outcome.tests_passed, tests_total=outcome.tests_total, status=outcome.status)
            out.append(item)
    return out


def score_benchmarks(engine, benchmarks: dict, params_for, settings=None) -> dict:
    """{task: accuracy} for {task: records}; `params_for(benchmark)` gives its SamplingParams."""
    from dare_mega.eval.benchmarks import BENCHMARKS

    out = {}
    for task, records in benchmarks.items():
        items = evaluate(engine, records, BENCHMARKS[task].reward, params_for(BENCHMARKS[task]), settings=settings)
        out[task] = sum(i["score"] for i in items) / max(len(items), 1)
    return out
