"""Log-prob estimators for diffusion LLMs, registered by name (formulas: docs/algorithms.md).

An estimator turns rollout samples into rows of the two-stream training layout [x_t ; x_0] (noisy copies
with some response tokens masked, clean copies as context) and says how the per-token log-probs of those
rows combine into the quantity its loss ratios: per token ("token" level) or per sequence ("sequence").

Both halves are pure functions: `rows(samples, generators)` draws sample i's noise from generators[i]
(seeded per sample by the trainer, so the noise does not depend on how samples are split over ranks; never
a global seed: DARE's Coupled-GRPO resets every RNG to 42 on each call), and
`quantities(logp, plan)` is plain differentiable torch over a [rows, length] tensor of log p(clean token),
so the trainer can take exact gradients of any loss with one extra forward (algorithms/rl.py).
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
    """One completion as the trainer sees it: the prompt, every decoded token and its reveal step."""

    prompt_ids: list[int]
    generated_ids: list[int]
    reveal_steps: list[int]
    block_size: int
    rollout_logprobs: list[float] | None = None
    advantage: float = 0.0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.generated_ids)

    def clean(self) -> torch.Tensor:
        return torch.tensor(self.prompt_ids + self.generated_ids, dtype=torch.long)

    def blocks(self) -> list[list[int]]:
        """Positions (in the full sequence) of the response, grouped by the global block grid."""
        groups: dict[int, list[int]] = {}
        for p in range(self.prompt_len, self.prompt_len + self.length):
            groups.setdefault(p // self.block_size, []).append(p)
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


def _masked(positions: list[int], count: int, generator: torch.Generator) -> list[int]:
    order = torch.randperm(len(positions), generator=generator)[:count].tolist()
    return sorted(positions[i] for i in order)


class Estimator:
    name = "base"
    level = "token"  # "token": one quantity per response token; "sequence": one (or one per MC row) per sample

    def __init__(self, mask_token_id: int, **options):
        self.mask_id = mask_token_id
        self.options = options

    def rows(self, samples: list[Sample], generators: list[torch.Generator]):
        raise NotImplementedError

    def quantities(self, logp: torch.Tensor, plan) -> list[torch.Tensor]:
        raise NotImplementedError

    def token_weights(self, samples: list[Sample]) -> list[torch.Tensor]:
        """How a sample's token-level losses average (weights sum to 1 per sample): a plain token mean."""
        return [torch.full((s.length,), 1.0 / max(s.length, 1)) for s in samples]


@register
class TrajectoryReplay(Estimator):
    """TraceRL / CJ-GRPO for block diffusion: row s shows every block as it was at local step s; the
    log-prob of each token is read in the row of the step that revealed it (exact, as the rollout saw it)."""

    name = "trajectory"

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        for i, s in enumerate(samples):
            clean = s.clean()
            steps = max(s.reveal_steps) + 1 if s.reveal_steps else 1
            row_of_step = []
            for step in range(steps):
                masked = [s.prompt_len + k for k, r in enumerate(s.reveal_steps) if r >= step]
                row_of_step.append(rows.add(i, clean, masked, self.mask_id))
            plan.append([(row_of_step[r], s.prompt_len + k) for k, r in enumerate(s.reveal_steps)])
        return rows, plan

    def quantities(self, logp, plan):
        return [torch.stack([logp[row, pos] for row, pos in where]) if where else logp.new_zeros(0) for where in plan]

    def token_weights(self, samples):
        """CJ-GRPO: 1 / (tokens in the token's (block, step) transition) / (transitions in the sample)."""
        out = []
        for s in samples:
            key = [(p // s.block_size, r) for p, r in zip(range(s.prompt_len, s.prompt_len + s.length), s.reveal_steps)]
            sizes: dict = {}
            for k in key:
                sizes[k] = sizes.get(k, 0) + 1
            out.append(torch.tensor([1.0 / sizes[k] / len(sizes) for k in key]))
        return out


@register
class OneStep(Estimator):
    """d1 / diffu-GRPO: the whole response masked, prompt tokens masked with probability 0.15; one forward
    gives a mean-field log-prob per response token."""

    name = "d1"

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        p_prompt = self.options.get("prompt_mask", 0.15)
        for i, s in enumerate(samples):
            generator = generators[i]
            prompt_masked = [p for p in range(s.prompt_len) if float(torch.rand((), generator=generator)) < p_prompt]
            response = list(range(s.prompt_len, s.prompt_len + s.length))
            row = rows.add(i, s.clean(), prompt_masked + response, self.mask_id)
            plan.append((row, response))
        return rows, plan

    def quantities(self, logp, plan):
        return [logp[row, positions] for row, positions in plan]


@register
class Coupled(Estimator):
    """Coupled-GRPO (DiffuCoder): a fully masked row, a row masked where u < t and its complement, t ~ U(0.2,
    0.8); l_i = (a_i + 1[i in S] b_i / t + 1[i not in S] c_i / (1 - t)) / 2."""

    name = "coupled"

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        low, high = self.options.get("t_min", 0.2), self.options.get("t_max", 0.8)
        for i, s in enumerate(samples):
            generator = generators[i]
            t = low + (high - low) * float(torch.rand((), generator=generator))
            u = torch.rand(s.length, generator=generator)
            response = list(range(s.prompt_len, s.prompt_len + s.length))
            chosen = [p for p, x in zip(response, u) if x < t]
            rest = [p for p, x in zip(response, u) if x >= t]
            clean = s.clean()
            a = rows.add(i, clean, response, self.mask_id)
            b = rows.add(i, clean, chosen, self.mask_id)
            c = rows.add(i, clean, rest, self.mask_id)
            plan.append((a, b, c, response, (u < t), t))
        return rows, plan

    def quantities(self, logp, plan):
        out = []
        for a, b, c, positions, in_s, t in plan:
            in_s = in_s.to(logp.device)
            la, lb, lc = logp[a, positions], logp[b, positions], logp[c, positions]
            out.append(0.5 * (la + torch.where(in_s, lb / t, lc / (1 - t))))
        return out


def stratified_counts(k: int, size: int, rows: int, low: int) -> list[int]:
    """Stratified counts over the `size` values low, low + 1, ..., low + size - 1: row j takes
    k + round_half_up(j size / rows), wrapped, in integers. For k uniform over those values every row's count is
    uniform too (BGPO: low 1, size L; ESPO: low 0, size L + 1). Python's round() rounds halves to even, so
    that with L = 9 and two rows, row 1 never drew 2, 4, 7 or 9."""
    return [low + (k - low + (2 * j * size + rows) // (2 * rows)) % size for j in range(rows)]


@register
class BGPO(Estimator):
    """BGPO: mc rows with stratified masked counts x_j in 1..L over the whole response, p_j = x_j / L;
    l_j = (sum over masked of log p / p_j) / L, one value per MC row."""

    name = "bgpo"
    level = "sequence"

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        mc = self.options.get("mc", 4)
        for i, s in enumerate(samples):
            generator = generators[i]
            response = list(range(s.prompt_len, s.prompt_len + s.length))
            entries = []
            k = int(torch.randint(1, s.length + 1, (), generator=generator))
            for x in stratified_counts(k, s.length, mc, low=1):
                masked = _masked(response, x, generator)
                entries.append((rows.add(i, s.clean(), masked, self.mask_id), masked, x / s.length))
            plan.append((entries, s.length))
        return rows, plan

    def quantities(self, logp, plan):
        return [torch.stack([logp[row, masked].sum() / p / length for row, masked, p in entries])
                for entries, length in plan]


def ebpo_counts(offset: float, block_lengths: list[int], rows: int) -> list[list[int]]:
    """EBPO's masked counts, [row][block]: cell (n, b) has noise level nu = (offset + (n B + b) / (rows B)) mod 1
    and masks min(floor(nu |b|) + 1, |b|) tokens; with offset ~ U(0, 1) each cell's count is uniform on 1..|b|."""
    cells = rows * len(block_lengths)
    out = []
    for n in range(rows):
        counts = []
        for b, size in enumerate(block_lengths):
            nu = (offset + (n * len(block_lengths) + b) / cells) % 1.0
            counts.append(min(int(nu * size) + 1, size))
        out.append(counts)
    return out


@register
class EBPO(Estimator):
    """EBPO (LLaDA2.1): N rows; in every block b of row n a stratified noise level nu_{n,b} masks
    c = min(floor(nu |b|) + 1, |b|) tokens (p = c / |b|); E = (1/N) sum_n sum_b sum_masked log p / p."""

    name = "ebpo"
    level = "sequence"

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        mc = self.options.get("mc", 4)
        for i, s in enumerate(samples):
            generator = generators[i]
            blocks = s.blocks()
            offset = float(torch.rand((), generator=generator))
            entries = []
            for n, counts in enumerate(ebpo_counts(offset, [len(b) for b in blocks], mc)):
                masked, weights = [], []
                for positions, count in zip(blocks, counts):
                    chosen = _masked(positions, count, generator)
                    masked += chosen
                    weights += [len(positions) / count] * count
                entries.append((rows.add(i, s.clean(), masked, self.mask_id), masked, torch.tensor(weights)))
            plan.append((entries, mc))
        return rows, plan

    def quantities(self, logp, plan):
        return [sum((logp[row, masked] * w.to(logp.device)).sum() for row, masked, w in entries) / mc
                for entries, mc in plan]


@register
class ESPO(Estimator):
    """ESPO: M rows with masked counts x in {0..L} stratified across the batch, p = x / (L + 1); with
    `reduce_var` a complementary row per draw, ELBO = (sum_masked log p / p + sum_complement log p /
    (L / (L + 1) - p)) / 2; the sequence ELBO is the mean over the M draws, divided by L."""

    name = "espo"
    level = "sequence"

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        mc = self.options.get("mc", 2)
        reduce_var = self.options.get("reduce_var", True)
        for i, s in enumerate(samples):
            generator = generators[i]
            L = s.length
            response = list(range(s.prompt_len, s.prompt_len + L))
            k = int(torch.randint(0, L + 1, (), generator=generator))
            entries = []
            for x in stratified_counts(k, L + 1, mc, low=0):
                order = torch.randperm(L, generator=generator).tolist()
                masked = sorted(response[j] for j in order[:x])
                complement = sorted(response[j] for j in order[x:])
                p = x / (L + 1)
                first = rows.add(i, s.clean(), masked, self.mask_id)
                second = rows.add(i, s.clean(), complement, self.mask_id) if reduce_var else None
                entries.append((first, masked, p, second, complement, L / (L + 1) - p))
            plan.append((entries, L))
        return rows, plan

    def quantities(self, logp, plan):
        out = []
        for entries, L in plan:
            values = []
            for first, masked, p, second, complement, q in entries:
                elbo = logp[first, masked].sum() / p if masked else logp.new_zeros(())
                if second is not None:
                    rest = logp[second, complement].sum() / q if complement else logp.new_zeros(())
                    elbo = 0.5 * (elbo + rest)
                values.append(elbo)
            out.append(torch.stack(values).mean() / L)
        return out


@register
class SPG(Estimator):
    """SPG (sandwiched PO): per MC row a random response block j*: blocks after it fully masked, c of its
    tokens masked (p = c / |block|), earlier blocks clean. Gives, per sample, the ELBO-like mean masked
    log-prob and the EUBO (1/beta) mean_i log mean_MC[pi_i^beta m_i / t_hat]; the loss picks by the sign
    of the advantage (`mix`: omega EUBO + (1 - omega) ELBO for negative ones)."""

    name = "spg"
    level = "sequence"

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        mc = self.options.get("mc", 2)
        for i, s in enumerate(samples):
            generator = generators[i]
            blocks = s.blocks()
            entries = []
            for _ in range(mc):
                j = int(torch.randint(0, len(blocks), (), generator=generator))
                block = blocks[j]
                count = int(torch.randint(1, len(block) + 1, (), generator=generator))
                masked = _masked(block, count, generator) + [p for b in blocks[j + 1 :] for p in b]
                fraction = len(masked) / s.length
                entries.append((rows.add(i, s.clean(), masked, self.mask_id), masked, fraction))
            plan.append((entries, s.prompt_len, s.length))
        return rows, plan

    def quantities(self, logp, plan):
        beta = self.options.get("eubo_beta", 1.5)
        out = []
        for entries, prompt_len, length in plan:
            elbo = torch.stack([logp[row, masked].mean() for row, masked, _ in entries]).mean()
            terms = logp.new_zeros(length)
            for row, masked, fraction in entries:
                index = torch.tensor(masked, device=logp.device) - prompt_len
                terms = terms.index_add(0, index, torch.exp(beta * logp[row, masked]) / fraction)
            active = terms > 0
            eubo = (torch.log(terms[active] / len(entries)) / beta).mean() if active.any() else elbo
            out.append(torch.stack([elbo, eubo]))
        return out


def build(name: str, mask_token_id: int, **options) -> Estimator:
    if name not in ESTIMATORS:
        from dare_mega.errors import ConfigError

        raise ConfigError(f"algorithm.estimator={name!r}; known: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name](mask_token_id, **options)
