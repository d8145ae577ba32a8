"""What every estimator is made of, and the pieces several of them draw noise with.

An estimator (one file in this folder, registered with `@register`) declares:
- `Options`: a dataclass of its own settings, read from `algorithm.options` (unknown keys are refused);
- `needs`: what it needs from the rollout ("step_maps": the step that revealed each token; "rollout_logprobs":
  the sampling log-probs, for importance correction), and `uses_old` (whether its loss compares with the
  policy that sampled: the trainer's forward-only old-log-prob pass); `random_rows` (whether its rows are
  noise: each epoch over a rollout then draws fresh noise);
- `rows(samples, generators)`: the noisy and clean rows of sample i drawn from generators[i] only (seeded per
  sample by the trainer, so the noise does not depend on how samples are split over ranks; never a global
  seed); the trainer lays them out as two-stream [x_t ; x_0] rows (block diffusion) or as x_t alone with
  bidirectional attention (masked diffusion, `Sample.masked_diffusion`);
- `masked_diffusion`: whether it is defined on masked-diffusion models (full attention); one that is not is
  refused by name before the run starts;
- `quantities(logp, plan)`: plain differentiable torch over the [rows, length] log-probs: per token ("token"
  level) or per sequence;
- `loss(q, q_old, samples, cfg, totals, q_ref, q_rollout)`: this rank's share of the global loss (the sum over
  data-parallel ranks is the loss) and the numbers worth logging;
- `describe(block_diffusion)`: what it computes on the model at hand, for the run's start-up line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ESTIMATORS: dict[str, type] = {}


def register(cls):
    ESTIMATORS[cls.name] = cls
    return cls


@dataclass
class Sample:
    """One completion as the trainer sees it: the prompt, every decoded token and its reveal step (within its
    block). `masked_diffusion`: the model attends to the whole sequence (LLaDA, Dream) and its blocks are
    counted from the end of the prompt, as their semi-autoregressive decoding counts them; otherwise blocks
    are on the global grid from position 0 (block diffusion)."""

    prompt_ids: list[int]
    generated_ids: list[int]
    reveal_steps: list[int]
    block_size: int
    rollout_logprobs: list[float] | None = None
    advantage: float = 0.0
    masked_diffusion: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.generated_ids)

    def clean(self) -> torch.Tensor:
        return torch.tensor(self.prompt_ids + self.generated_ids, dtype=torch.long)

    def response(self) -> list[int]:
        """Positions (in the full sequence) of the response."""
        return list(range(self.prompt_len, self.prompt_len + self.length))

    def block_of(self, position: int) -> int:
        """The block index of a position: on the global grid (block diffusion) or counted from the end of the
        prompt (masked diffusion)."""
        origin = self.prompt_len if self.masked_diffusion else 0
        return (position - origin) // self.block_size

    def blocks(self) -> list[list[int]]:
        """Positions (in the full sequence) of the response, grouped by block (`block_of`)."""
        groups: dict[int, list[int]] = {}
        for p in self.response():
            groups.setdefault(self.block_of(p), []).append(p)
        return list(groups.values())


@dataclass
class Rows:
    noisy: list[torch.Tensor] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)

    def add(self, sample_index: int, clean: torch.Tensor, masked_positions, mask_id: int) -> int:
        noisy = clean.clone()
        if len(masked_positions):
            noisy[torch.as_tensor(list(masked_positions), dtype=torch.long)] = mask_id
        self.noisy.append(noisy)
        self.clean.append(clean)
        self.sample.append(sample_index)
        return len(self.noisy) - 1


@dataclass(frozen=True)
class Totals:
    """Global counts over every data-parallel rank of the step: what the losses normalise by."""

    samples: int
    tokens: int  # response tokens


def new_stats() -> dict:
    return {"clipped": 0.0, "units": 0.0, "kl": 0.0, "tis_mean": 0.0, "tis_truncated": 0.0, "tis_tokens": 0.0,
            "rollout_gap": 0.0, "ratio_max_dev": 0.0}


def track_ratio(stats: dict, ratio: torch.Tensor) -> None:
    if ratio.numel():
        stats["ratio_max_dev"] = max(stats["ratio_max_dev"], float((ratio.detach() - 1).abs().max()))


def masked_subset(positions: list[int], count: int, generator: torch.Generator) -> list[int]:
    """`count` of `positions`, uniformly among the subsets of that size."""
    order = torch.randperm(len(positions), generator=generator)[:count].tolist()
    return sorted(positions[i] for i in order)


def masked_prompt(sample: Sample, probability: float, generator: torch.Generator) -> list[int]:
    """Prompt positions masked i.i.d. with `probability` (d1's and SPG's prompt noise)."""
    if probability <= 0:
        return []
    draws = torch.rand(sample.prompt_len, generator=generator)
    return [p for p in range(sample.prompt_len) if float(draws[p]) < probability]


def stratified_counts(k: int, size: int, rows: int, low: int) -> list[int]:
    """Stratified counts over the `size` values low, low + 1, ..., low + size - 1: row j takes
    k + round_half_up(j size / rows), wrapped, in integers. For k uniform over those values every row's count is
    uniform too (BGPO: low 1, size L; ESPO: low 0, size L + 1). Python's round() rounds halves to even, so
    that with L = 9 and two rows, row 1 never drew 2, 4, 7 or 9."""
    return [low + (k - low + (2 * j * size + rows) // (2 * rows)) % size for j in range(rows)]


@dataclass(frozen=True)
class NoOptions:
    pass


class Estimator:
    name = "base"
    level = "token"  # "token": one quantity per response token; "sequence": one (or one per MC row) per sample
    Options = NoOptions
    needs: frozenset = frozenset()  # of "step_maps", "rollout_logprobs"
    uses_old = True
    random_rows = True
    supports_kl = True
    masked_diffusion = True  # defined on masked-diffusion models (their rows are x_t alone, full attention)
    default_kl = "k3"  # the KL estimator when algorithm.kl_kind is auto

    def __init__(self, mask_token_id: int, options=None):
        self.mask_id = mask_token_id
        self.options = options if options is not None else self.Options()

    def describe(self, block_diffusion: bool) -> str:
        return self.name

    def rows(self, samples: list[Sample], generators: list[torch.Generator]):
        raise NotImplementedError

    def quantities(self, logp: torch.Tensor, plan) -> list[torch.Tensor]:
        raise NotImplementedError

    def loss(self, q, q_old, samples, cfg, totals: Totals, q_ref=None, q_rollout=None):
        raise NotImplementedError
