"""Weight sync: the exporter against the conversion tool, bucket limits and memory, transports and faults."""

from __future__ import annotations

import pytest
from conftest import run_json_worker


def export_cases(tiny_dir) -> list[dict]:
    limit = 160 * 1024  # above the largest tensor (the tiny embeddings), far below the model
    return [
        {"name": "sdar_moe", "hf": tiny_dir["sdar_moe"], "layout": {"tp": 2, "ep": 2, "pp": 2}, "bucket_bytes": limit},
        {"name": "llada2_moe", "hf": tiny_dir["llada2_moe"], "layout": {"tp": 2, "ep": 2, "pp": 2},
         "bucket_bytes": limit},
        {"name": "llada2_etp2", "hf": tiny_dir["llada2_moe"], "layout": {"tp": 2, "ep": 2, "etp": 2, "pp": 2},
         "bucket_bytes": limit},
    ]


@pytest.fixture(scope="module")
def launched(tiny_dir, tmp_path_factory):
    """Both tests' work in one torchrun launch of 8 processes (tests/workers/weight_sync_worker.py: the exporter's
    cases, then the syncs to the fake SGLang servers, which stay up for the test to query):
    {"export": results, "sync": {name: result}, "cases": sync cases, "root": directory}."""
    import json

    from conftest import free_port
    from fake_sglang import Servers

    root = tmp_path_factory.mktemp("weight_sync")
    hf = tiny_dir["llada2_moe"]
    servers = Servers(root)
    try:
        # one server per transport (each fake imports SGLang: ~10 s of CPU)
        urls = {"coloc0": servers.start("coloc0", hf, "--tp-size", "4"),
                "dist0": servers.start("dist0", hf), "disk": servers.start("disk", hf),
                "flaky": servers.start("flaky", hf, "--tp-size", "8", "--fail", "/update_weights_from_tensor:3")}
        servers.wait(*urls.values())
        cases = [
            {"name": "colocated", "kind": "colocated", "urls": [urls["coloc0"]],
             "engine_ranks": [[4, 5, 6, 7]], "versions": [1, 2]},
            {"name": "distributed", "kind": "distributed", "urls": [urls["dist0"]], "engine_tp": [1],
             "port": free_port(), "versions": [1, 2]},
            {"name": "disk", "kind": "disk", "urls": [urls["disk"]], "dir": str(root / "weights"), "versions": [1, 2],
             "assets": True},
            {"name": "flaky", "kind": "colocated", "urls": [urls["flaky"]], "engine_ranks": [list(range(8))],
             "versions": [1]},
        ]
        export_spec, sync_spec = root / "export.json", root / "sync.json"
        export_spec.write_text(json.dumps({"root": str(root / "export"), "cases": export_cases(tiny_dir)}))
        (root / "export").mkdir()
        sync_spec.write_text(json.dumps({"hf": hf, "layout": {"tp": 2, "pp": 2, "ep": 2},
                                         "bucket_bytes": 96 * 1024, "root": str(root), "cases": cases}))
        results = run_json_worker(8, ["tests/workers/weight_sync_worker.py", str(export_spec), str(sync_spec)],
                                  root / "out.json", timeout=900)
        yield {"export": results["export"], "sync": {r["name"]: r for r in results["sync"]}, "cases": cases,
               "root": root}
    finally:
        servers.stop()


@pytest.mark.distributed
def test_exporter_matches_the_conversion_tool(launched):
    """At TP=2 x EP=2 x PP=2 (8 processes, ETP=1) and with ETP=2, the exporter yields exactly the tensors that
    tools/convert_checkpoint.py writes for the same (moved) weights: names, dtypes, shapes and bytes; in the plan's
    order; every bucket under the limit; the same tensors on every rank, or on one rank point-to-point."""
    results = launched["export"]
    assert [r["name"] for r in results] == ["sdar_moe", "llada2_moe", "llada2_etp2"]
    for r in results:
        assert r["names_equal"] and r["unique"] and not r["mismatched"], r
        assert r["differs_from_source"] > 0  # the live, moved weights were exported, not the files
        assert r["order_is_plan"] and r["bucket_count"] == r["plan_buckets"] > 3
        assert max(r["bucket_sizes"]) <= r["bucket_bytes"], r["bucket_sizes"]
        assert sum(r["bucket_sizes"]) == r["plan_total_bytes"]
        # memory: no rank ever held more than one bucket plus the tensor being added (here < 1/4 of the model)
        assert r["peak_held_bytes"] <= r["bucket_bytes"] + r["largest_tensor"] * 3
        assert r["peak_held_bytes"] < r["plan_total_bytes"] / 4
        assert r["ranks_agree"] and r["rank0_got_nothing_p2p"] and r["p2p_equal"]


# ---- transports against loopback SGLang servers --------------------------------------------------------------
def fetch(url: str, route: str, body: dict | None = None):
    import requests

    response = requests.post(url + route, json=body) if body is not None else requests.get(url + route)
    response.raise_for_status()
    return response.json()


def received(url: str, tmp_path, tag: str) -> dict:
    import torch

    path = tmp_path / f"received-{tag}.pt"
    fetch(url, "/_dump", {"path": str(path)})
    return torch.load(path)


def assert_bit_exact(got: dict, expected: dict) -> None:
    import torch

    assert sorted(got) == sorted(expected)
    bad = [n for n in expected if got[n].dtype != expected[n].dtype or not torch.equal(got[n], expected[n])]
    assert not bad, bad[:5]


def session_routes(calls: list[dict]) -> list[str]:
    return [c["route"] for c in calls if c["route"] not in ("/health", "/_calls", "/_dump")]


@pytest.mark.distributed
def test_transports_deliver_the_weights_bit_exactly(launched, tmp_path):
    """A TP=2 x PP=2 x EP=2 (ETP=1) trainer on 8 processes syncs twice through each transport: colocated (an
    engine of TP 4 fed by the 4 trainer ranks 4-7 on its GPUs), disaggregated (an engine of TP 1 in an update
    group with the trainer's rank 0), and disk. Each engine receives the model's HF weights bit-exactly,
    through the documented call sequence, with the version set only by the last call; a bucket refused on the
    first try is retried from the start without the version ever advancing on the partial update."""
    import torch

    results, cases, root = launched["sync"], launched["cases"], launched["root"]
    assert sorted(results) == sorted(case["name"] for case in cases)
    for case in cases:
        result = results[case["name"]]
        last = case["versions"][-1]
        expected = torch.load(root / f"expected-{case['name']}-{last}.pt")
        for i, url in enumerate(case["urls"]):
            assert_bit_exact(received(url, tmp_path, f"{case['name']}{i}"), expected)
            calls = fetch(url, "/_calls")
            routes = session_routes(calls)
            assert calls[-1]["version"] == str(last)
            # SGLang's weight checker around the first sync (the trainer's weights moved before it, so the
            # first sync runs once more between snapshot + reset and compare)
            checker = [c["body"]["action"] for c in calls if c["route"] == "/weights_checker"]
            assert checker == ["snapshot", "reset_tensors", "compare"]
            assert not any(c.get("skipped") for c in calls)  # every name sent is a tensor of the model
            if case["kind"] == "disk":
                disk = ["/pause_generation", "/update_weights_from_disk", "/model_info", "/continue_generation"]
                assert routes == [*disk, "/weights_checker", "/weights_checker", *disk, "/weights_checker",
                                  *disk * (len(case["versions"]) - 1)]
                continue
            update = "/update_weights_from_tensor" if case["kind"] == "colocated" else \
                "/update_weights_from_distributed"
            buckets = result["buckets"]
            attempt = ["/pause_generation", "/begin_weight_update", *[update] * buckets, "/end_weight_update",
                       "/flush_cache", "/model_info", "/continue_generation"]
            first = [*attempt, "/weights_checker", "/weights_checker", *attempt, "/weights_checker"]
            updates = [c for c in calls if c["route"] == update]
            if case["name"] == "flaky":
                assert result["reports"][0]["attempts"] == 2
                # attempt 1 stopped at the refused third bucket and closed the session; attempt 2 is complete
                assert routes == ["/pause_generation", "/begin_weight_update", update, update, update,
                                  "/end_weight_update", "/continue_generation", *attempt,
                                  "/weights_checker", "/weights_checker", *attempt, "/weights_checker"]
                assert all(c["version"] == "default" for c in calls[: calls.index(updates[3])])
                assert all(u["body"]["payloads"] == 8 for u in updates)
                continue
            group = ["/init_weights_update_group"] if case["kind"] == "distributed" else []
            assert routes[: len(group)] == group
            assert routes[len(group):] == first + attempt * (len(case["versions"]) - 1) + (
                ["/destroy_weights_update_group"] if group else [])
            assert [u["body"]["weight_version"] for u in updates] == \
                ([None] * (buckets - 1) + ["1"]) * 2 + [None] * (buckets - 1) + ["2"]
            if case["kind"] == "colocated":
                assert all(u["body"]["payloads"] == 4 and u["body"]["load_format"] == "flattened_bucket"
                           for u in updates)
        assert all(r["attempts"] == 1 for r in result["reports"]) or case["name"] == "flaky"
    assert sorted(p.name for p in (root / "weights").iterdir()) == ["v2"]  # older versions pruned
    assert (root / "weights" / "v2" / "config.json").exists()
