"""Each token's reveal step and log-prob for completions that arrive without them (SGLang's responses carry
only the tokens), by replaying the decoding on another engine's model: the trainer's own shards (the Megatron
rollout backend) in the RL loop.

The replay decodes every block of a completion at once. Step s is one forward of the two-stream row
[x_t ; x_0]: the noisy stream holds every block as the replay has it at step s (revealed tokens visible, the
rest masked), the clean stream the engine's tokens, and a noisy block attends to itself and to the clean blocks
before it, which is what the block saw when it was decoded (the cache of committed blocks; the trajectory
estimator's rows). On each block's logits it runs the engine's own step (rollout/policies.denoise_step) with the
block's generator (policies.block_generator: the request's seed and the block index), so it draws the numbers
the engine drew and reveals what the engine revealed, as long as both models give the same logits. The engine's
token is kept at each revealed position (teacher forcing); where the replay's own choice differs the token is
counted as a mismatch (numerics, or a server decoding with other weights or settings). Positions after the
engine's stop inside the last block, which the engine decoded but did not return, take the replay's tokens.

A block takes at most `steps` forwards, so a replay is at most `steps` forwards of rows twice the completion's
length, against the engine's (blocks x steps) forwards of one block each; the logits of each forward are cut to
the response's blocks and the rows are split so that a forward's logits stay under `logits_bytes`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from dare_mega.diffusion.masks import two_stream_mask
from dare_mega.errors import ConfigError
from dare_mega.rollout.policies import block_generator, denoise_step, likelihood_log_probs
from dare_mega.rollout.types import Completion, SamplingParams


@dataclass
class ReplayStats:
    forwards: int = 0
    checked: int = 0  # tokens compared with the engine's
    mismatched: int = 0  # of those, where the replay's own choice differed
    samples_mismatched: int = 0  # completions with at least one mismatch
    seconds: float = 0.0

    @property
    def mismatch_fraction(self) -> float:
        return self.mismatched / self.checked if self.checked else 0.0


@dataclass
class _Trace:
    """One completion being replayed: positions [head, end) are its blocks, [prompt, end) its response."""

    completion: Completion
    canvas: torch.Tensor  # prompt, the engine's tokens, then (after its stop) the replay's
    known: torch.Tensor  # bool: position holds an engine token
    state: torch.Tensor  # the noisy stream: masked until revealed
    reveal: torch.Tensor  # step that revealed each response position (-1 until then)
    logprob: torch.Tensor
    head: int
    generators: dict  # block start -> generator
    initially_masked: dict  # block start -> masked positions at its first step
    mismatched: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.completion.prompt_ids)

    @property
    def end(self) -> int:
        return self.canvas.numel()

    def open_blocks(self, block: int, mask_id: int) -> list[int]:
        """Blocks with response positions still masked."""
        return [b for b in range(self.head, self.end, block)
                if bool((self.state[max(b, self.prompt_len) : b + block] == mask_id).any())]


def replay(decoder, completions: list[Completion], params: SamplingParams,
           logits_bytes: int = 1 << 30) -> tuple[list[Completion], ReplayStats]:
    """completions (tokens only) -> the same completions with logprobs / reveal_steps / generated_* filled, and
    the replay's counts. `decoder`: a BlockDecoder (its `_block_logits`, and `_another_forward` / `_idle_forward`
    for engines whose replicas run forwards together: a replica with nothing to replay still calls this, with
    []). `params`: the sampling parameters the completions were decoded with (their seeds are the completions')."""
    params.check()
    args = decoder.args
    if args.diffusion.attention == "full":
        raise ConfigError(f"replay: {args.architecture} is a masked diffusion model; the replay's two-stream rows "
                          "are those of block diffusion")
    mask_id, vocab = args.diffusion.mask_token_id, args.vocab_size
    block = params.block_size or args.diffusion.block_size
    steps = params.steps or block
    wrong = sorted({c.block_size for c in completions} - {block})
    if wrong:
        raise ConfigError(f"replay: completions decoded with block size {wrong[0]}, but the replay's model decodes "
                          f"with {block}")
    if params.temperature > 0 and any(c.seed is None for c in completions):
        raise ConfigError("replay: a completion sampled at temperature > 0 without a seed cannot be replayed (its "
                          "random numbers are unknown); decode with seeds (SamplingParams.seed / seeds)")
    for i, c in enumerate(completions):
        bad = [(k, t) for k, t in enumerate(c.completion_ids) if not 0 <= t < args.vocab_size or t == mask_id]
        if bad:
            k, t = bad[0]
            raise ConfigError(f"replay: completion {i} holds token {t} at answer position {k}, "
                              f"{'the mask id' if t == mask_id else f'outside the vocabulary of {args.vocab_size}'}"
                              f": not a decoded token (a server decoding another model?)")
    traces = [_trace(c, block, mask_id) for c in completions]
    stats = ReplayStats()
    start = time.perf_counter()
    longest = max([t.end - t.head for t in traces] + [block])
    rows_per_forward = max(1, logits_bytes // (longest * vocab * 4))

    def work():
        for step in range(steps):
            live = [t for t in traces if t.open_blocks(block, mask_id)]
            for k in range(0, len(live), rows_per_forward):
                yield step, live[k : k + rows_per_forward]

    items = work()
    item = next(items, None)
    while decoder._another_forward(item is not None):
        if item is None:  # this replica is done, others are not
            decoder._idle_forward(block)
            continue
        step, rows = item
        logits = _forward(decoder, rows, block)
        stats.forwards += 1
        for j, t in enumerate(rows):
            for b in t.open_blocks(block, mask_id):
                offset = b - t.head
                _step(t, logits[j, offset : offset + block], b, block, step, steps, params, mask_id)
        item = next(items, None)
    out = [_completion(t) for t in traces]
    stats.checked = sum(int(t.known[t.prompt_len :].sum()) for t in traces)
    stats.mismatched = sum(t.mismatched for t in traces)
    stats.samples_mismatched = sum(t.mismatched > 0 for t in traces)
    stats.seconds = time.perf_counter() - start
    return out, stats


def _trace(c: Completion, block: int, mask_id: int) -> _Trace:
    prompt, answer = list(c.prompt_ids), list(c.completion_ids)
    p = len(prompt)
    end = -(-(p + len(answer)) // block) * block if answer else p
    canvas = torch.full((end,), mask_id, dtype=torch.long)
    canvas[: p + len(answer)] = torch.tensor(prompt + answer, dtype=torch.long)
    known = torch.zeros(end, dtype=torch.bool)
    known[p : p + len(answer)] = True
    state = canvas.clone()
    state[p:] = mask_id
    head = p // block * block
    starts = range(head, end, block)
    return _Trace(c, canvas, known, state, torch.full((end - p,), -1, dtype=torch.long), torch.zeros(end - p),
                  head, {b: block_generator(c.seed, b // block) for b in starts},
                  {b: b + block - max(b, p) for b in starts})  # the response positions of each block


def _forward(decoder, rows: list[_Trace], block: int) -> torch.Tensor:
    """One two-stream forward of the rows: logits [rows, width, vocab] of each row's blocks, from its head."""
    length = max(2 * t.end for t in rows)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.eye(length, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends only to itself
    for j, t in enumerate(rows):
        n = t.end
        tokens[j, : 2 * n] = torch.cat([t.state, t.canvas])
        positions[j, : 2 * n] = torch.arange(n).repeat(2)
        mask[j, : 2 * n, : 2 * n] = two_stream_mask(torch.arange(n)[None], block).dense()[0, 0]
    starts = torch.tensor([t.head for t in rows])
    width = max(t.end - t.head for t in rows)
    return decoder._block_logits(tokens.to(decoder.device), positions.to(decoder.device), mask.to(decoder.device),
                                 starts, width)


def _step(t: _Trace, logits: torch.Tensor, b: int, block: int, step: int, steps: int, params: SamplingParams,
          mask_id: int) -> None:
    """The engine's denoising step on block b; the engine's token kept where it has one."""
    p = t.prompt_len
    # the prompt is never revealed, even where it holds the mask id itself (DareMegaDecoding's prompt mask)
    prompt = torch.arange(b, b + block) < p
    reveal, tokens, logprob = denoise_step(logits, t.state[b : b + block], mask_id, t.generators[b], step, steps,
                                           t.initially_masked[b], params, prompt=prompt)
    for offset in torch.nonzero(reveal)[:, 0].tolist():
        position = b + offset
        value = float(logprob[offset])
        if t.known[position] and int(tokens[offset]) != int(t.canvas[position]):
            t.mismatched += 1
            value = float(likelihood_log_probs(logits[offset : offset + 1], params)[0, t.canvas[position]])
        elif not t.known[position]:
            t.canvas[position] = tokens[offset]
        t.state[position] = t.canvas[position]
        t.reveal[position - p] = step
        t.logprob[position - p] = value


def _completion(t: _Trace) -> Completion:
    c, n = t.completion, len(t.completion.completion_ids)
    logprobs, reveal = t.logprob.tolist(), t.reveal.tolist()
    extra = {**c.extra, "replay_mismatches": t.mismatched}
    return dataclasses.replace(c, logprobs=logprobs[:n], reveal_steps=reveal[:n],
                               generated_ids=t.canvas[t.prompt_len :].tolist(), generated_logprobs=logprobs,
                               generated_reveal_steps=reveal, extra=extra)
