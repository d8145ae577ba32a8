"""SFT: objectives, packing, the training loop at several layouts, crash and exact resume, launch, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, clean_env, completed, free_port, start, start_torchrun

from dare_mega.algorithms.sft import document_noise, loss_weights, noise_document, objective, sft_batch
from dare_mega.config import load_config
from dare_mega.data.sft import PackedLoader, PackedRow, Sample, pack
from dare_mega.errors import ConfigError
from dare_mega.trainer.config import SFTConfig

RECIPE = "configs/recipes/sft_tiny_sdar_moe.yaml"


def losses(run_dir) -> dict[int, float]:
    """step -> loss; a step logged twice (before a crash and after the resume) keeps its last value."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def start_sft(nproc, run_dir, *overrides):
    """The SFT trainer in the background (one thread per process): one process runs as plain python."""
    args = ["-m", "dare_mega.trainer.sft", "--config", RECIPE, f"run_dir={run_dir}", "logging.progress=false",
            *overrides]
    return start([sys.executable, *args]) if nproc == 1 else start_torchrun(nproc, args)


def sft(nproc, run_dir, *overrides, timeout=600):
    return completed(start_sft(nproc, run_dir, *overrides), timeout)


# ---- objectives and packing (no model) ----------------------------------------------------------------


def _row():
    samples = [Sample(list(range(10, 22)), prompt_len=5), Sample(list(range(30, 38)), prompt_len=3)]
    rows, dropped = pack(samples, budget=24)
    assert dropped == 0 and len(rows) == 1
    return rows[0]


def test_packing_keeps_documents_apart_and_respects_the_budget():
    row = _row()
    assert row.documents == [(0, 12, 7), (12, 8, 5)] and row.tokens == 20 and row.length == 24
    batch = sft_batch([row], objective("masked_diffusion", "sdar"), 99, 4, [torch.Generator().manual_seed(0)])
    assert batch.input_ids.shape == (1, 24)
    assert batch.labels[0].tolist() == row.samples[0].ids + row.samples[1].ids + [0] * 4
    # the leftover is its own sample
    assert batch.position_ids[0].tolist() == list(range(12)) + list(range(8)) + list(range(4))
    samples = [Sample([1] * n, 1, f"s{n}") for n in (10, 10, 30, 5)]
    rows, dropped = pack(samples, budget=20)
    assert dropped == 1 and all(r.length == 20 and r.tokens <= 20 for r in rows) and len(rows) == 2
    with pytest.raises(ConfigError, match="s30: 30 tokens exceed data.token_budget=20"):
        pack(samples, budget=20, overlong="error")


def test_first_fit_decreasing_packs_tighter_than_in_order():
    samples = [Sample([i] * n, 1, f"s{i}") for i, n in enumerate((12, 4, 12, 8, 8))]
    in_order, _ = pack(samples, budget=20)
    ffd, _ = pack(samples, budget=20, packing="ffd")
    assert [[s.source for s in r.samples] for r in in_order] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert [[s.source for s in r.samples] for r in ffd] == [["s0", "s3"], ["s2", "s4"], ["s1"]]
    three, _ = pack(samples[:4] + [Sample([9] * 4, 1, "s5")], budget=20, packing="ffd")
    assert len(three) == 2 and len(pack(samples[:4] + [Sample([9] * 4, 1, "s5")], budget=20)[0]) == 3
    assert sorted(s.source for r in ffd for s in r.samples) == sorted(s.source for s in samples)


def test_loader_deals_equal_counts_and_resumes():
    rows = [PackedRow([Sample([i], 0)], 1) for i in range(10)]
    loaders = [PackedLoader(rows, dp_size=2, dp_rank=r, micro_batches=2, seed=3) for r in range(2)]
    seen = []
    for _ in range(4):  # crosses an epoch: 10 rows, 4 per step
        step = [loader.next_step() for loader in loaders]
        assert all(len(picked) == 2 for picked, _ in step)
        assert [slots for _, slots in step] == [[0, 1], [2, 3]]
        ids = [r.samples[0].ids[0] for picked, _ in step for r in picked]
        assert len(set(ids)) == 4
        seen.append(ids)
    assert sorted(seen[0] + seen[1]) != sorted(seen[2] + seen[3]) or seen[0] != seen[2]
    state = loaders[0].state_dict()
    again = PackedLoader(rows, 2, 0, 2, seed=3)
    again.load_state_dict(state)
    assert [r.samples for r in again.next_step()[0]] == [r.samples for r in loaders[0].next_step()[0]]
    with pytest.raises(ConfigError, match="cannot give 2 micro-batch"):
        PackedLoader(rows[:3], dp_size=2, dp_rank=0, micro_batches=2, seed=0)


@pytest.mark.parametrize("name", ["sdar_block", "llada2_block", "masked_diffusion"])
def test_objectives(name):
    row = _row()
    obj = objective(name, "sdar")
    counts = []
    for seed in range(200):
        generator = torch.Generator().manual_seed(seed)
        masked, rate = zip(*(noise_document(s, obj, generator) for s in row.samples))
        assert not any(m[: s.prompt_len].any() for m, s in zip(masked, row.samples))  # prompts are never masked
        doc_rate = rate[0][0].item()
        if name == "llada2_block":
            assert 0.3 <= doc_rate <= 0.8
        else:
            assert 1e-3 <= doc_rate <= 1.0
        counts.append(sum(m.sum().item() for m in masked))
    assert min(counts) < max(counts)
    batch = sft_batch([row], obj, mask_token_id=99, block_size=4, generators=[torch.Generator().manual_seed(0)])
    masked_positions = batch.input_ids[0, :24] == 99
    weights = batch.loss_weights[0]
    if obj.two_stream:
        clean = row.samples[0].ids + row.samples[1].ids + [0] * 4  # pack padding is never masked
        assert batch.input_ids.shape == (1, 48) and batch.input_ids[0, 24:].tolist() == clean
        assert torch.equal(batch.position_ids[0, :24], batch.position_ids[0, 24:])
        assert (weights[24:] == 0).all()
    else:
        assert batch.input_ids.shape == (1, 24)
    assert ((weights[:24] > 0) == masked_positions).all()
    if name == "llada2_block":
        assert set(weights[:24][masked_positions].tolist()) == {1.0}
    else:
        assert (weights[:24][masked_positions] >= 1.0).all()  # 1 / p
    if name == "sdar_block":
        assert batch.loss_normalizer.item() == 7 + 5  # the answer lengths
    else:  # LLaDA2 (a plain mean), and DARE's LLaDA / Dream trainers: sum CE / p over the masked tokens' count
        assert batch.loss_normalizer.item() == masked_positions.sum().item()
    for normalize, expected in (("answer", 7 + 5), ("masked", masked_positions.sum().item())):
        again = sft_batch([row], objective(name, "sdar", normalize=normalize), mask_token_id=99, block_size=4,
                          generators=[torch.Generator().manual_seed(0)])
        assert torch.equal(again.loss_weights, batch.loss_weights) and again.loss_normalizer.item() == expected
    assert objective("auto", "llada2").name == "llada2_block" and objective("auto", "sdar").name == "sdar_block"
    assert objective("auto", "llada").name == "masked_diffusion" == objective("auto", "dream").name


def test_llada_pads_responses_with_end_of_text_to_a_fixed_length():
    """data.pad_to: the response continues with the pad (end-of-text) id up to a fixed length; the padding is
    response: masked and trained like it (LLaDA's SFT), the prompt never masked; a pad_to over the budget is
    refused by key."""
    from dare_mega.config import load_config
    from dare_mega.data.sft import tokenize_record
    from dare_mega.trainer.config import SFTConfig

    class Tokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [1, 2, 3]

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [10 + len(text)]}

    cfg = load_config(SFTConfig, None, ["data.pad_to=20", "data.token_budget=24"])
    sample = tokenize_record({"prompt": "q", "response": "ab"}, Tokenizer(), cfg.data, 4, pad_id=7, eos_id=8)
    assert sample.ids == [1, 2, 3, 12, 8] + [7] * 15 and sample.prompt_len == 3 and sample.answer_len == 17
    plain = load_config(SFTConfig, None, []).data  # the block grid only
    assert tokenize_record({"prompt": "q", "response": "ab"}, Tokenizer(), plain, 4, 7, 8).ids == [1, 2, 3, 12, 8] + [7] * 3
    rows, _ = pack([sample], budget=24)
    obj = objective("masked_diffusion", "llada")
    masked_pad = 0
    for seed in range(50):
        batch = sft_batch(rows, obj, mask_token_id=99, block_size=4, generators=[torch.Generator().manual_seed(seed)])
        masked = batch.input_ids[0] == 99
        assert not masked[:3].any() and (batch.loss_weights[0][masked] > 0).all()
        masked_pad += int(masked[5:20].sum())
    assert masked_pad > 0  # the end-of-text padding is noised and trained
    with pytest.raises(ConfigError, match="data.pad_to=32 must be within .*data.token_budget=24"):
        load_config(SFTConfig, None, ["data.pad_to=32", "data.token_budget=24"]).check()


def expected_document_weight(obj, length: int, eligible: torch.Tensor, nodes: int = 64) -> float:
    """E[sum of a document's loss weights], exactly: every mask pattern enumerated (fed to the implementation as
    uniforms below or above p), each weighted by its probability p^k (1 - p)^(n - k); the draw of t integrated
    by Gauss-Legendre quadrature (E[weight | t] is a polynomial in p over 1/p, so 64 nodes are exact to 1e-12
    where it is smooth)."""
    import itertools

    import numpy as np

    x, w = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for node, weight in zip((x + 1) / 2, w / 2):  # t_uniform in [0, 1]
        _, p = document_noise(length, eligible, float(node), torch.zeros(length), obj)
        inner = 0.0
        for pattern in itertools.product((True, False), repeat=length):
            uniforms = torch.tensor([p / 2 if m else (1 + p) / 2 for m in pattern], dtype=torch.float64)
            masked, rate = document_noise(length, eligible, float(node), uniforms, obj)
            k = sum(pattern)
            inner += p**k * (1 - p) ** (length - k) * float(loss_weights(masked, torch.full((length,), rate, dtype=torch.float64), obj).sum())
        total += weight * inner
    return total


@pytest.mark.parametrize("name", ["sdar_block", "masked_diffusion"])
def test_the_expected_weight_of_a_document_is_its_length(name):
    """The 1/p weighting is unbiased: E[sum_i 1[i masked] / p] = n for every answer length, also n = 1 (forcing
    one masked token when none was drawn gave n + E[(1 - p)^n / p], +125% at n = 4, weights up to 1 / eps)."""
    obj = objective(name, "sdar")
    for n in (1, 2, 4, 8):
        assert abs(expected_document_weight(obj, n, torch.ones(n, dtype=torch.bool)) - n) < 1e-9, n
    eligible = torch.tensor([False, True, True, False, True])  # prompt tokens and padding are never weighted
    assert abs(expected_document_weight(obj, 5, eligible) - 3) < 1e-9


def test_no_attention_crosses_packed_documents(tiny_dir, world1):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.parallel import ParallelLayout

    # the dense model: in an MoE, tokens of one document change which rows share an expert's matmul, which
    # moves other documents' logits by float rounding (1e-6) although no attention crosses
    chunks, args = build_from_hf(tiny_dir["sdar"], ParallelLayout())
    model = chunks[0].eval()
    row = _row()
    obj = objective("sdar_block", args.family)

    def logits(r):
        batch = sft_batch([r], obj, args.diffusion.mask_token_id, 4, [torch.Generator().manual_seed(1)])
        device = next(model.parameters()).device
        with torch.no_grad():
            return model(batch.input_ids.to(device), batch.position_ids.to(device), batch.mask.to(device)).cpu()

    base = logits(row)
    first = row.samples[0]
    changed = PackedRow([Sample([(t + 3) % 200 for t in first.ids], first.prompt_len), row.samples[1]], row.length)
    other = logits(changed)
    second = list(range(12, 20)) + list(range(36, 44))  # the second document in both streams
    assert (base[0, second] - other[0, second]).abs().max().item() == 0.0
    assert (base[0, :12] - other[0, :12]).abs().max().item() > 0


# ---- config and data errors ---------------------------------------------------------------------------


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.stepz \(did you mean train\.steps\?\)"):
        load_config(SFTConfig, RECIPE, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown key bogus"):
        load_config(SFTConfig, RECIPE, ["bogus.x=1"])
    with pytest.raises(ConfigError, match=r"optim\.lr='fast' must be a number"):
        load_config(SFTConfig, RECIPE, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"loss\.name='magic'"):
        load_config(SFTConfig, RECIPE, ["loss.name=magic"])
    with pytest.raises(ConfigError, match=r"data\.packing='best'"):
        load_config(SFTConfig, RECIPE, ["data.packing=best"])
    with pytest.raises(ConfigError, match=r"train\.steps=0 must be >= 1"):
        load_config(SFTConfig, RECIPE, ["train.steps=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, str(bad))
    cfg = load_config(SFTConfig, RECIPE, ["parallel.tp=2", "data.token_budget=128"])
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 3e-3


def test_data_errors(tmp_path):
    from dare_mega.data.records import read_records

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    with pytest.raises(ConfigError, match=rf"{data}:2: malformed JSON line"):
        read_records(str(data))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="the dataset is empty"):
        read_records(str(empty))
    with pytest.raises(ConfigError, match="no such data file"):
        read_records(str(tmp_path / "missing.jsonl"))
    import pandas as pd

    pd.DataFrame({"prompt": ["x", "y"], "response": ["1", "2"]}).to_parquet(tmp_path / "d.parquet")
    assert [r["response"] for r in read_records(str(tmp_path / "d.parquet"))] == ["1", "2"]


@pytest.mark.distributed
def test_run_errors_name_the_problem(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "x" * 400, "response": "y"}) + "\n")
    proc = sft(1, tmp_path / "r1", f"data.train={data}", "data.overlong=error")
    assert proc.returncode == 2 and "exceed data.token_budget=128" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    proc = sft(1, tmp_path / "r4", f"data.train={bad}")
    assert proc.returncode == 2 and "bad.jsonl:2: malformed JSON line" in proc.stderr
    assert "loading " not in proc.stderr  # refused before any weight was loaded or optimizer built
    proc = sft(1, tmp_path / "r2", "parallel.tp=3")
    assert proc.returncode == 2 and "num_attention_heads=4 is not divisible by tp=3" in proc.stderr
    proc = sft(1, tmp_path / "r3", "train.bogus=1")
    assert proc.returncode == 2 and "unknown key train.bogus" in proc.stderr


# ---- the loop ------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_loss_goes_down_and_layouts_agree(tmp_path):
    # the single-process run (one thread) alongside the multi-process ones, which it is compared with
    single = start_sft(1, tmp_path / "tp1", "train.steps=30", "train.micro_batches=2", "checkpoint.every=100",
                       "logging.wandb=offline")
    tp_ep = sft(4, tmp_path / "tp2ep2", "train.steps=4", "train.micro_batches=1", "parallel.tp=2", "parallel.ep=2",
                "checkpoint.every=100", "train.recompute=selective")
    # full recompute under the pipeline schedule (each layer's forward runs again in the backward): same losses
    pp = sft(2, tmp_path / "pp2", "train.steps=4", "train.micro_batches=2", "parallel.pp=2", "checkpoint.every=100",
             "train.recompute=full")
    single = completed(single)
    assert single.returncode == 0, single.stderr[-3000:]
    curve = losses(tmp_path / "tp1")
    first, last = sum(curve[s] for s in range(1, 11)) / 10, sum(curve[s] for s in range(21, 31)) / 10
    assert last < 0.75 * first, (first, last)
    record = json.loads(open(tmp_path / "tp1" / "metrics.jsonl").readline())
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "tp1" / "wandb"))
    assert tp_ep.returncode == 0, tp_ep.stderr[-3000:]
    assert pp.returncode == 0, pp.stderr[-3000:]
    for other in (losses(tmp_path / "tp2ep2"), losses(tmp_path / "pp2")):
        for step in range(1, 5):
            assert abs(other[step] - curve[step]) <= 1e-5 * max(1.0, abs(curve[step])), (step, other[step], curve[step])


@pytest.mark.distributed
def test_crash_and_exact_resume(tmp_path):
    common = ["train.steps=10", "checkpoint.every=2", "checkpoint.keep=3", "data.packing=ffd"]
    straight = start_sft(1, tmp_path / "straight", *common)  # alongside the run that crashes (one thread each)

    run_dir = tmp_path / "crashed"
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-m", "dare_mega.trainer.sft", "--config", RECIPE, f"run_dir={run_dir}",
                             "logging.progress=false", *common], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9, wherever it is (maybe inside a checkpoint write)
    proc.wait()
    crashed_at = max(losses(run_dir))
    assert crashed_at < 10, "the run finished before it could be killed"
    straight = completed(straight)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = losses(tmp_path / "straight")
    checkpoints = run_dir / "checkpoints"
    # a checkpoint cut off mid-write, in both shapes it can take: never resumed from
    (checkpoints / ".step_00000008.partial").mkdir(parents=True, exist_ok=True)
    (checkpoints / "step_00000009").mkdir(exist_ok=True)
    (checkpoints / "step_00000009" / ".metadata").write_text("truncated")

    resumed = sft(1, run_dir, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(resumed.stdout.split("starting at step ")[1].split()[0])
    assert start in (0, 2, 4, 6) and start <= crashed_at
    after = losses(run_dir)
    for step in range(start + 1, 11):
        assert after[step] == expected[step], f"step {step}: {after[step]} after resume, {expected[step]} straight"
    from dare_mega.trainer.checkpoint import complete_checkpoints

    assert [step for step, _ in complete_checkpoints(str(checkpoints))] == [6, 8, 10]  # keep=3
    assert (checkpoints / "step_00000009").exists()  # the cut-off one was ignored, not deleted

    # a training checkpoint exports to HF like a converted one
    from dare_mega.checkpoint.export import export_to_hf
    from dare_mega.storage.safetensors_io import CheckpointReader

    export_to_hf(str(checkpoints / "step_00000010"), str(tmp_path / "hf"))
    reader = CheckpointReader(str(tmp_path / "hf"))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in reader.names()


@pytest.mark.distributed
def test_launch_script_as_two_nodes(tmp_path):
    port = str(free_port())
    base = clean_env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE="2")
    args = ["bash", "examples/sft_sdar_moe.sh", "train.steps=2", "parallel.tp=2", "parallel.ep=2",
            "train.micro_batches=1", f"run_dir={tmp_path / 'run'}", "logging.progress=false", "checkpoint.every=100"]
    nodes = [subprocess.Popen(args, cwd=REPO, env={**base, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [o[1][-2000:] for o in outputs]
    assert "on 4 process(es)" in outputs[1][0] and "node 0/2" in outputs[1][0]
    assert sorted(losses(tmp_path / "run")) == [1, 2]
