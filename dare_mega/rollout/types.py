"""The records that cross the rollout boundary: sampling parameters in, completions with trajectories out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dare_mega.errors import ConfigError

POLICIES = ("low_confidence_static", "low_confidence_dynamic", "entropy_bounded", "random_static",
            # Dream's diffusion_generate algorithms (its `alg`), on its timestep schedule
            "origin", "maskgit_plus", "topk_margin", "entropy")
DREAM_POLICIES = ("origin", "maskgit_plus", "topk_margin", "entropy")
CONFIDENCES = ("sampling", "raw")


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. `steps` caps the denoising forwards per block (default: the block size)."""

    max_new_tokens: int = 256
    policy: str = "low_confidence_dynamic"
    steps: int | None = None
    threshold: float = 0.9  # low_confidence_dynamic: reveal every masked token above this probability
    entropy_bound: float = 0.35  # entropy_bounded: reveal the lowest-entropy tokens whose entropies sum below it
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = 0  # request i uses seed + i unless `seeds` gives one per request
    seeds: tuple[int, ...] | None = None
    block_size: int | None = None  # default: the model family's
    stop_token_ids: tuple[int, ...] | None = None  # default: the model's EOS ids
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    # the recorded log-probs divide the logits by this (default: the sampling temperature; 1 when greedy)
    logprob_temperature: float | None = None
    # Dream's policies: the schedule's last timestep (timesteps linspace(1, eps, steps + 1)) and the temperature
    # of the choice of positions (0: the most confident; > 0: drawn from softmax(confidence / alg_temp))
    eps: float = 1e-3
    alg_temp: float = 0.0
    # a request whose stop (token or string) is decoded: end after that block (True), or decode every block to
    # max_new_tokens with the answer still ending at the stop (False); None: the family's way, True for block
    # diffusion, False for masked diffusion (LLaDA's generate fills its canvas; DARE's LLaDA / Dream rollouts
    # train on every position of it)
    stop_early: bool | None = None
    # the confidence the low-confidence policies rank by: the sampled token's probability under the distribution
    # it was drawn from ("sampling": tempered, top-k / top-p filtered, the mask id excluded) or under the softmax
    # of the raw logits over the whole vocabulary ("raw": LLaDA's generate, DARE's LLaDA rollouts); None: the
    # family's (ModelFamily.decoding: raw for LLaDA and LLaDA-MoE, sampling for the others)
    confidence: str | None = None

    def check(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"sampling: policy={self.policy!r}; expected one of {', '.join(POLICIES)}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"sampling: max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"sampling: steps={self.steps} must be >= 1")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"sampling: block_size={self.block_size} must be >= 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"sampling: threshold={self.threshold} must be within [0, 1]")
        if self.entropy_bound <= 0:
            raise ConfigError(f"sampling: entropy_bound={self.entropy_bound} must be > 0")
        if self.temperature < 0:
            raise ConfigError(f"sampling: temperature={self.temperature} must be >= 0")
        if self.logprob_temperature is not None and self.logprob_temperature <= 0:
            raise ConfigError(f"sampling: logprob_temperature={self.logprob_temperature} must be > 0")
        if self.top_k < 0:
            raise ConfigError(f"sampling: top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling: top_p={self.top_p} must be within (0, 1]")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"sampling: eps={self.eps} must be within (0, 1)")
        if self.confidence is not None and self.confidence not in CONFIDENCES:
            raise ConfigError(f"sampling: confidence={self.confidence!r}; expected one of {', '.join(CONFIDENCES)}")
        if self.alg_temp < 0:
            raise ConfigError(f"sampling: alg_temp={self.alg_temp} must be >= 0")


@dataclass
class Completion:
    """One finished request.

    completion_ids / logprobs / reveal_steps: the answer, cut after the first stop token (kept) or stop
    string, or at max_new_tokens; one log-prob and one reveal step (the denoising step, within its block,
    that unmasked the token) per token. generated_*: everything the blocks decoded, including tokens after
    the stop inside the last block, which the next steps of that block were conditioned on (what a replay
    of the trajectory needs). logprobs are log softmax(logits / T) of the sampled token (T: logprob_temperature,
    by default the sampling temperature, 1 when greedy),
    without top-k / top-p truncation: the quantity the trainer recomputes.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float]
    reveal_steps: list[int]
    generated_ids: list[int]
    generated_logprobs: list[float]
    generated_reveal_steps: list[int]
    block_size: int
    forwards: int  # model forwards this request took part in (prefill, denoising steps, commits)
    weight_version: int = 0
    seed: int | None = None  # the request's sampling seed (what a replay of its trajectory regenerates from)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(prompt, tokenizer) -> list[int]:
    """A prompt as token ids: ids stay as they are; text is one user message and a list of chat messages
    ({"role", "content"}, verl's and DARE's prompt layout) is the conversation, both through the tokenizer's
    chat template with the generation prompt."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise ConfigError("text and chat prompts need a tokenizer; give prompt ids instead")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "input_ids") else list(ids)
    return [int(t) for t in prompt]
