"""Weight sync: the exporter against the conversion tool, bucket limits and memory, transports and faults."""

from __future__ import annotations

import pytest
from conftest import run_json_worker


@pytest.mark.distributed
def test_exporter_matches_the_conversion_tool(tiny_dir, tmp_path):
    """At TP=2 x EP=2 x PP=2 (8 processes, ETP=1) and with ETP=2, the exporter yields exactly the tensors that
    tools/convert_checkpoint.py writes for the same (moved) weights: names, dtypes, shapes and bytes; in the plan's
    order; every bucket under the limit; the same tensors on every rank, or on one rank point-to-point."""
    import json

    limit = 160 * 1024  # above the largest tensor (the tiny embeddings), far below the model
    cases = [
        {"name": "sdar_moe", "hf": tiny_dir["sdar_moe"], "layout": {"tp": 2, "ep": 2, "pp": 2}, "bucket_bytes": limit},
        {"name": "llada2_moe", "hf": tiny_dir["llada2_moe"], "layout": {"tp": 2, "ep": 2, "pp": 2},
         "bucket_bytes": limit},
        {"name": "llada2_etp2", "hf": tiny_dir["llada2_moe"], "layout": {"tp": 2, "ep": 2, "etp": 2, "pp": 2},
         "bucket_bytes": limit},
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"root": str(tmp_path), "cases": cases}))
    results = run_json_worker(8, ["tests/workers/export_worker.py", str(spec)], tmp_path / "out.json", timeout=900)
    for r in results:
        assert r["names_equal"] and r["unique"] and not r["mismatched"], r
        assert r["differs_from_source"] > 0  # the live, moved weights were exported, not the files
        assert r["order_is_plan"] and r["bucket_count"] == r["plan_buckets"] > 3
        assert max(r["bucket_sizes"]) <= r["bucket_bytes"], r["bucket_sizes"]
        assert sum(r["bucket_sizes"]) == r["plan_total_bytes"]
        assert r["ranks_agree"] and r["rank0_got_nothing_p2p"] and r["p2p_equal"]
