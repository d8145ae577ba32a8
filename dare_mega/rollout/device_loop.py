"""The block-cached decoding loop with its state on the device: no host synchronisation inside a step.

The host loop (rollout/decoder.py: `_run_cached`) keeps each request's state in Python and moves every
step's logits to the CPU to sample, reveal and check stops one request at a time: on a GPU each denoising step
waits for the host. Here the whole batch's state lives in tensors on the model's device (canvas, block start,
step, cache length, log-probs, reveal steps, stop and finish), and one step is a fixed sequence of tensor
operations on fixed shapes: the cached forward of every row's current block (rows that are finished still
take part, writing nothing), sampling from uniforms drawn in advance, the reveal choice
(policies.choose_reveals_rows), the stop rules and the commit of full blocks. The host reads the state once
every `steps` forwards (one block's worth): to end the loop, to drop finished rows when half the batch is
done (a new shape, at most log2(batch) times) and to widen the cached span.

Randomness is the host loop's: each block's generator (policies.block_generator) is drawn in advance, step by
step, with the same function (policies.step_uniforms), so a seeded request decodes the same tokens with the
same log-probs as in the host loop (tests/test_sync_free_decoding.py). Unseeded requests draw from the global
generator in another order than the host loop does.

Not here (the host loop runs them): stop strings (they need the tokenizer), Dream's policies (their
position draws depend on the step's values), backends whose forwards are collectives (Megatron's).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dare_mega.rollout.policies import block_generator, choose_reveals_rows, sample_with_uniforms, step_uniforms
from dare_mega.rollout.types import DREAM_POLICIES

RUNNING, STOPPED, LENGTH = 0, 1, 2


def device_loop_supports(params) -> str | None:
    """None when the device loop decodes with `params`, else why not (the host loop does)."""
    if params.stop:
        return "stop strings are found by the tokenizer on the host"
    if params.policy in DREAM_POLICIES:
        return f"{params.policy} draws positions with counts read from the step's values"
    return None


@dataclass
class DeviceState:
    """Per live row ([R] or [R, L] tensors on the device); `request` [R] is the request index of each row."""

    request: torch.Tensor
    cache_row: torch.Tensor
    canvas: torch.Tensor  # [R, L] long, each request's canvas padded with the mask id
    prompt_len: torch.Tensor
    limit: torch.Tensor
    first_block: torch.Tensor  # grid index of the first decoded block
    block_start: torch.Tensor
    step: torch.Tensor
    initially_masked: torch.Tensor
    length: torch.Tensor  # cached positions
    done: torch.Tensor
    finish: torch.Tensor  # RUNNING, STOPPED, LENGTH
    end: torch.Tensor
    stop_end: torch.Tensor  # -1: no stop decoded yet
    forwards: torch.Tensor
    logprob: torch.Tensor  # [R, L] float32
    reveal_step: torch.Tensor  # [R, L] long, -1 where nothing was revealed
    token_uniforms: torch.Tensor  # [R, blocks, steps, T]
    position_uniforms: torch.Tensor | None  # the same, for random_static

    def select(self, keep: torch.Tensor) -> "DeviceState":
        return DeviceState(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[keep]
                              for f in fields(self)})


class DeviceLoop:
    """Decodes `requests` (rollout/decoder.py's _Request, prefilled) with `engine` (a backend with
    `_device_cached_forward`)."""

    def __init__(self, engine, requests, cache, lengths: torch.Tensor, block: int, steps: int, stop_ids: set[int],
                 params):
        self.engine, self.requests, self.cache = engine, requests, cache
        self.block, self.steps, self.params = block, steps, params
        self.mask_id = engine.args.diffusion.mask_token_id
        dev = engine.device
        self.device = dev
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
        self.early = params.stop_early if params.stop_early is not None else True
        self.offsets = torch.arange(block, device=dev)
        self.state = self._initial_state(requests, lengths)

    def _initial_state(self, requests, lengths) -> DeviceState:
        block, steps, dev = self.block, self.steps, self.device
        count = len(requests)
        width = max(r.canvas.numel() for r in requests)
        canvas = torch.full((count, width), self.mask_id, dtype=torch.long)
        for i, r in enumerate(requests):
            canvas[i, : r.canvas.numel()] = r.canvas
        first = torch.tensor([r.block_start // block for r in requests])
        blocks = max(-(-r.limit // block) - r.block_start // block for r in requests)
        token_u = torch.zeros(count, blocks, steps, block, dtype=torch.float64)
        position_u = torch.zeros_like(token_u) if self.params.policy == "random_static" else None
        for i, r in enumerate(requests):  # each block's generator, step by step, as the host loop draws them
            for b in range(-(-r.limit // block) - r.block_start // block):
                generator = block_generator(r.seed, r.block_start // block + b)
                for s in range(steps):
                    drawn = step_uniforms(generator, block, self.params)
                    token_u[i, b, s] = drawn["token"].double()
                    if position_u is not None:
                        position_u[i, b, s] = drawn["position"]
        long = dict(dtype=torch.long)
        state = DeviceState(
            request=torch.arange(count), cache_row=torch.arange(count), canvas=canvas,
            prompt_len=torch.tensor([len(r.prompt) for r in requests]), limit=torch.tensor([r.limit for r in requests]),
            first_block=first, block_start=torch.tensor([r.block_start for r in requests]),
            step=torch.zeros(count, **long), initially_masked=torch.tensor([r.initially_masked for r in requests]),
            length=lengths.clone().long(), done=torch.zeros(count, dtype=torch.bool), finish=torch.zeros(count, **long),
            end=torch.zeros(count, **long), stop_end=torch.full((count,), -1, **long), forwards=torch.zeros(count, **long),
            logprob=torch.zeros(count, width), reveal_step=torch.full((count, width), -1, **long),
            token_uniforms=token_u, position_uniforms=position_u)
        return DeviceState(**{f.name: None if getattr(state, f.name) is None else getattr(state, f.name).to(dev)
                              for f in fields(state)})

    # ---- one denoising step of every row: tensor operations only ------------------------------------------
    def step(self, span: int) -> None:
        s, block, mask_id, params = self.state, self.block, self.mask_id, self.params
        rows = torch.arange(s.canvas.shape[0], device=self.device)
        window = s.block_start[:, None] + self.offsets  # [R, T]
        tokens = s.canvas.gather(1, window)
        active = ~s.done
        committing = (tokens != mask_id).all(1)
        # full blocks write their keys and values; the others (and finished rows) only read the cache
        write = (committing & active)[:, None].expand(-1, block)
        logits = self.engine._device_cached_forward(self.cache, s.cache_row, s.length, tokens, window, write, span)
        denoising = active & ~committing

        index = (s.block_start // block - s.first_block).clamp(0, s.token_uniforms.shape[1] - 1)
        at = s.step.clamp(max=self.steps - 1)
        uniforms = s.token_uniforms[rows, index, at]  # [R, T]
        new, confidence, logprob, entropy = (x.view(tokens.shape) for x in sample_with_uniforms(
            logits.reshape(-1, logits.shape[-1]), params, uniforms.reshape(-1), never=mask_id))
        if s.position_uniforms is not None:  # random_static: the order of reveals is random
            confidence = s.position_uniforms[rows, index, at]
        masked = tokens == mask_id
        reveal = choose_reveals_rows(masked, confidence, entropy, s.step, self.steps, s.initially_masked, params)
        reveal = reveal & denoising[:, None]
        after = torch.where(reveal, new, tokens)
        s.canvas.scatter_(1, window, after)
        s.logprob.scatter_(1, window, torch.where(reveal, logprob.float(), s.logprob.gather(1, window)))
        s.reveal_step.scatter_(1, window, torch.where(reveal, s.step[:, None], s.reveal_step.gather(1, window)))
        s.step = s.step + denoising.long()

        # a block that has just been filled: stop token, or max_new_tokens (rollout/decoder.py: _check_stop)
        filled = denoising & (after != mask_id).all(1)
        answer = (window >= s.prompt_len[:, None]) & (window < s.limit[:, None])
        stops = torch.isin(after, self.stop_ids) & answer
        found = filled & stops.any(1) & (s.stop_end < 0)
        s.stop_end = torch.where(found, s.block_start + stops.int().argmax(1) + 1, s.stop_end)
        stopped = filled & (s.stop_end >= 0) & self.early
        at_limit = filled & ~stopped & (s.block_start + block >= s.limit)
        has_stop = s.stop_end >= 0
        s.finish = torch.where(stopped | (at_limit & has_stop), STOPPED, torch.where(at_limit, LENGTH, s.finish))
        s.end = torch.where(stopped | (at_limit & has_stop), s.stop_end, torch.where(at_limit, s.limit, s.end))
        s.done = s.done | stopped | at_limit

        # a committed block: its keys are cached, the next block starts
        commit = (committing & active).long()
        s.length = s.length + commit * block
        s.block_start = s.block_start + commit * block
        s.step = s.step * (1 - commit)
        following = s.canvas.gather(1, (s.block_start[:, None] + self.offsets).clamp(max=s.canvas.shape[1] - 1))
        s.initially_masked = torch.where(commit.bool(), (following == mask_id).sum(1), s.initially_masked)
        s.forwards = s.forwards + active.long()
        self.engine.stats["forwards"] += 1

    # ---- the host's look, once per block's worth of steps ---------------------------------------------------
    def run(self) -> None:
        span = self._span()
        while True:
            for _ in range(self.steps):
                self.step(span)
            done = self.state.done.cpu()  # the one read of the device's state per `steps` forwards
            if bool(done.all()):
                break
            if int(done.sum()) * 2 >= done.numel():  # half the rows are done: drop them (a new shape)
                self._flush(done)
                self.state = self.state.select((~done).nonzero()[:, 0].to(self.device))
            span = self._span()
        self._flush(torch.ones(self.state.done.shape[0], dtype=torch.bool))

    def _span(self) -> int:
        """Cached positions a row can read before the next look: its length grows by one block per commit."""
        reach = int(self.state.length.max()) + self.block * self.steps
        return min(reach, self.cache.max_len)

    def _flush(self, rows: torch.Tensor) -> None:
        """Hand the finished rows' results to their requests (on the host)."""
        s = self.state
        picked = rows.nonzero()[:, 0]
        if not picked.numel():
            return
        host = {f.name: getattr(s, f.name)[picked.to(self.device)].cpu()
                for f in fields(s) if f.name not in ("token_uniforms", "position_uniforms")}
        names = {STOPPED: "stop", LENGTH: "length"}
        for j in range(picked.numel()):
            r = self.requests[int(host["request"][j])]
            n = r.canvas.numel()
            r.canvas = host["canvas"][j, :n].clone()
            revealed = (host["reveal_step"][j, :n] >= 0).nonzero()[:, 0].tolist()
            for p in revealed:
                r.logprobs[p] = float(host["logprob"][j, p])
                r.reveal_step[p] = int(host["reveal_step"][j, p])
            r.forwards += int(host["forwards"][j])
            r.block_start, r.step = int(host["block_start"][j]), int(host["step"][j])
            r.done, r.finish_reason, r.end = True, names[int(host["finish"][j])], int(host["end"][j])
