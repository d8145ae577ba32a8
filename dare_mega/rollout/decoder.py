"""Block-diffusion decoding, whatever runs the model: the per-request state, the uncached loop, the unmasking
step, stop handling and the completions with their trajectories.

Decoding, per request, on the block grid of the family (from position 0 of the prompt; the prompt's last
partial block is the head of the first decoded block and stays fixed): up to `steps` forwards of the current
block, each sampling every position while the policy reveals some masked ones; when the block is full, the
stop rules are checked and the next block starts. All active requests move together, one forward per
iteration, each at its own block; finished ones leave the batch.

Masked diffusion models (LLaDA: `diffusion.attention == "full"`) decode semi-autoregressively as LLaDA's
generate() does: the canvas is the prompt and max_new_tokens masks in whole blocks counted from the end of the
prompt; every forward is the whole canvas with bidirectional attention (the later blocks still masked), and the
current block's logits decide. No KV cache is exact for them (every key changes with every step): `cache=True`
gives them Fast-dLLM's prefix cache, `cache="dual"` its dual cache, both approximations (rollout/masked_cache.py).

A backend provides `_block_logits` (the logits of each row's current block, from a forward of its whole
prefix) and, for the cached loop, `_cached_forward` (a forward with the block KV cache of
diffusion/kv_cache.py; `supports_cache`). Backends whose forwards are collectives across replicas (the
Megatron backend: expert-parallel all-to-alls) keep replicas in step with `_another_forward` and
`_idle_forward`; in the others these are a pass-through and a no-op.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from dare_mega.errors import ConfigError
from dare_mega.models.family import family_named
from dare_mega.rollout.device_loop import DeviceLoop, device_loop_supports
from dare_mega.rollout.masked_cache import cache_mode, run_masked_cached
from dare_mega.rollout.policies import block_generator, denoise_step
from dare_mega.rollout.types import Completion, SamplingParams, prompt_ids


@dataclass
class _Request:
    index: int
    prompt: list[int]
    canvas: torch.Tensor  # prompt, then mask ids, to the end of the last block
    limit: int  # prompt length + max_new_tokens
    seed: int | None
    generator: torch.Generator | None = None  # the current block's (policies.block_generator)
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
    stop_end: int | None = None  # where the answer ends, once a stop is decoded (the request may go on)
    stop_text: str = ""


class BlockDecoder:
    """generate(prompts, params) -> completions with trajectories. Subclasses set `args` (ModelArgs),
    `tokenizer`, `device` and `weight_version`, and implement `_block_logits`."""

    supports_cache = False
    supports_device_loop = False  # implements _device_cached_forward (rollout/device_loop.py)

    def __init__(self, args, tokenizer=None, device="cpu"):
        self.args = args
        self.device_loop = True  # the cached loop runs on the device when the backend and the params allow it
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.weight_version = 0
        self.stats = {"forwards": 0, "tokens": 0, "seconds": 0.0}
        self._full = args.diffusion.attention == "full"  # masked diffusion (set again by every generate)

    # ---- what a backend provides -----------------------------------------------------------------------
    def _block_logits(self, tokens, positions, mask, starts: torch.Tensor, width: int) -> torch.Tensor:
        """tokens / positions [B, S], mask bool [B, S, S] (True = may attend): float32 logits [B, width, vocab]
        on the CPU of positions starts[b] .. starts[b] + width - 1 of each row."""
        raise NotImplementedError

    def _cached_forward(self, cache, slots: list[int], lengths, tokens, positions, new_mask, write,
                        logits: bool, starts=None, width=None, replaced=None):
        """A forward with the block KV cache (diffusion/kv_cache.py): row j is request slots[j] (its cache row),
        with lengths[j] cached positions (but not those in replaced[j] = [start, stop), when given); tokens /
        positions [B, T], new_mask [B, T, T], write [B, T]. Returns float32 logits [B, T, vocab] on the CPU (with
        `starts` [B]: only [B, width, vocab], of tokens starts[j] .. starts[j] + width - 1), or None when `logits`
        is False."""
        raise NotImplementedError

    def _device_cached_forward(self, cache, rows, lengths, tokens, positions, write, span: int) -> torch.Tensor:
        """`_cached_forward` for the device loop: every argument already on the device, the new tokens of a row
        seeing each other, the writes done without reading `write` on the host, the cache read over `span`
        positions; float32 logits [B, T, vocab] stay on the device."""
        raise NotImplementedError

    def _another_forward(self, active: bool) -> bool:
        """Whether the loop runs another forward (this replica has active requests)."""
        return active

    def _idle_forward(self, block: int) -> None:
        """A forward that keeps other replicas' collectives company (none without them)."""

    # ---- generation ------------------------------------------------------------------------------------
    def encode(self, prompts) -> list[list[int]]:
        return [prompt_ids(p, self.tokenizer) for p in prompts]

    def generate(self, prompts, params: SamplingParams = SamplingParams(), cache: bool | str = True
                 ) -> list[Completion]:
        """`cache`: False (recompute every step), True (the family's cache: the exact block KV cache for block
        diffusion, Fast-dLLM's prefix cache for masked diffusion), or "prefix" / "dual" (masked diffusion)."""
        params.check()
        if not prompts:
            raise ConfigError("generate: the prompt list is empty")
        if params.confidence is None:  # the family's way of ranking its low-confidence reveals
            confidence = family_named(self.args.family).decoding.get("confidence", "sampling")
            params = dataclasses.replace(params, confidence=confidence)
        self._full = self.args.diffusion.attention == "full"
        mode = cache_mode(cache, self._full, self.args.architecture)
        if mode == "block" and self.args.diffusion.shifted_logits:  # a block's first token is a cached output's
            raise ConfigError(f"generate: {self.args.architecture} predicts shifted tokens; the block KV cache "
                              "does not support that; decode with cache=False")
        if mode and not self.supports_cache:
            raise ConfigError(f"generate: {type(self).__name__} does not implement the block KV cache yet; decode "
                              "with cache=False (rollout.cache=false)")
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
            # the block grid: from position 0 (block diffusion), from the end of the prompt (masked diffusion)
            origin = len(ids) if self._full else 0
            length = origin + -(-(limit - origin) // block) * block
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
            requests.append(_Request(i, list(ids), canvas, limit, seed))
        start = time.perf_counter()
        if mode == "block":
            self._run_cached(requests, block, steps, stop_ids, params)
        elif mode:
            run_masked_cached(self, requests, block, steps, stop_ids, params, mode)
        else:
            self._run_uncached(requests, block, steps, stop_ids, params)
        self.stats["seconds"] += time.perf_counter() - start
        completions = [self._completion(r, block) for r in requests]
        self.stats["tokens"] += sum(len(c.completion_ids) for c in completions)
        return completions

    # ---- the two decoding loops ------------------------------------------------------------------------
    def _start_block(self, r: _Request, start: int, mask_id: int) -> None:
        r.block_start, r.step = start, 0
        origin = len(r.prompt) if self._full else 0
        r.generator = block_generator(r.seed, (start - origin) // self._block)
        r.initially_masked = int((r.canvas[start : start + self._block] == mask_id).sum())

    def _run_cached(self, requests, block, steps, stop_ids, params):
        """prefill: the prompts' full blocks, once, block-causal, writing the cache; denoise: up to `steps`
        forwards of each current block, seeing the cache and itself, writing nothing; commit: one forward of
        a finished block, writing its keys and values (skipped when the request stops). A request in its
        denoising phase and one committing share the forward. After the prefill the loop runs on the device
        (rollout/device_loop.py) when the backend and the params allow it, else here, on the host."""
        from dare_mega.diffusion.kv_cache import BlockKVCache

        self._block = block
        mask_id = self.args.diffusion.mask_token_id
        # one row per request and a spare one for padding rows; room at the end for padding positions
        cache = BlockKVCache(len(requests) + 1, max(r.canvas.numel() for r in requests) + block)
        lengths = torch.zeros(len(requests), dtype=torch.long)
        full = [len(r.prompt) // block * block for r in requests]
        slots = [i for i, f in enumerate(full) if f > 0]
        self._another_forward(True)  # the prefill round: every replica takes part (idle when nothing to fill)
        if slots:
            ends = [full[i] for i in slots]
            tokens, positions, new_mask = self._prefixes([requests[i] for i in slots], ends, block)
            write = positions < torch.tensor(ends, device=positions.device)[:, None]
            self._cached_forward(cache, slots, lengths[slots], tokens, positions, new_mask, write, logits=False)
            lengths[slots] = torch.tensor(ends)
            self.stats["forwards"] += 1
            for i in slots:
                requests[i].forwards += 1
        else:
            self._idle_forward(block)
        for r, f in zip(requests, full):
            self._start_block(r, f, mask_id)
        if self.device_loop and self.supports_device_loop and device_loop_supports(params) is None:
            DeviceLoop(self, requests, cache, lengths, block, steps, stop_ids, params).run()
            return
        active = list(range(len(requests)))
        ones = torch.ones(1, block, block, dtype=torch.bool)
        while self._another_forward(bool(active)):
            if not active:
                self._idle_forward(block)
                continue
            rows = [requests[i] for i in active]
            tokens = torch.stack([r.canvas[r.block_start : r.block_start + block] for r in rows])
            positions = torch.stack([torch.arange(r.block_start, r.block_start + block) for r in rows])
            committing = (tokens != mask_id).all(dim=1)
            # rows that commit write their block's keys and values; the others only read the cache
            logits = self._cached_forward(cache, active, lengths[active], tokens, positions,
                                          ones.expand(len(rows), -1, -1), committing[:, None].expand(-1, block),
                                          logits=True)
            self.stats["forwards"] += 1
            for j, r in enumerate(rows):
                r.forwards += 1
                if committing[j]:
                    lengths[active[j]] += block
                    self._start_block(r, r.block_start + block, mask_id)
                else:
                    self._denoise(r, logits[j], tokens[j], steps, params, mask_id)
                    if not (r.canvas[r.block_start : r.block_start + block] == mask_id).any():
                        self._check_stop(r, block, stop_ids, params)
            active = [i for i in active if not requests[i].done]

    def _run_uncached(self, requests, block, steps, stop_ids, params):
        self._block = block
        mask_id = self.args.diffusion.mask_token_id
        for r in requests:
            self._start_block(r, len(r.prompt) if self._full else len(r.prompt) // block * block, mask_id)
        active = list(range(len(requests)))
        while self._another_forward(bool(active)):
            if not active:  # this replica is done, others are not: keep their collectives company
                self._idle_forward(block)
                continue
            rows = [requests[i] for i in active]
            # masked diffusion sees the whole canvas, the later blocks still masked
            ends = [r.canvas.numel() if self._full else r.block_start + block for r in rows]
            tokens, positions, new_mask = self._prefixes(rows, ends, block)
            starts = torch.tensor([r.block_start for r in rows])
            logits = self._block_logits(tokens, positions, new_mask, starts, block)
            self.stats["forwards"] += 1
            for j, r in enumerate(rows):
                r.forwards += 1
                current = logits[j]
                self._denoise(r, current, r.canvas[r.block_start : r.block_start + block], steps, params, mask_id)
                if not (r.canvas[r.block_start : r.block_start + block] == mask_id).any():
                    self._check_stop(r, block, stop_ids, params)
                    if not r.done:
                        self._start_block(r, r.block_start + block, mask_id)
            active = [i for i in active if not requests[i].done]

    def _prefixes(self, rows, ends: list[int], block: int):
        """Each row's canvas up to its end, padded to the longest, with the block-causal mask (bidirectional
        over the row for masked diffusion; padding positions attend only to themselves)."""
        dev = self.device
        width = max(ends)
        tokens = torch.stack([torch.nn.functional.pad(r.canvas[:e], (0, width - min(e, r.canvas.numel())))
                              for r, e in zip(rows, ends)]).to(dev)
        positions = torch.arange(width, device=dev).expand(len(rows), width)
        valid = torch.tensor(ends, device=dev)[:, None] > torch.arange(width, device=dev)[None, :]
        blk = torch.arange(width, device=dev) // block
        causal = blk[None, :] <= blk[:, None]
        if self._full:
            causal = torch.ones_like(causal)
        eye = torch.eye(width, dtype=torch.bool, device=dev)[None]
        return tokens, positions, (causal[None] & valid[:, None, :] & valid[:, :, None]) | eye

    # ---- per request -----------------------------------------------------------------------------------
    def _denoise(self, r: _Request, logits: torch.Tensor, block_tokens: torch.Tensor, steps, params, mask_id):
        reveal, tokens, logprob = denoise_step(logits, block_tokens, mask_id, r.generator, r.step, steps,
                                               r.initially_masked, params)
        for offset in torch.nonzero(reveal)[:, 0].tolist():
            position = r.block_start + offset
            r.canvas[position] = tokens[offset]
            r.logprobs[position] = float(logprob[offset])
            r.reveal_step[position] = r.step
        r.step += 1

    def _check_stop(self, r: _Request, block: int, stop_ids: set[int], params) -> None:
        """After a block is fully decoded: stop token, stop string, or max_new_tokens. A request whose stop
        comes early keeps decoding its later blocks when `params.stop_early` says so (masked diffusion by
        default: LLaDA's generate fills the whole canvas and DARE trains on all of it); its answer still ends
        at the stop."""
        if r.stop_end is None:
            r.stop_end, r.stop_text = self._find_stop(r, block, stop_ids, params)
        early = params.stop_early if params.stop_early is not None else not self._full
        if r.stop_end is not None and early:
            r.done, r.finish_reason, r.end, r.text = True, "stop", r.stop_end, r.stop_text
        elif r.block_start + block >= r.limit:
            r.done, r.finish_reason = True, "stop" if r.stop_end is not None else "length"
            r.end, r.text = (r.stop_end, r.stop_text) if r.stop_end is not None else (r.limit, "")

    def _find_stop(self, r: _Request, block: int, stop_ids: set[int], params) -> tuple[int | None, str]:
        """(end of the answer, its text when a stop string cut it) at the first stop in what is decoded so far,
        or (None, "")."""
        block_end = r.block_start + block
        start = len(r.prompt)
        region = r.canvas[start:block_end].tolist()
        for k, token in enumerate(region):
            if token in stop_ids and start + k < r.limit:
                return start + k + 1, ""
        if params.stop:
            upto = min(block_end, r.limit)
            text = self.tokenizer.decode(r.canvas[start:upto].tolist(), skip_special_tokens=False)
            hits = [text.find(s) for s in params.stop if s in text]
            if hits:
                cut = min(hits)
                for end in range(start + 1, upto + 1):  # the fewest tokens whose text reaches the stop string
                    if len(self.tokenizer.decode(r.canvas[start:end].tolist(), skip_special_tokens=False)) > cut:
                        break
                return end, text[:cut]
        return None, ""

    def _completion(self, r: _Request, block: int) -> Completion:
        start = len(r.prompt)
        decoded_end = r.block_start + block  # the end of the last block decoded
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
            seed=r.seed,
        )
