"""The OpenCompass plugin end to end, through the released opencompass package: the RL example's tiny SFT model
scores exactly what the project's own evaluator scores, with no network; the SGLang backend; the registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, clean_env, completed, warm_checkpoint

HUMANEVAL = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
              "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
             {"task_id": "HumanEval/1", "prompt": "def first(xs):\n    \"\"\"The first item.\"\"\"\n",
              "entry_point": "first", "test": "def check(candidate):\n    assert candidate([4, 5]) == 4\n"}]

# Every socket a Python program opens is refused and logged (an audit hook, inherited by child processes); on
# machines that allow it the run is also put in a network namespace of its own (unshare -n), where even
# native code finds no network.
NO_NETWORK = textwrap.dedent('''
    import os, sys
    _log = os.environ.get("NO_NETWORK_LOG")
    def _refuse(event, args):
        if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.bind"):
            if event == "socket.bind" or (event == "socket.connect" and isinstance(args[1], str)):
                return  # local listening sockets and unix sockets are not the network
            with open(_log, "a") as f:
                f.write(f"{event} {args[1:]!r}\\n")
            raise OSError(101, "network is unreachable (test without network)")
    if _log:
        sys.addaudithook(_refuse)
''')


def _namespace() -> list[str]:
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


def offline(tmp_path):
    """(command prefix, env, log) for a run with no network."""
    hook = tmp_path / "no_network"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(NO_NETWORK)
    log = tmp_path / "network_attempts.log"
    env = clean_env(NO_NETWORK_LOG=str(log), PYTHONPATH=f"{hook}:{REPO}", HF_ENDPOINT="http://203.0.113.1:9")
    return _namespace(), env, log


@pytest.fixture(scope="module")
def sft_model(example_run, tmp_path_factory):
    """The RL example's tiny SFT model (examples/rl_sdar_moe.sh's warm-up, which the session's `examples` fixture
    runs for the RL tests), as HF."""
    from dare_mega.checkpoint.export import export_to_hf

    run = tmp_path_factory.mktemp("sft")
    export_to_hf(warm_checkpoint(example_run), str(run / "hf"))
    return str(run / "hf")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """GSM8K-style lines (held-out prompts of the example's task, in GSM8K's question/answer layout) and
    HumanEval-style lines, in the files those benchmarks ship as."""
    from dare_mega.data.tasks import make_task

    root = tmp_path_factory.mktemp("data")
    (root / "gsm8k").mkdir()
    (root / "humaneval").mkdir()
    with open(root / "gsm8k/test.jsonl", "w") as f:
        for r in make_task("max", 16, seed=12345):
            f.write(json.dumps({"question": r["prompt"], "answer": f"The largest digit.\n#### {r['answer']}"}) + "\n")
    with open(root / "humaneval/HumanEval.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in HUMANEVAL)
    return root


def start_evaluate(hf, data_dir, out, harness, *extra, prefix=(), env=None) -> subprocess.Popen:
    """The evaluator in the background (one thread), for a run that can overlap another one."""
    command = [*prefix, sys.executable, "-m", "dare_mega.eval", "--harness", harness, "--hf", hf, "--tasks",
               "gsm8k,humaneval", "--data", str(data_dir), "--out", str(out), "--max-new-tokens", "16",
               "--batch-size", "4", *extra]
    return subprocess.Popen(command, cwd=REPO, env=env or clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def evaluate(hf, data_dir, out, harness, *extra, prefix=(), env=None):
    return completed(start_evaluate(hf, data_dir, out, harness, *extra, prefix=prefix, env=env), timeout=900)


def items(out, task):
    return [json.loads(line) for line in (out / f"{task}.jsonl").read_text().splitlines()]


def test_opencompass_and_own_scorer_agree_without_network(sft_model, data, tmp_path):
    # sampled decoding (seeded per request) so that the tiny model writes answers, some of them right
    sampled = ["--decoding", '{"temperature": 1.0}']
    prefix, env, log = offline(tmp_path)
    own = start_evaluate(sft_model, data, tmp_path / "own", "native", *sampled)  # alongside (one thread each)
    compass = evaluate(sft_model, data, tmp_path / "oc", "opencompass", *sampled, prefix=prefix, env=env)
    own = completed(own, timeout=900)
    assert compass.returncode == 0, compass.stderr[-4000:]
    assert not log.exists(), f"network attempts: {log.read_text()}"
    assert own.returncode == 0, own.stderr[-4000:]

    scores_oc = json.loads((tmp_path / "oc/scores.json").read_text())
    scores_own = json.loads((tmp_path / "own/scores.json").read_text())
    assert scores_oc == scores_own and set(scores_oc) == {"gsm8k", "humaneval"}
    for task, count in (("gsm8k", 16), ("humaneval", 2)):
        a, b = items(tmp_path / "oc", task), items(tmp_path / "own", task)
        assert len(a) == len(b) == count
        assert [(x["id"], x["prompt"], x["completion"], x["score"]) for x in a] == \
               [(x["id"], x["prompt"], x["completion"], x["score"]) for x in b]
    completions = [x["completion"] for x in items(tmp_path / "own", "gsm8k")]
    assert sum(bool(c.strip()) for c in completions) >= 2, completions  # the comparison is not of empty strings
    # OpenCompass's own summary, with its percentages
    summary = (tmp_path / "oc/summary.md").read_text()
    for task, value in scores_oc.items():
        assert any(task in line and f"{100 * value:.2f}" in line for line in summary.splitlines()), summary
    assert (tmp_path / "oc/summary.csv").exists() and (tmp_path / "oc/opencompass_config.py").exists()
    assert "import sys" not in (tmp_path / "oc/opencompass_config.py").read_text()


def test_missing_dataset_is_named_not_downloaded(sft_model, tmp_path):
    (tmp_path / "data/gsm8k").mkdir(parents=True)
    (tmp_path / "data/gsm8k/test.jsonl").write_text(json.dumps({"question": "max 1 2", "answer": "#### 2"}) + "\n")
    prefix, env, log = offline(tmp_path)
    proc = evaluate(sft_model, tmp_path / "data", tmp_path / "out", "opencompass", prefix=prefix, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = tmp_path / "data" / "humaneval" / "HumanEval.jsonl"
    assert f"humaneval: expected the dataset at {expected}" in proc.stderr
    assert "never downloaded" in proc.stderr and "Traceback" not in proc.stderr
    assert not log.exists() and not (tmp_path / "out").exists()


def test_sglang_backend_through_opencompass(sft_model, data, tmp_path):
    """--sglang-url: OpenCompass's requests go to a (loopback) SGLang server running DareMegaDecoding at threshold
    0.95; greedy requests decode as the native engine with those settings does, so the answers are the same."""
    sys.path.insert(0, str(REPO / "tests"))
    from fake_sglang import Servers

    servers = Servers(tmp_path)
    # the project's own evaluator (one thread) alongside the server and OpenCompass
    own = start_evaluate(sft_model, data, tmp_path / "own", "native", "--decoding", '{"threshold": 0.95}')
    try:
        url = servers.start("eval", sft_model, threshold=0.95)
        servers.wait(url)
        compass = evaluate(sft_model, data, tmp_path / "sg", "opencompass", "--sglang-url", url)
        calls = servers.calls(url)
    finally:
        servers.stop()
        own = completed(own, timeout=900)
    assert compass.returncode == 0, compass.stderr[-4000:]
    # the connect check's probe, then gsm8k in batches of 4, humaneval in one
    assert sum(c["route"] == "/generate" for c in calls) == 1 + 4 + 1
    assert own.returncode == 0, own.stderr[-4000:]
    for task in ("gsm8k", "humaneval"):
        assert [x["completion"] for x in items(tmp_path / "sg", task)] == \
               [x["completion"] for x in items(tmp_path / "own", task)]


def test_model_class_is_registered_and_decodes_with_the_family_settings(tiny_dir):
    from opencompass.registry import MODELS

    import dare_mega.eval.compass  # noqa: F401  (registers the classes)
    from dare_mega.errors import ConfigError
    from dare_mega.rollout.types import SamplingParams

    model = MODELS.build(dict(type="DareMegaDLLM", path=tiny_dir["sdar_moe"], device="cpu"))
    assert model.decoding == {"policy": "low_confidence_dynamic", "threshold": 0.9, "temperature": 0.0}
    prompts = ["max 1 2 3", "max 9 8"]
    expected = [c.text for c in model.engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0,
                                                                              threshold=0.9, seed=0))]
    assert model.generate(prompts, max_out_len=8) == expected
    assert model.get_token_len("max 1 2") == len(model.tokenizer.encode("max 1 2"))
    with pytest.raises(NotImplementedError, match="generated text only"):
        model.get_ppl(prompts)
    llada = MODELS.build(dict(type="DareMegaDLLM", path=tiny_dir["llada2_moe"], device="cpu",
                              decoding={"threshold": 0.8}))
    assert llada.decoding == {"policy": "low_confidence_dynamic", "threshold": 0.8, "steps": 32, "temperature": 0.0}
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['treshold'\]"):
        MODELS.build(dict(type="DareMegaDLLM", path=tiny_dir["sdar_moe"], device="cpu", decoding={"treshold": 0.5}))
