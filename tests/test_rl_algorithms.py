"""RL estimators and losses against direct, slow computations on a toy model (the tiny SDAR-MoE).

The oracle: log p(y_i | the sequence with masked set S) computed the slow way, one block at a time, by the
rollout engine's single-stream forward (earlier blocks clean, the block itself with S masked, block-causal
attention). The estimators under test build two-stream rows that Megatron runs in one forward; where an
estimator is exact it must equal the oracle, where it is Monte-Carlo its average over many draws must equal the
expectation computed by enumerating every mask.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dare_mega.algorithms.estimators import ESTIMATORS, Sample, Totals, build
from dare_mega.algorithms.policy import LossConfig, dual_clip_pg, group_advantages, kl_penalty
from dare_mega.algorithms.rl import noisy_log_probs, rows_to_batch
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.types import SamplingParams

BLOCK = 4


def make(name: str, mask_id: int, mc: int | None = None, **options):
    """An estimator with `mc` rows where it has that option."""
    import dataclasses

    if mc is not None and "mc" in {f.name for f in dataclasses.fields(ESTIMATORS[name].Options)}:
        options["mc"] = mc
    return build(name, mask_id, **options)


def loss_of(estimator, q, q_old, samples, cfg, q_ref=None, q_rollout=None):
    """The estimator's loss on this (single-rank) batch."""
    return estimator.loss(q, q_old, samples, cfg, Totals(len(samples), sum(s.length for s in samples)), q_ref,
                          q_rollout)


class Oracle:
    """log p(clean token) at masked positions, one block-causal forward per (block, masked set), memoised."""

    def __init__(self, engine: NativeEngine):
        self.model = engine.model
        self.mask_id = engine.args.diffusion.mask_token_id
        self.memo: dict = {}

    def block_log_probs(self, clean: list[int], block: int, masked: frozenset) -> dict[int, float]:
        key = (tuple(clean), block, masked)
        if key not in self.memo:
            end = min((block + 1) * BLOCK, len(clean))
            tokens = torch.tensor([self.mask_id if p in masked else clean[p] for p in range(end)])[None]
            positions = torch.arange(end)[None]
            blocks = positions[0] // BLOCK
            attend = (blocks[None, :] <= blocks[:, None])[None]  # block-causal
            device = self.model.device
            logits = self.model(tokens.to(device), positions.to(device), attend.to(device))
            logp = torch.log_softmax(logits[0].double().cpu(), -1)
            self.memo[key] = {p: float(logp[p, clean[p]]) for p in masked}
        return self.memo[key]

    def log_probs(self, clean: list[int], masked) -> dict[int, float]:
        """{position: log p} for every masked position; blocks are independent given the clean context."""
        out = {}
        for block in sorted({p // BLOCK for p in masked}):
            out.update(self.block_log_probs(clean, block, frozenset(p for p in masked if p // BLOCK == block)))
        return out


@pytest.fixture(scope="module")
def setup(tiny_dir, world1):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout

    engine = NativeEngine.from_pretrained(tiny_dir["sdar_moe"])
    chunks, args = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout())
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, policy="low_confidence_static", steps=2,
                            stop_token_ids=())
    completions = engine.generate([[5, 6, 7], [11, 12, 13, 14, 15, 16]], params)
    samples = [Sample(c.prompt_ids, c.generated_ids, c.generated_reveal_steps, c.block_size, c.generated_logprobs,
                      advantage) for c, advantage in zip(completions, (1.0, -0.5))]
    return engine, Runner(chunks, args), Oracle(engine), samples, args.diffusion.mask_token_id


def megatron_quantities(runner, estimator, samples, seed=0):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(samples))]
    rows, plan = estimator.rows(samples, generators)
    lp = noisy_log_probs(runner, rows_to_batch(rows, BLOCK), 1)
    return rows, plan, [q.double() for q in estimator.quantities(lp.double(), plan)]


def table_log_probs(oracle, rows) -> torch.Tensor:
    """The [rows, length] log-prob tensor an exact model gives for these rows, from the oracle."""
    width = max(len(c) for c in rows.clean)
    out = torch.zeros(len(rows.clean), width, dtype=torch.float64)
    for r, (noisy, clean) in enumerate(zip(rows.noisy, rows.clean)):
        masked = [p for p in range(len(clean)) if noisy[p] != clean[p]]
        for p, value in oracle.log_probs(clean.tolist(), masked).items():
            out[r, p] = value
    return out


def assert_close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape and float((a - b).abs().max()) <= tol, (a, b)


def responses(s: Sample):
    return list(range(s.prompt_len, s.prompt_len + s.length))


# ---- exact estimators ------------------------------------------------------------------------------------
def test_trajectory_replays_the_rollout_exactly(setup):
    engine, runner, oracle, samples, mask_id = setup
    _, _, q = megatron_quantities(runner, build("trajectory", mask_id), samples)
    for s, values in zip(samples, q):
        assert_close(values, s.rollout_logprobs)  # the rollout's own log-probs
        clean = s.clean().tolist()  # and the oracle's: the token's block as it was at its reveal step
        expected = []
        for p, step in zip(responses(s), s.reveal_steps):
            still = [x for x, r in zip(responses(s), s.reveal_steps) if x // BLOCK == p // BLOCK and r >= step]
            expected.append(oracle.log_probs(clean, still)[p])
        assert_close(values, expected)


def test_d1_one_step_is_exact(setup):
    _, runner, oracle, samples, mask_id = setup
    _, _, q = megatron_quantities(runner, build("d1", mask_id, prompt_mask=0.0), samples)
    for s, values in zip(samples, q):
        full = oracle.log_probs(s.clean().tolist(), responses(s))
        assert_close(values, [full[p] for p in responses(s)])
    rows, _ = build("d1", mask_id, prompt_mask=0.5).rows(samples, [torch.Generator().manual_seed(1)] * 2)
    masked_prompt = [int((n[: s.prompt_len] == mask_id).sum()) for n, s in zip(rows.noisy, samples)]
    assert sum(masked_prompt) > 0  # the prompt is masked with the asked probability


def test_coupled_is_the_complementary_formula(setup):
    _, runner, oracle, samples, mask_id = setup
    _, plan, q = megatron_quantities(runner, build("coupled", mask_id), samples, seed=3)
    for s, (_, _, _, positions, in_s, t), values in zip(samples, plan, q):
        assert 0.2 <= t <= 0.8
        clean = s.clean().tolist()
        chosen = [p for p, k in zip(positions, in_s) if k]
        rest = [p for p, k in zip(positions, in_s) if not k]
        a, b, c = oracle.log_probs(clean, positions), oracle.log_probs(clean, chosen), oracle.log_probs(clean, rest)
        expected = [0.5 * (a[p] + (b[p] / t if p in b else c[p] / (1 - t))) for p in positions]
        assert_close(values, expected)


@pytest.mark.parametrize("name", ["bgpo", "ebpo", "espo", "spg"])
def test_monte_carlo_rows_match_their_formula(setup, name):
    """The Megatron forward of each MC row equals the oracle, and the quantity is the documented formula."""
    _, runner, oracle, samples, mask_id = setup
    estimator = make(name, mask_id, mc=3)
    rows, plan, q = megatron_quantities(runner, estimator, samples, seed=7)
    assert_close(torch.cat([v.reshape(-1) for v in q]),
                 torch.cat([v.reshape(-1) for v in estimator.quantities(table_log_probs(oracle, rows), plan)]))


# ---- Monte-Carlo estimators are unbiased -----------------------------------------------------------------
def _subsets(positions, size):
    return [list(c) for c in itertools.combinations(positions, size)]


def _sum_log_probs(oracle, clean, masked):
    return sum(oracle.log_probs(clean, masked).values())


def elbo_over_length(oracle, s: Sample) -> float:
    """(1/L) sum_{x=1..L} (1/x) E_{|S|=x} sum_{i in S} log p(y_i | y with S masked): what BGPO and ESPO estimate."""
    clean, positions, L = s.clean().tolist(), responses(s), s.length
    total = 0.0
    for x in range(1, L + 1):
        subsets = _subsets(positions, x)
        total += sum(_sum_log_probs(oracle, clean, S) for S in subsets) / len(subsets) / x
    return total / L


def ebpo_target(oracle, s: Sample) -> float:
    """sum over blocks b of (1/|b|) sum_{c=1..|b|} (|b|/c) E_{|S|=c, S in b} sum_{i in S} log p."""
    clean, total = s.clean().tolist(), 0.0
    for block in s.blocks():
        for c in range(1, len(block) + 1):
            subsets = _subsets(block, c)
            total += sum(_sum_log_probs(oracle, clean, S) for S in subsets) / len(subsets) / c
    return total


def _mean_sum(oracle, clean, positions, size) -> float:
    """E over subsets S of `positions` with |S| = size (uniform, as randperm draws them) of sum_{i in S} log p."""
    subsets = _subsets(positions, size)
    return sum(_sum_log_probs(oracle, clean, S) for S in subsets) / len(subsets) if size else 0.0


def bgpo_expectation(oracle, s: Sample, mc: int, weight=lambda x, L: x / L) -> float:
    """E[mean over BGPO's rows of sum_masked log p / p / L], exactly: every k of the schedule (k ~ U{1..L}) through
    the implementation's counts, every masked set of each count."""
    from dare_mega.algorithms.estimators.base import stratified_counts

    clean, positions, L = s.clean().tolist(), responses(s), s.length
    total = 0.0
    for k in range(1, L + 1):
        counts = stratified_counts(k, L, mc, low=1)
        total += sum(_mean_sum(oracle, clean, positions, x) / weight(x, L) / L for x in counts) / mc
    return total / L


def espo_expectation(oracle, s: Sample, mc: int) -> float:
    """E[ESPO's sequence quantity] with reduce_var: k ~ U{0..L}, the implementation's counts x, p = x / (L + 1),
    complement weight L / (L + 1) - p; every masked set enumerated."""
    from dare_mega.algorithms.estimators.base import stratified_counts

    clean, positions, L = s.clean().tolist(), responses(s), s.length
    total = 0.0
    for k in range(0, L + 1):
        rows = []
        for x in stratified_counts(k, L + 1, mc, low=0):
            first = _mean_sum(oracle, clean, positions, x) / (x / (L + 1)) if x else 0.0
            rest = _mean_sum(oracle, clean, positions, L - x) / ((L - x) / (L + 1)) if L - x else 0.0
            rows.append(0.5 * (first + rest))
        total += sum(rows) / mc / L
    return total / (L + 1)


def ebpo_expectation(oracle, s: Sample, mc: int) -> float:
    """E[EBPO's composite ELBO], exactly: the counts are piecewise constant in the offset u ~ U(0, 1), so the
    integral is a sum over the intervals between their breakpoints (evaluated at each midpoint)."""
    from dare_mega.algorithms.estimators.ebpo import ebpo_counts

    clean, blocks = s.clean().tolist(), s.blocks()
    sizes, cells = [len(b) for b in blocks], mc * len(blocks)
    points = {0.0, 1.0}
    for idx in range(cells):
        size = sizes[idx % len(blocks)]
        points |= {(m / size - idx / cells) % 1.0 for m in range(size + 1)}
    points = sorted(points)
    total = 0.0
    for a, b in zip(points, points[1:]):
        counts = ebpo_counts((a + b) / 2, sizes, mc)
        value = sum(sum(_mean_sum(oracle, clean, block, c) * len(block) / c for block, c in zip(blocks, row))
                    for row in counts) / mc
        total += (b - a) * value
    return total


@pytest.mark.parametrize("name,mc", [("bgpo", 2), ("bgpo", 3), ("espo", 2), ("espo", 3), ("ebpo", 2)])
def test_monte_carlo_estimators_are_unbiased(setup, name, mc):
    """Exactly, by enumerating the noise schedule (a Monte-Carlo average over 600 draws could not see the bias
    of BGPO's round-half-to-even counts at L = 9, mc = 2)."""
    _, _, oracle, samples, mask_id = setup
    s = samples[0]  # response of 9 positions across three blocks after a 3-token prompt
    target = ebpo_target(oracle, s) if name == "ebpo" else elbo_over_length(oracle, s)
    exact = {"bgpo": bgpo_expectation, "espo": espo_expectation, "ebpo": ebpo_expectation}[name](oracle, s, mc)
    assert abs(exact - target) < 1e-9 * max(1.0, abs(target)), (exact, target)


def test_the_unbiasedness_check_can_fail(setup):
    """The same enumeration catches a wrong weight (p = x / (L + 1) in BGPO instead of x / L) and Python's
    round() in the stratified counts."""
    _, _, oracle, samples, mask_id = setup
    s = samples[0]
    target = elbo_over_length(oracle, s)
    assert abs(bgpo_expectation(oracle, s, 2, weight=lambda x, L: x / (L + 1)) - target) > 1e-3
    clean, positions, L = s.clean().tolist(), responses(s), s.length
    rounded = sum(sum(_mean_sum(oracle, clean, positions, x) / x for x in
                      [((round(k + j * L / 2) - 1) % L) + 1 for j in range(2)]) / 2 for k in range(1, L + 1)) / L / L
    assert abs(rounded - target) > 1e-3


def test_noise_depends_only_on_the_sample_generator(setup):
    """No global seeding: the rows of sample i come from generators[i] only, whatever else runs."""
    _, _, _, samples, mask_id = setup
    estimator = build("coupled", mask_id)
    first, _ = estimator.rows(samples, [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)])
    torch.manual_seed(0)
    torch.rand(100)
    again, _ = estimator.rows(samples[1:], [torch.Generator().manual_seed(12)])
    assert all(torch.equal(a, b) for a, b in zip(first.noisy[3:], again.noisy))
    before = torch.random.get_rng_state()
    estimator.rows(samples, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert torch.equal(before, torch.random.get_rng_state())


# ---- advantages and losses -------------------------------------------------------------------------------
def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = [0, 0, 0, 0, 1, 1]
    grpo = group_advantages(rewards, groups, "grpo")  # the unbiased std (verl, DARE): sqrt(1/3) for 1, 0, 0, 1
    assert_close(grpo, [0.5 / 3**-0.5, -0.5 / 3**-0.5, -0.5 / 3**-0.5, 0.5 / 3**-0.5, 0.0, 0.0], 1e-5)
    population = group_advantages(rewards, groups, "grpo", std="population")
    assert_close(population, [1.0, -1.0, -1.0, 1.0, 0.0, 0.0], 1e-5)  # (r - 0.5) / 0.5; a constant group gives 0
    # a group of one has no baseline: its reward (verl), or 0
    alone = torch.tensor([0.7, 1.0, 0.0])
    for kind in ("grpo", "rloo"):
        assert_close(group_advantages(alone, [0, 1, 1], kind), [0.7, 0.5 / 0.5**0.5 if kind == "grpo" else 1.0,
                                                                 -0.5 / 0.5**0.5 if kind == "grpo" else -1.0], 1e-5)
        assert float(group_advantages(alone, [0, 1, 1], kind, group_of_one="zero")[0]) == 0.0
    rloo = group_advantages(rewards, groups, "rloo")
    assert_close(rloo, [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 0.0, 0.0], 1e-6)
    assert_close(group_advantages(rewards, groups, "grpo", std_normalize=False), [0.5, -0.5, -0.5, 0.5, 0, 0], 1e-6)
    with pytest.raises(ValueError, match="advantage kind"):
        group_advantages(rewards, groups, "ppo")


def test_kl_estimators():
    delta = torch.tensor([-0.5, 0.0, 0.3])
    assert_close(kl_penalty(delta, "k1"), delta)
    assert_close(kl_penalty(delta, "k2"), delta**2 / 2)
    assert_close(kl_penalty(delta, "k3"), torch.exp(-delta) - 1 + delta)
    assert bool((kl_penalty(torch.linspace(-3, 3, 13), "k3") >= 0).all())
    # k3 is an unbiased estimate of KL(pi || ref) under samples from pi
    pi, ref = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((pi * (pi / ref).log()).sum())
    assert abs(float((pi * kl_penalty((pi / ref).log(), "k3")).sum()) - exact) < 1e-6


def test_dual_clip():
    ratio = torch.tensor([0.5, 1.0, 1.5, 5.0, 5.0])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0])
    pg, clipped = dual_clip_pg(ratio, adv, 0.2, 0.2, 3.0)
    # A > 0: -min(rA, clip(r)A); A < 0: max of the two, capped at -A * 3
    assert_close(pg, [-0.5, -1.0, -1.2, -1.2, 3.0])
    assert clipped.tolist() == [True, False, True, True, True]
    pg_no_dual, _ = dual_clip_pg(ratio, adv, 0.2, 0.2, None)
    assert float(pg_no_dual[-1]) == 5.0


def test_truncated_importance_weights_and_first_ratio(setup):
    _, _, _, samples, mask_id = setup
    estimator = build("trajectory", mask_id)
    q = [torch.tensor(s.rollout_logprobs, dtype=torch.float64) for s in samples]
    rollout = [v - torch.linspace(-1.0, 1.0, len(v), dtype=torch.float64) for v in q]  # gap from -1 to 1
    cfg = LossConfig(tis_cap=2.0)
    loss, stats = loss_of(estimator, q, q, samples, cfg, q_rollout=rollout)
    assert stats["ratio_max_dev"] == 0.0  # first update after a synchronous rollout: ratio exactly 1
    gaps = torch.cat([a - b for a, b in zip(q, rollout)])
    assert stats["tis_truncated"] == int((gaps.exp() > 2.0).sum()) > 0
    weights = estimator.token_weights(samples)
    expected = sum(float((-s.advantage * (g.exp().clamp(max=2.0)) * w).sum())
                   for s, g, w in zip(samples, (a - b for a, b in zip(q, rollout)), weights)) / len(samples)
    assert abs(float(loss) - expected) < 1e-9


def test_trajectory_token_weights_follow_transitions(setup):
    _, _, _, samples, mask_id = setup
    for s, w in zip(samples, build("trajectory", mask_id).token_weights(samples)):
        assert abs(float(w.sum()) - 1.0) < 1e-6
        transitions = {(p // s.block_size, r) for p, r in zip(responses(s), s.reveal_steps)}
        for p, r, value in zip(responses(s), s.reveal_steps, w):
            size = sum(1 for q, t in zip(responses(s), s.reveal_steps) if (q // s.block_size, t) == (p // s.block_size, r))
            assert abs(float(value) - 1 / size / len(transitions)) < 1e-7


def test_spg_picks_its_bound_by_the_sign_of_the_advantage(setup):
    _, _, _, samples, mask_id = setup
    estimator = build("spg", mask_id, mix=0.5)
    q = [torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.tensor([-1.0, -3.0], dtype=torch.float64)]
    total_length = sum(s.length for s in samples)
    loss, _ = loss_of(estimator, q, q, samples, LossConfig())
    pos = -samples[0].advantage * -1.0 * samples[0].length * 2 / total_length  # ELBO for A > 0
    neg = -samples[1].advantage * (0.5 * -3.0 + 0.5 * -1.0) * samples[1].length * 2 / total_length  # mix for A < 0
    assert abs(float(loss) - (pos + neg) / 2) < 1e-9


def test_every_estimator_is_registered_and_unknown_names_fail():
    from dare_mega.errors import ConfigError

    assert {"trajectory", "d1", "coupled", "bgpo", "ebpo", "espo", "spg"} <= set(ESTIMATORS)  # tests may add toys
    with pytest.raises(ConfigError, match="algorithm.estimator='grpo'"):
        build("grpo", 1)


@pytest.mark.parametrize("name", ["trajectory", "coupled", "ebpo"])
def test_packed_rows_give_the_padded_log_probs(setup, name):
    """Packing several estimator rows into one sequence (kept apart by the mask, positions from 0) changes the
    layout, not the numbers; `at_least` pads to a shape agreed across ranks without changing them either."""
    _, runner, _, samples, mask_id = setup
    estimator = make(name, mask_id, mc=3)
    rows, _ = estimator.rows(samples, [torch.Generator().manual_seed(7 + i) for i in range(len(samples))])
    padded = rows_to_batch(rows, BLOCK)
    packed = rows_to_batch(rows, BLOCK, pack_tokens=48)
    wider = rows_to_batch(rows, BLOCK, pack_tokens=48, at_least=(packed.batch.size + 1, 50))
    assert padded.batch.size == len(rows.clean) and packed.batch.size < padded.batch.size
    assert wider.batch.size == packed.batch.size + 1 and wider.batch.seq_len == 100
    spans = sorted((row, offset, offset + length) for row, offset, length in packed.places)
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))  # no two rows overlap
    reference = noisy_log_probs(runner, padded, 1)
    for laid in (packed, wider):
        lp = noisy_log_probs(runner, laid, 1)
        assert lp.shape == reference.shape
        assert_close(lp, reference)
    assert float(reference.abs().sum()) > 0


# ---- exact gradients through Megatron ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainable(tiny_dir, world1):
    """The tiny SDAR-MoE twice from the same weights: wrapped for training, and plain for direct autograd."""
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.parallel import ParallelLayout

    wrapped, args = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout())
    wrapped = wrap_for_training(wrapped)
    plain, _ = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout())
    return Runner(wrapped, args), plain[0], args


@pytest.mark.parametrize("name,pack", [("trajectory", None), ("trajectory", 40), ("d1", None), ("coupled", None),
                                       ("bgpo", None), ("ebpo", None), ("ebpo", 40), ("espo", None), ("spg", None)])
def test_policy_gradient_is_the_exact_gradient_of_the_loss(setup, trainable, name, pack):
    """main_grad after `policy_gradient` equals autograd of the loss through a plain model, with clipping active
    (old quantities perturbed), importance weights and the estimator's own weighting; also with rows packed."""
    from dare_mega.algorithms.rl import policy_gradient, prepare
    from dare_mega.models.runner import vocab_parallel_log_probs

    _, _, _, samples, mask_id = setup
    runner, plain, args = trainable
    estimator = make(name, mask_id, mc=2)
    generators = lambda: [torch.Generator().manual_seed(40 + i) for i in range(len(samples))]  # noqa: E731
    totals = Totals(len(samples), sum(s.length for s in samples))
    cfg = LossConfig(eps_low=0.05, eps_high=0.05, tis_cap=1.5)

    rows, plan = estimator.rows(samples, generators())
    laid = rows_to_batch(rows, BLOCK, row_multiple=2, pack_tokens=pack)
    batch = laid.batch
    n = batch.seq_len // 2
    assert pack is None or batch.size < len(rows.clean)  # several rows share a sequence
    with torch.no_grad():
        lp = noisy_log_probs(runner, laid, 1).double()
    q_true = estimator.quantities(lp, plan)
    shift = torch.Generator().manual_seed(3)
    # moved against the advantage's sign by random amounts: some ratios leave the trust region, some stay
    q_old = [q - 0.2 * math.copysign(1, s.advantage) * torch.randn(q.shape, generator=shift, dtype=q.dtype).abs()
             for q, s in zip(q_true, samples)]

    prepared, _ = prepare(runner, estimator, samples, generators(), cfg, micro_batch_size=2,
                          q_old=[q.float() for q in q_old], pack_tokens=pack)
    stats = policy_gradient(runner, estimator, samples, prepared, cfg, totals, micro_batch_size=2)
    assert name == "spg" or (stats["ratio_max_dev"] > 0 and stats["clipped"] > 0)  # SPG has no ratio

    plain.zero_grad()
    device = next(plain.parameters()).device
    logits = plain(batch.input_ids.to(device), batch.position_ids.to(device), batch.mask.to(device))
    direct_lp = laid.unpack(vocab_parallel_log_probs(logits, batch.labels.to(device), args.vocab_size)[:, :n].cpu())
    q_rollout = [torch.tensor(s.rollout_logprobs) for s in samples] if name == "trajectory" else None
    loss, _ = estimator.loss(estimator.quantities(direct_lp, plan), [q.float() for q in q_old], samples, cfg, totals,
                             q_rollout=q_rollout)
    assert loss.requires_grad
    loss.backward()
    assert abs(float(loss.detach()) - stats["loss"]) < 1e-5
    assert_main_grads_match(runner, plain)


def assert_main_grads_match(runner, plain) -> None:
    """Every main_grad of the wrapped model equals the plain model's .grad (None: zero) within 1e-5 of its norm."""
    worst, norm = 0.0, 0.0
    for (name_w, p), (name_p, q) in zip(runner.chunks[0].module.named_parameters(), plain.named_parameters()):
        assert name_w == name_p
        expected = q.grad if q.grad is not None else torch.zeros_like(q)
        worst = max(worst, float((p.main_grad - expected).abs().max()))
        norm += float(expected.pow(2).sum())
    assert norm > 0 and worst <= 1e-5 * max(1.0, norm**0.5), (worst, norm**0.5)


def test_later_epochs_see_the_updated_policy(setup, tiny_dir):
    """Epoch 1 (synchronous): ratio exactly 1; after an update, the same rows under the new weights move it."""
    from dare_mega.algorithms.rl import policy_gradient, prepare
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.parallel import ParallelLayout

    _, _, _, samples, mask_id = setup
    chunks, args = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout())
    runner = Runner(wrap_for_training(chunks), args)
    estimator = build("trajectory", mask_id)
    generators = [torch.Generator().manual_seed(i) for i in range(len(samples))]
    totals = Totals(2, sum(s.length for s in samples))
    prepared, _ = prepare(runner, estimator, samples, generators, LossConfig())
    stats = policy_gradient(runner, estimator, samples, prepared, LossConfig(), totals)
    assert stats["ratio_max_dev"] == 0.0 and stats["clipped"] == 0.0
    with torch.no_grad():
        for p in runner.chunks[0].module.parameters():
            p.add_(-1e-2 * p.main_grad.sign())
    stats2 = policy_gradient(runner, estimator, samples, prepared, LossConfig(), totals)
    assert stats2["ratio_max_dev"] > 1e-4
