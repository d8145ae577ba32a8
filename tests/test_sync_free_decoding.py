"""The decoding loop on the device (rollout/device_loop.py) against the host loop it replaces, and its promise:
no value read on the host inside a denoising step.

Equality: the same seeded requests (uneven prompts, every block-diffusion policy, greedy and sampled, stop
tokens, rows that finish early and leave the batch) decode the same tokens, reveal steps, forwards and finish
reasons, with log-probs within 1e-5 (the device loop reads the cache over a span fixed between looks, so the
attention sums over more masked positions). No sync: every aten operation of one step is recorded on CPU and
none of those that make a GPU wait for the host (reading a value, or an output whose size depends on values)
may appear.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dare_mega.rollout import device_loop
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.types import SamplingParams

PROMPTS = [[5], [11, 12, 13, 14, 15], [7] * 9, list(range(30, 56)), [3, 4], list(range(60, 73))]
TOL = 1e-5


@pytest.fixture(scope="module")
def engines(tiny_dir):
    return {family: NativeEngine.from_pretrained(tiny_dir[family], tokenizer=False)
            for family in ("sdar", "llada2_moe")}


def both_loops(engine, params, prompts=PROMPTS):
    engine.device_loop = False
    host = engine.generate(prompts, params)
    engine.device_loop = True
    return host, engine.generate(prompts, params)


def assert_same(host, device):
    for i, (h, d) in enumerate(zip(host, device)):
        assert d.generated_ids == h.generated_ids, f"request {i}"
        assert d.completion_ids == h.completion_ids and d.finish_reason == h.finish_reason, f"request {i}"
        assert d.generated_reveal_steps == h.generated_reveal_steps and d.forwards == h.forwards, f"request {i}"
        assert max(abs(a - b) for a, b in zip(d.generated_logprobs, h.generated_logprobs)) <= TOL, f"request {i}"


@pytest.mark.parametrize("family", ["sdar", "llada2_moe"])
@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=12, temperature=0.0, seed=0, stop_token_ids=()),
    SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, threshold=0.3, stop_token_ids=()),
    SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, seed=1, policy="low_confidence_static", steps=2,
                   block_size=8, stop_token_ids=()),
    SamplingParams(max_new_tokens=9, temperature=1.0, seed=2, policy="entropy_bounded", entropy_bound=8.0,
                   stop_token_ids=()),
    SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, policy="random_static"),
    SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop_early=False,
                   stop_token_ids=tuple(range(0, 500, 3))),
], ids=["greedy", "top-p", "static-block8", "entropy", "random", "stop-late"])
def test_the_device_loop_decodes_what_the_host_loop_decodes(engines, family, params):
    host, device = both_loops(engines[family], params)
    assert_same(host, device)


def test_rows_that_stop_early_leave_the_batch_and_the_rest_decode_alike(engines, monkeypatch):
    """Many stop tokens: most requests stop in their first blocks, the batch shrinks, the others go on."""
    shrinks = []
    select = device_loop.DeviceState.select
    monkeypatch.setattr(device_loop.DeviceState, "select",
                        lambda self, keep: shrinks.append((self.canvas.shape[0], keep.numel())) or select(self, keep))
    prompts = PROMPTS + [[9] * k for k in range(1, 11)]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11, stop_token_ids=tuple(range(0, 500, 16)))
    host, device = both_loops(engines["llada2_moe"], params, prompts)
    assert_same(host, device)
    reasons = [c.finish_reason for c in host]
    assert "stop" in reasons and "length" in reasons, reasons
    assert shrinks and all(after <= before // 2 for before, after in shrinks), shrinks


# operations that make a GPU wait for the host: a value read back, or an output sized by the values
SYNCING = ("_local_scalar_dense", "item", "nonzero", "masked_select", "bincount", "unique", "repeat_interleave",
           "argwhere", "histc", "tolist", "equal", "is_nonzero")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["sdar", "llada2_moe"])
def test_a_denoising_step_reads_nothing_on_the_host(engines, family, monkeypatch):
    engine = engines[family]
    steps = []
    original = device_loop.DeviceLoop.step

    def recorded(self, span):
        if len(steps) >= 3:  # three steps recorded (prefill done, some rows committing): enough, and cheaper
            return original(self, span)
        with RecordOps() as record:
            original(self, span)
        steps.append(record.names)

    monkeypatch.setattr(device_loop.DeviceLoop, "step", recorded)
    engine.device_loop = True
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=5))
    assert len(steps) == 3 and all(len(names) > 50 for names in steps)
    seen = {name.split(".")[0] for names in steps for name in names}
    assert "scaled_dot_product_attention" in seen or any("attention" in n for n in seen)
    syncing = sorted(n for n in seen if n.rstrip("_") in SYNCING)
    assert not syncing, f"a denoising step reads on the host: {syncing}"


def test_what_the_device_loop_leaves_to_the_host_loop():
    assert device_loop.device_loop_supports(SamplingParams(stop=("\n\n",))) is not None
    assert device_loop.device_loop_supports(SamplingParams(policy="maskgit_plus")) is not None
    assert device_loop.device_loop_supports(SamplingParams()) is None


@pytest.mark.parametrize("family,dtype", [("sdar", torch.float32), ("llada2_moe", torch.bfloat16)])
def test_a_denoising_step_traces_as_one_graph(tiny_dir, family, dtype, monkeypatch):
    """torch.compile sees one step as a single graph (no break: nothing data-dependent on the host), the
    condition for compiling it or capturing it in a CUDA graph. The MoE model in bfloat16: torch's grouped
    GEMM is traced for bfloat16 only (its float32 products on a CPU run eagerly)."""
    import torch._dynamo as dynamo

    engine = NativeEngine.from_pretrained(tiny_dir[family], dtype=dtype, tokenizer=False)
    loops = []
    run = device_loop.DeviceLoop.run
    monkeypatch.setattr(device_loop.DeviceLoop, "run", lambda self: loops.append(self) or run(self))
    engine.generate(PROMPTS[:3], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5))
    loop = loops[0]
    explained = dynamo.explain(device_loop.DeviceLoop.step)(loop, loop._span())
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_window_logits_are_the_full_forward_s(tiny_dir, family):
    """Only a window's logits (the output layer on one block of a whole-canvas forward) equal those positions
    of the full forward's, shifted prediction (Dream) and document starts included."""
    engine = NativeEngine.from_pretrained(tiny_dir[family], tokenizer=False)
    torch.manual_seed(0)
    tokens = torch.randint(0, engine.args.vocab_size, (3, 20))
    positions = torch.stack([torch.arange(20), torch.arange(20), torch.cat([torch.arange(8), torch.arange(12)])])
    mask = torch.ones(3, 20, 20, dtype=torch.bool)
    full = engine.model(tokens, positions, mask)
    starts = torch.tensor([0, 7, 6])  # a row's first token, one inside, one across a document start (row 2)
    window = engine.model(tokens, positions, mask, window=(starts, 5))
    expected = torch.stack([full[b, s : s + 5] for b, s in enumerate(starts.tolist())])
    assert window.shape == (3, 5, full.shape[-1]) and (window - expected).abs().max() <= 1e-5
