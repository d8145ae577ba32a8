"""The native block-diffusion rollout engine: one machine, CPU or GPU, no server.

Decoding, per request, on the block grid of the family (from position 0 of the prompt; the prompt's last
partial block is the head of the first decoded block and stays fixed):

  prefill   the prompt's full blocks, once, block-causal, writing the KV cache;
  denoise   up to `steps` forwards of the current block: it sees the cache and itself, writes nothing;
            each forward samples every position and the policy reveals some masked ones;
  commit    one forward of the finished block, writing its keys and values (skipped when the request stops).

All active requests move together, one forward per iteration, each at its own block: a request in its
denoising phase and one committing share the forward (only the committing rows write the cache).
Requests of different lengths batch together; finished ones leave the batch. `cache=False` recomputes the
whole sequence every step instead (same tokens and log-probs; for checking and benchmarks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dare_mega.data.tokenizer import load_tokenizer
from dare_mega.errors import ConfigError
from dare_mega.rollout.model import InferenceModel, KVCache
from dare_mega.rollout.policies import choose_reveals, sample_block
from dare_mega.rollout.types import Completion, SamplingParams, prompt_ids


@dataclass
class _Request:
    index: int
    prompt: list[int]
    canvas: torch.Tensor  # prompt, then mask ids, to the end of the last block
    limit: int  # prompt length + max_new_tokens
    generator: torch.Generator | None
    block_start: int = 0
    step: int = 0
    initially_masked: int = 0
    forwards: int = 0
    logprobs: dict = field(default_factory=dict)  # position -> log-prob at reveal
    reveal_step: dict = field(default_factory=dict)  # position -> step within its block
    done: bool = False
    finish_reason: str = ""
    end: int = 0  # completion end (exclusive), positions
    text: str = ""


class NativeEngine:
    """generate(prompts, params) -> completions with trajectories; load_weights(named tensors, version)."""

    def __init__(self, model: InferenceModel, table, tokenizer=None, device="cpu"):
        self.model = model
        self.args = model.args
        self.table = table
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.weight_version = 0
        self._hf_owner = {name: b for b in table.bindings() for name in b.hf_names}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self.stats = {"forwards": 0, "tokens": 0, "seconds": 0.0}

    # ---- construction and weights ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | None = None,
                        tokenizer: bool = True) -> "NativeEngine":
        """From an HF checkpoint directory, or a dare_mega torch_dist checkpoint directory."""
        import os

        from dare_mega.models.builder import load_model_args, mapping_for
        from dare_mega.models.hf_loader import check_hf_checkpoint
        from dare_mega.models.weight_mapping import LayoutContext

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if os.path.exists(os.path.join(path, "dare_mega.json")):
            from dare_mega.checkpoint.torch_dist import ASSETS_DIR, TorchDistReader, args_of, key_for_canonical

            args = args_of(path)
            table = mapping_for(args)
            model = InferenceModel(args, dtype, device)
            reader = TorchDistReader(path)
            ctx = LayoutContext.of(args)
            for binding in table.bindings():
                key, expert = key_for_canonical(binding.megatron_name)
                model.set_full(binding.megatron_name, binding.row.unpad(reader.read(key, expert), ctx))
            assets = os.path.join(path, ASSETS_DIR)
        else:
            args = load_model_args(path)
            table = mapping_for(args)
            model = InferenceModel(args, dtype, device)
            model.load_from_reader(table, check_hf_checkpoint(args, path, table))
            assets = path
        return cls(model, table, load_tokenizer(assets) if tokenizer else None, device)

    def load_weights(self, named_tensors, version: int | None = None) -> int:
        """Update weights from (HF name, tensor) pairs, e.g. a bucket of the trainer's weight sync. Tensors
        that together form one Megatron tensor (q, k, v; gate, up) are applied once all have arrived. The
        weight version changes only when `version` is given (the sync's last bucket)."""
        from dare_mega.models.weight_mapping import LayoutContext

        ctx = LayoutContext.of(self.args)
        applied = 0
        for name, tensor in named_tensors:
            binding = self._hf_owner.get(name)
            if binding is None:
                raise ConfigError(f"load_weights: {name!r} is not a tensor of {self.args.architecture}")
            parts = self._pending.setdefault(binding.megatron_name, {})
            parts[name] = tensor
            if len(parts) == len(binding.hf_names):
                full = binding.row.to_megatron([parts[n] for n in binding.hf_names], ctx)
                self.model.set_full(binding.megatron_name, full)
                del self._pending[binding.megatron_name]
                applied += 1
        if version is not None:
            self.weight_version = version
        return applied

    def routed_experts(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                       chunk: int = 8) -> dict[int, torch.Tensor]:
        """The experts this engine routes each token of a batch to: {layer: [B, S, topk]}; `mask` is the dense
        boolean attention mask [B, 1 or none, S, S] (the trainer's rows, to compare with its own routing)."""
        mask = mask.reshape(mask.shape[0], mask.shape[-2], mask.shape[-1])
        out: dict[int, list[torch.Tensor]] = {}
        for start in range(0, input_ids.shape[0], chunk):
            rows = slice(start, start + chunk)
            self.model.routing_record = {}
            try:
                dev = self.model.device
                self.model(input_ids[rows].to(dev), position_ids[rows].to(dev), mask[rows].to(dev), logits=False)
                for layer, chosen in self.model.routing_record.items():
                    out.setdefault(layer, []).append(chosen)
            finally:
                self.model.routing_record = None
        return {layer: torch.cat(parts) for layer, parts in out.items()}

    # ---- generation ------------------------------------------------------------------------------------
    def encode(self, prompts) -> list[list[int]]:
        return [prompt_ids(p, self.tokenizer) for p in prompts]

    def generate(self, prompts, params: SamplingParams = SamplingParams(), cache: bool = True) -> list[Completion]:
        params.check()
        if not prompts:
            raise ConfigError("generate: the prompt list is empty")
        prompt_ids = self.encode(prompts)
        block = params.block_size or self.args.diffusion.block_size
        steps = params.steps or block
        mask_id = self.args.diffusion.mask_token_id
        stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else self.args.diffusion.eos_token_ids)
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer")
        context = self.args.max_position_embeddings
        requests = []
        for i, ids in enumerate(prompt_ids):
            limit = len(ids) + params.max_new_tokens
            length = -(-limit // block) * block
            if length > context:
                raise ConfigError(
                    f"generate: prompt {i} has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"it needs {length} positions, more than the model's context of {context}"
                )
            bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
            if bad:
                raise ConfigError(f"generate: prompt {i} has token ids outside the vocabulary: {bad[:5]}")
            canvas = torch.full((length,), mask_id, dtype=torch.long)
            canvas[: len(ids)] = torch.tensor(ids, dtype=torch.long)
            seed = params.seeds[i] if params.seeds else (None if params.seed is None else params.seed + i)
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            requests.append(_Request(i, list(ids), canvas, limit, generator))
        start = time.perf_counter()
        if cache:
            self._run_cached(requests, block, steps, stop_ids, params)
        else:
            self._run_uncached(requests, block, steps, stop_ids, params)
        self.stats["seconds"] += time.perf_counter() - start
        completions = [self._completion(r, block) for r in requests]
        self.stats["tokens"] += sum(len(c.completion_ids) for c in completions)
        return completions

    # ---- the two decoding loops ------------------------------------------------------------------------
    def _start_block(self, r: _Request, start: int, mask_id: int) -> None:
        r.block_start, r.step = start, 0
        r.initially_masked = int((r.canvas[start : start + self._block] == mask_id).sum())

    def _run_cached(self, requests, block, steps, stop_ids, params):
        self._block = block
        mask_id = self.args.diffusion.mask_token_id
        dev = self.device
        max_len = max(r.canvas.numel() for r in requests)
        cache = KVCache.empty(self.args, len(requests), max_len, self.model.dtype, dev)
        full = [len(r.prompt) // block * block for r in requests]
        if max(full) > 0:  # prefill the prompts' full blocks, block-causal
            tokens, positions, new_mask = self._prefixes(requests, full, block)
            self.model(tokens, positions, new_mask, cache=cache, store=True, logits=False)
            cache.lengths = torch.tensor(full, device=dev)
            self.stats["forwards"] += 1
            for r, f in zip(requests, full):
                r.forwards += int(f > 0)
        for r, f in zip(requests, full):
            self._start_block(r, f, mask_id)
        active = list(range(len(requests)))
        ones = torch.ones(1, block, block, dtype=torch.bool, device=dev)
        while active:
            rows = [requests[i] for i in active]
            tokens = torch.stack([r.canvas[r.block_start : r.block_start + block] for r in rows]).to(dev)
            positions = torch.stack([torch.arange(r.block_start, r.block_start + block) for r in rows]).to(dev)
            committing = [bool((t != mask_id).all()) for t in tokens]
            # rows that commit write their block's keys and values; the others only read the cache
            logits = self.model(tokens, positions, ones.expand(len(rows), -1, -1), cache=cache,
                                store=torch.tensor(committing, device=dev))
            self.stats["forwards"] += 1
            keep = []
            for j, r in enumerate(rows):
                r.forwards += 1
                if committing[j]:
                    cache.lengths[j] += block
                    self._start_block(r, r.block_start + block, mask_id)
                else:
                    self._denoise(r, logits[j].cpu(), tokens[j].cpu(), steps, params, mask_id)
                    if not (r.canvas[r.block_start : r.block_start + block] == mask_id).any():
                        self._check_stop(r, block, stop_ids, params)
                if not r.done:
                    keep.append(j)
            if len(keep) < len(rows):
                cache = cache.select(torch.tensor(keep, dtype=torch.long, device=dev))
                active = [active[j] for j in keep]

    def _run_uncached(self, requests, block, steps, stop_ids, params):
        self._block = block
        mask_id = self.args.diffusion.mask_token_id
        for r in requests:
            self._start_block(r, len(r.prompt) // block * block, mask_id)
        active = list(range(len(requests)))
        while active:
            rows = [requests[i] for i in active]
            tokens, positions, new_mask = self._prefixes(rows, [r.block_start + block for r in rows], block)
            logits = self.model(tokens, positions, new_mask)
            self.stats["forwards"] += 1
            for j, r in enumerate(rows):
                r.forwards += 1
                current = logits[j, r.block_start : r.block_start + block].cpu()
                self._denoise(r, current, r.canvas[r.block_start : r.block_start + block], steps, params, mask_id)
                if not (r.canvas[r.block_start : r.block_start + block] == mask_id).any():
                    self._check_stop(r, block, stop_ids, params)
                    if not r.done:
                        self._start_block(r, r.block_start + block, mask_id)
            active = [i for i in active if not requests[i].done]

    def _prefixes(self, rows, ends: list[int], block: int):
        """Each row's canvas up to its end, padded to the longest, with the block-causal mask (padding
        positions attend only to themselves)."""
        dev = self.device
        width = max(ends)
        tokens = torch.stack([torch.nn.functional.pad(r.canvas[:e], (0, width - min(e, r.canvas.numel())))
                              for r, e in zip(rows, ends)]).to(dev)
        positions = torch.arange(width, device=dev).expand(len(rows), width)
        valid = torch.tensor(ends, device=dev)[:, None] > torch.arange(width, device=dev)[None, :]
        blk = torch.arange(width, device=dev) // block
        causal = blk[None, :] <= blk[:, None]
        eye = torch.eye(width, dtype=torch.bool, device=dev)[None]
        return tokens, positions, (causal[None] & valid[:, None, :] & valid[:, :, None]) | eye

    # ---- per request -----------------------------------------------------------------------------------
    def _denoise(self, r: _Request, logits: torch.Tensor, block_tokens: torch.Tensor, steps, params, mask_id):
        masked = block_tokens == mask_id
        tokens, confidence, logprob, entropy = sample_block(logits, params, r.generator, never=mask_id)
        reveal = choose_reveals(masked, confidence, entropy, r.step, steps, r.initially_masked, params)
        for offset in torch.nonzero(reveal)[:, 0].tolist():
            position = r.block_start + offset
            r.canvas[position] = tokens[offset]
            r.logprobs[position] = float(logprob[offset])
            r.reveal_step[position] = r.step
        r.step += 1

    def _check_stop(self, r: _Request, block: int, stop_ids: set[int], params) -> None:
        """After a block is fully decoded: stop token, stop string, or max_new_tokens."""
        block_end = r.block_start + block
        start = len(r.prompt)
        region = r.canvas[start:block_end].tolist()
        for k, token in enumerate(region):
            if token in stop_ids and start + k < r.limit:
                r.done, r.finish_reason, r.end = True, "stop", start + k + 1
                return
        if params.stop:
            upto = min(block_end, r.limit)
            text = self.tokenizer.decode(r.canvas[start:upto].tolist(), skip_special_tokens=False)
            hits = [text.find(s) for s in params.stop if s in text]
            if hits:
                cut = min(hits)
                for end in range(start + 1, upto + 1):  # the fewest tokens whose text reaches the stop string
                    if len(self.tokenizer.decode(r.canvas[start:end].tolist(), skip_special_tokens=False)) > cut:
                        break
                r.done, r.finish_reason, r.end, r.text = True, "stop", end, text[:cut]
                return
        if block_end >= r.limit:
            r.done, r.finish_reason, r.end = True, "length", r.limit

    def _completion(self, r: _Request, block: int) -> Completion:
        start = len(r.prompt)
        decoded_end = max(r.reveal_step) + 1 if r.reveal_step else start
        decoded_end = -(-decoded_end // block) * block
        positions = range(start, r.end)
        completion = r.canvas[start : r.end].tolist()
        text = r.text
        if not text and self.tokenizer is not None:
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
        generated = range(start, decoded_end)
        return Completion(
            prompt_ids=r.prompt,
            completion_ids=completion,
            text=text,
            finish_reason=r.finish_reason,
            logprobs=[r.logprobs[p] for p in positions],
            reveal_steps=[r.reveal_step[p] for p in positions],
            generated_ids=r.canvas[start:decoded_end].tolist(),
            generated_logprobs=[r.logprobs[p] for p in generated],
            generated_reveal_steps=[r.reveal_step[p] for p in generated],
            block_size=block,
            forwards=r.forwards,
            weight_version=self.weight_version,
        )
