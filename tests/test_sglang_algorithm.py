"""DareMegaDecoding (rollout/sglang_algorithm.py) inside SGLang 0.5.23's own block loop (`DllmAlgorithm.run`,
sync mode, on a real ForwardBatch and SamplingBatchInfo built from SGLang's parsed SamplingParams), block after
block as SGLang's scheduler feeds them, against the native engine decoding each request alone with the same
seed (tests/workers/sglang_checks.py: algorithm_vs_native)."""

from __future__ import annotations

import json

import pytest
from test_sglang import sglang_checks

SAMPLED = {"model": "tiny-sdar-moe", "fill_id": 151669, "prompts": [[5, 6, 7], [8, 9, 10, 11, 12]], "seeds": [3, 11],
           "max_new_tokens": 10, "sampling": {"temperature": 1.0, "top_k": 20, "top_p": 0.9},
           "settings": {"policy": "low_confidence_dynamic", "threshold": 0.5}}
CASES = {
    # sampled, two requests in one batch, SGLang's SDAR fill id replaced by the tiny model's mask id
    "sampled": SAMPLED,
    "control": {**SAMPLED, "native_seed_shift": 1},
    "greedy": {"model": "tiny-sdar-moe", "prompts": [[5, 6, 7], [8, 9]], "seeds": [1, 2], "max_new_tokens": 8,
               "sampling": {"temperature": 0.0}, "settings": {"policy": "low_confidence_dynamic", "threshold": 0.9}},
    # a fixed number of reveals per step (2 steps a block), and LLaDA2's sigmoid router
    "static": {"model": "tiny-llada2-moe", "fill_id": 156895, "prompts": [[5, 6, 7, 8, 9]], "seeds": [7],
               "max_new_tokens": 6, "sampling": {"temperature": 0.8},
               "settings": {"policy": "low_confidence_static", "steps": 2}},
    "entropy": {"model": "tiny-sdar-moe", "prompts": [[4, 5]], "seeds": [5], "max_new_tokens": 9,
                "sampling": {"temperature": 1.0, "top_p": 0.8},
                "settings": {"policy": "entropy_bounded", "entropy_bound": 1.0}},
    # the request's own unmasking settings (custom_params, what SGLangEngine sends) over the server's
    "claimed": {**SAMPLED, "claims": {"policy": "low_confidence_static", "steps": 2, "threshold": 0.9,
                                      "entropy_bound": 0.35}},
}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    checks = [f"algorithm_vs_native={json.dumps(spec)}" for spec in CASES.values()]
    got = sglang_checks(tmp_path_factory.mktemp("algorithm"), *checks)
    return dict(zip(CASES, (got[c] for c in checks)))


@pytest.mark.parametrize("case", ["sampled", "greedy", "static", "entropy", "claimed"])
def test_tokens_equal_the_native_engines(decoded, case):
    result = decoded[case]
    assert result["ours"] == result["native"]
    assert result["masks_left"] == 0 and result["rounds"] >= 2  # several blocks, each decoded to the end
    assert all(len(c) >= CASES[case]["max_new_tokens"] for c in result["ours"])


def test_another_seed_gives_other_tokens(decoded):
    assert decoded["control"]["ours"] == decoded["sampled"]["ours"]
    assert decoded["control"]["ours"] != decoded["control"]["native"]
    assert decoded["claimed"]["ours"] != decoded["sampled"]["ours"]  # the request's settings were used
