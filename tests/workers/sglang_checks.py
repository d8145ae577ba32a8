"""Checks of dare_mega against sglang 0.5.23's own code, in one process (sglang's modules patch torch and need the
stand-ins of tests/sglang_standins.py, so never in the pytest process).

    python tests/workers/sglang_checks.py OUT.json CHECK [CHECK ...]

Each CHECK writes what it measured under its name in OUT.json; the tests assert on the numbers.
"""

import json
import os
import sys
from types import SimpleNamespace

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.dirname(TESTS))

import sglang_standins  # noqa: E402

sglang_standins.install()

import torch  # noqa: E402


def payload():
    """dare_mega's flattened, serialized bucket decoded by SGLang's receiver code."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    from dare_mega.weight_sync.wire import flatten, serialize

    g = torch.Generator().manual_seed(0)
    named = [("a.weight", torch.randn(3, 5, generator=g, dtype=torch.bfloat16)),
             ("b.bias", torch.randn(7, generator=g)), ("c.expert_bias", torch.randn(2, 2, generator=g).double()),
             ("d.flag", torch.tensor([1, 0, 1], dtype=torch.uint8)), ("e.idx", torch.arange(4, dtype=torch.int32))]
    monkey_patch_torch_reductions()  # as SGLang's tp worker does before deserializing
    data = MultiprocessingSerializer.deserialize(serialize(flatten(named)))
    metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                        end_idx=m.end_idx, numel=m.numel) for m in data["metadata"]]
    got = dict(FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=metadata).reconstruct_tensors())
    sent = dict(named)
    exact = sorted(n for n in sent if n in got and got[n].dtype == sent[n].dtype and torch.equal(got[n], sent[n]))
    # the distributed route: SGLang allocates the receive buffer from (names, dtypes, shapes) in the order sent
    ours = flatten(named)
    empty = FlattenedTensorBucket.empty([m.name for m in ours["metadata"]],
                                        [str(m.dtype).replace("torch.", "") for m in ours["metadata"]],
                                        [list(m.shape) for m in ours["metadata"]], "cpu")
    layout_equal = [(m.name, m.start_idx, m.end_idx) for m in ours["metadata"]] == \
        [(m.name, m.start_idx, m.end_idx) for m in empty.get_metadata()]
    empty.get_flattened_tensor().copy_(ours["flattened_tensor"])  # what the broadcast delivers
    via_empty = dict(empty.reconstruct_tensors())
    exact_empty = sorted(n for n in sent if torch.equal(via_empty[n], sent[n]))
    return {"sent": sorted(sent), "exact": exact, "layout_equal": layout_equal, "exact_via_empty": exact_empty}


def uuid_reduction():
    """A CUDA tensor's reduction as dare_mega produces it carries the GPU's UUID, and SGLang's patched rebuild
    maps it to the receiver's own index of that GPU (no GPU here: torch's CUDA reduction and device properties
    are replaced by records of what they would return)."""
    import io
    import pickle

    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from torch.multiprocessing import reductions

    from dare_mega.weight_sync import wire

    sender_uuids = {0: "GPU-aaaa", 1: "GPU-bbbb", 2: "GPU-cccc"}  # the trainer process's numbering
    receiver_uuids = ["GPU-cccc", "GPU-bbbb"]  # the engine sees two GPUs, in another order
    original_reduce, original_props = reductions.reduce_tensor, torch.cuda.get_device_properties
    tensor = torch.zeros(3)
    fake_args = (torch.Tensor, (3,), (1,), 0, torch.UntypedStorage, torch.float32, 2, b"handle", 12, 0, False,
                 b"ref", 0, b"event", True)
    try:
        reductions.reduce_tensor = lambda t: (reductions.rebuild_cuda_tensor, fake_args)
        torch.cuda.get_device_properties = lambda i: SimpleNamespace(uuid=sender_uuids[i])
        rebuild, args = wire.reduce_with_device_uuid(tensor)
        buffer = io.BytesIO()
        pickle.Pickler(buffer).dump(SimpleNamespace(call=(rebuild, args)))
    finally:
        reductions.reduce_tensor, torch.cuda.get_device_properties = original_reduce, original_props
    monkey_patch_torch_reductions()
    received = {}
    original_count, original_props = torch.cuda.device_count, torch.cuda.get_device_properties
    saved = reductions._rebuild_cuda_tensor_original
    try:
        torch.cuda.device_count = lambda: len(receiver_uuids)
        torch.cuda.get_device_properties = lambda i: SimpleNamespace(uuid=receiver_uuids[i])
        reductions._rebuild_cuda_tensor_original = lambda *a: received.setdefault("args", a) and "rebuilt"
        call = MultiprocessingSerializer.deserialize(buffer.getvalue()).call
        call[0](*call[1])  # the receiver's rebuild_cuda_tensor: SGLang's patched one
    finally:
        torch.cuda.device_count, torch.cuda.get_device_properties = original_count, original_props
        reductions._rebuild_cuda_tensor_original = saved
    return {"wire_device": args[wire.CUDA_DEVICE_ARG], "receiver_device": received["args"][wire.CUDA_DEVICE_ARG],
            "other_args_kept": list(map(repr, args[:6])) == list(map(repr, fake_args[:6]))}


def dllm_defaults():
    """Each family's sglang_dllm against SGLang's own DllmConfig.from_server_args, for every architecture."""
    import tempfile

    from fake_sglang import dllm_config_of, import_sglang

    from dare_mega.models.family import families

    sg = import_sglang()
    sg.load_plugins()
    out = {}
    for family in families():
        for arch in family.architectures:
            directory = tempfile.mkdtemp()
            with open(os.path.join(directory, "config.json"), "w") as f:
                json.dump({"architectures": [arch], "vocab_size": 1000, "block_size": 32}, f)
            args = sg.prepare_server_args(["--model-path", directory, "--dllm-algorithm", "LowConfidence"])
            try:
                config = dllm_config_of(sg, args)
                served = {"block_size": config.block_size, "mask_id": config.mask_id}
            except RuntimeError as e:  # SGLang does not serve it as a diffusion LLM: the registry says None
                served = None if "Unknown diffusion LLM" in str(e) else str(e)
            out[arch] = {"sglang": served, "registry": family.sglang_dllm}
    return out


def launch_command():
    """SGLangServerConfig's command through SGLang's own parser, and the algorithm it names through SGLang's
    plugin loading (dare_mega's entry point) and algorithm table."""
    import tempfile

    import yaml
    from fake_sglang import dllm_config_of, import_sglang

    from dare_mega.checkpoint.tiny import cached_tiny_checkpoint
    from dare_mega.models.builder import load_model_args
    from dare_mega.rollout.sglang_engine import SGLangServerConfig

    sg = import_sglang()
    sg.load_plugins()
    hf = cached_tiny_checkpoint("tiny-sdar-moe")
    config = SGLangServerConfig.for_model(hf, load_model_args(hf), tp=2, dllm_config={"threshold": 0.8})
    path = os.path.join(tempfile.mkdtemp(), "dllm.yaml")
    yaml.safe_dump(config.algorithm_config(), open(path, "w"))
    command = config.command(30123, hf, path)
    launcher = command[: command.index("--model-path")]
    args = sg.prepare_server_args(command[len(launcher):])
    dllm = dllm_config_of(sg, args)
    algorithm = sg.get_algorithm(dllm)
    return {"launcher": launcher[1:], "model_path": args.model_path == hf, "tp_size": args.tp_size,
            "port": args.port, "dllm_algorithm": args.dllm_algorithm,
            "max_running_requests": args.max_running_requests, "algorithm_class": type(algorithm).__name__,
            "block_size": dllm.block_size, "fill_id": dllm.mask_id, "model_mask_id": algorithm.model_mask_id,
            "threshold": algorithm.options["threshold"]}


def bad_flag():
    """SGLang's parser on a command with a flag it does not know (what tests/fake_sglang.py parses with)."""
    from fake_sglang import import_sglang

    try:
        import_sglang().prepare_server_args(["--model-path", "/m", "--no-such-flag"])
    except SystemExit as e:
        return {"exit": e.code}
    return {"exit": None}


class ModelRunner:
    """What DllmAlgorithm.run calls: forward(forward_batch) -> logits of every block position, computed by the
    native engine's model over each request's committed tokens and its current block (block-causal)."""

    def __init__(self, model, contexts):
        self.model, self.contexts, self.forwards = model, contexts, 0

    def forward(self, forward_batch, pp_proxy_tensors=None):
        block = forward_batch.input_ids.numel() // forward_batch.batch_size
        blocks = forward_batch.input_ids.view(forward_batch.batch_size, block)
        rows = []
        for i, committed in enumerate(self.contexts):
            tokens = torch.cat([committed, blocks[i]])
            n = tokens.numel()
            span = torch.arange(n) // block
            mask = span[None, :] <= span[:, None]
            logits = self.model(tokens[None], torch.arange(n)[None], mask[None])[0]
            rows.append(logits[-block:])
        self.forwards += 1
        return SimpleNamespace(logits_output=SimpleNamespace(full_logits=torch.cat(rows)), can_run_graph=False)


def algorithm_vs_native(spec: dict):
    """Requests decoded by DareMegaDecoding inside SGLang's own block loop (DllmAlgorithm.run, sync mode) on a
    real ForwardBatch, block after block as SGLang's scheduler feeds them, against the native engine's
    uncached decoding of each request alone with the same seed: the tokens of every block."""
    from sglang.srt.dllm.config import DllmConfig
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSampling

    from dare_mega.checkpoint.tiny import cached_tiny_checkpoint
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.rollout.sglang_algorithm import DareMegaDecoding
    from dare_mega.rollout.types import SamplingParams

    engine = NativeEngine.from_pretrained(cached_tiny_checkpoint(spec["model"]), device="cpu", tokenizer=False)
    diffusion = engine.args.diffusion
    block, mask = diffusion.block_size, diffusion.mask_token_id
    fill = spec.get("fill_id", mask)
    settings = {"block_size": block, "mask_id": mask, **spec["settings"]}
    config = DllmConfig("DareMegaDecoding", settings, block, fill, 8)
    algorithm = DareMegaDecoding(config)
    prompts, seeds, sampling = spec["prompts"], spec["seeds"], spec["sampling"]
    new_tokens = spec["max_new_tokens"]
    claims = spec.get("claims")  # per-request unmasking settings, as SGLangEngine sends them
    custom = {"custom_params": {"dare_mega": {"block_size": block, "mask_id": mask, **claims}}} if claims else {}
    # what SGLang's request carries after parsing
    sg_params = [SGLangSampling(**sampling, **custom) for _ in prompts]
    canvases = [list(p) for p in prompts]
    ends = [-(-(len(p) + new_tokens) // block) * block for p in prompts]
    rids = [f"req{i}#{seed}" for i, seed in enumerate(seeds)]
    for rid, sp in zip(rids, sg_params):  # the scheduler validates every request before it decodes
        error = DareMegaDecoding.validate_request(SimpleNamespace(sampling_params=sp, dllm_config=config, rid=rid))
        assert error is None, error
    rounds = 0
    while any(len(c) < e for c, e in zip(canvases, ends)):
        live = [i for i, (c, e) in enumerate(zip(canvases, ends)) if len(c) < e]
        starts = [len(canvases[i]) // block * block for i in live]
        blocks = [canvases[i][s:] + [fill] * (block - (len(canvases[i]) - s)) for i, s in zip(live, starts)]
        n = len(live)
        info = SamplingBatchInfo(
            temperatures=torch.tensor([sg_params[i].temperature for i in live]).view(-1, 1),
            top_ps=torch.tensor([sg_params[i].top_p for i in live]),
            top_ks=torch.tensor([sg_params[i].top_k for i in live], dtype=torch.int32),
            min_ps=torch.zeros(n), is_all_greedy=False, is_any_greedy=False, need_top_p_sampling=True,
            need_top_k_sampling=True, need_min_p_sampling=False, vocab_size=engine.args.vocab_size)
        # SGLang's positions of a dLLM block: its offset on the grid and the block's positions after it
        positions = torch.tensor([s + k for s in starts for k in range(block)])
        batch = ForwardBatch(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=n, positions=positions,
                             input_ids=torch.tensor(sum(blocks, []), dtype=torch.long),
                             req_pool_indices=torch.arange(n), seq_lens=torch.tensor(ends)[live],
                             out_cache_loc=torch.zeros(0, dtype=torch.long), seq_lens_sum=0,
                             rids=[rids[i] for i in live], sampling_info=info)
        runner = ModelRunner(engine.model, [torch.tensor(canvases[i][:s], dtype=torch.long)
                                            for i, s in zip(live, starts)])
        _, emitted, _, _, _ = algorithm.run(runner, batch)
        for k, i in enumerate(live):
            canvases[i] += emitted[k].tolist()  # the block's positions after the committed ones
        rounds += 1
    ours = [c[len(p):] for c, p in zip(canvases, prompts)]
    native = []
    greedy = sampling.get("temperature", 1.0) == 0
    for prompt, seed in zip(prompts, seeds):
        seed += spec.get("native_seed_shift", 0)  # a control: other seeds must give other tokens
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if greedy else sampling["temperature"],
                                top_k=sampling.get("top_k", 0), top_p=sampling.get("top_p", 1.0), seeds=(seed,),
                                stop_token_ids=(), **{**spec["settings"], **(claims or {})})
        native.append(engine.generate([prompt], params, cache=False)[0].generated_ids)
    return {"ours": ours, "native": native, "rounds": rounds,
            "masks_left": sum(t in (mask, fill) for c in ours for t in c)}


def main():
    out, checks = sys.argv[1], sys.argv[2:]
    results = {}
    for check in checks:
        name, _, arg = check.partition("=")
        function = globals()[name]
        results[check] = function(json.loads(arg)) if arg else function()
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
