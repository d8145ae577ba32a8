"""RL estimators on masked diffusion models (LLaDA, Dream: every position attends to the whole sequence) against
direct, slow computations.

The oracle: log p(y_i | the sequence with masked set S) from one bidirectional forward of the whole sequence
(prompt, response with S masked) through the rollout engine's model. The trainer lays the estimators' rows out
as the noisy stream alone with full attention on Megatron; where an estimator is exact it must equal the
oracle, where it is Monte-Carlo its expectation, computed by enumerating every mask, must equal the ELBO it
estimates. Dream's shifted logits are in every forward (a dropped shift moves every number).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_rl_algorithms import (
    assert_close,
    assert_main_grads_match,
    bgpo_expectation,
    elbo_over_length,
    espo_expectation,
    make,
    responses,
    table_log_probs,
)

from dare_mega.algorithms.estimators import Sample, Totals, build
from dare_mega.algorithms.policy import LossConfig
from dare_mega.algorithms.rl import noisy_log_probs, rows_to_batch
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.types import SamplingParams

BLOCK = 4


class FullOracle:
    """log p(clean token) at masked positions from one bidirectional forward of the whole sequence, memoised."""

    def __init__(self, engine: NativeEngine):
        self.model = engine.model
        self.mask_id = engine.args.diffusion.mask_token_id
        self.memo: dict = {}

    def log_probs(self, clean: list[int], masked) -> dict[int, float]:
        key = (tuple(clean), frozenset(masked))
        if key not in self.memo:
            n = len(clean)
            tokens = torch.tensor([self.mask_id if p in key[1] else clean[p] for p in range(n)])[None]
            device = self.model.device
            logits = self.model(tokens.to(device), torch.arange(n, device=device)[None],
                                torch.ones(1, n, n, dtype=torch.bool, device=device))
            logp = torch.log_softmax(logits[0].double().cpu(), -1)
            self.memo[key] = {p: float(logp[p, clean[p]]) for p in key[1]}
        return self.memo[key]


@pytest.fixture(scope="module", params=["llada", "dream"])
def setup(request, tiny_dir, world1):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.parallel import ParallelLayout

    directory = tiny_dir[request.param]
    engine = NativeEngine.from_pretrained(directory, tokenizer=False)
    chunks, args = build_from_hf(directory, ParallelLayout())
    assert args.diffusion.attention == "full"
    # two blocks of 4 from the end of each prompt, two steps each; no stop: every block decoded (DARE's LLaDA)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, policy="low_confidence_static", steps=2,
                            block_size=BLOCK, stop_token_ids=())
    completions = engine.generate([[5, 6, 7], [11, 12, 13, 14, 15]], params, cache=False)
    samples = [Sample(c.prompt_ids, c.generated_ids, c.generated_reveal_steps, c.block_size, c.generated_logprobs,
                      advantage, masked_diffusion=True) for c, advantage in zip(completions, (1.0, -0.5))]
    trainable, _ = build_from_hf(directory, ParallelLayout())
    plain, _ = build_from_hf(directory, ParallelLayout())
    return dict(engine=engine, runner=Runner(chunks, args), oracle=FullOracle(engine), samples=samples,
                mask_id=args.diffusion.mask_token_id, args=args, trainable=Runner(wrap_for_training(trainable), args),
                plain=plain[0], family=request.param)


def quantities(setup, estimator, seed=0, pack_tokens=None):
    samples = setup["samples"]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(samples))]
    rows, plan = estimator.rows(samples, generators)
    laid = rows_to_batch(rows, BLOCK, pack_tokens=pack_tokens, two_stream=False)
    assert laid.batch.seq_len == laid.stream  # one stream: x_t alone
    lp = noisy_log_probs(setup["runner"], laid, 1)
    return rows, plan, [q.double() for q in estimator.quantities(lp.double(), plan)]


def test_blocks_count_from_the_end_of_the_prompt(setup):
    s = setup["samples"][1]  # prompt of 5: blocks are positions 5..8 and 9..12, not the global grid's 4..7, 8..11
    assert s.blocks() == [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert Sample(s.prompt_ids, s.generated_ids, s.reveal_steps, BLOCK).blocks()[0] == [5, 6, 7]


@pytest.mark.parametrize("pack", [None, 64])
def test_trajectory_replays_the_rollout_exactly(setup, pack):
    """One row per (block, step): the canvas as the rollout saw it (later blocks masked); each token's log-prob
    equals the rollout's own and the oracle's, also with the rows packed into shared sequences."""
    oracle, samples = setup["oracle"], setup["samples"]
    rows, _, q = quantities(setup, build("trajectory", setup["mask_id"]), pack_tokens=pack)
    assert len(rows.clean) == 2 * 2 * len(samples)  # (2 blocks x 2 steps) per sample
    for s, values in zip(samples, q):
        assert_close(values, s.rollout_logprobs)
        clean, expected = s.clean().tolist(), []
        for p, step in zip(responses(s), s.reveal_steps):
            hidden = [x for x, r in zip(responses(s), s.reveal_steps)
                      if s.block_of(x) > s.block_of(p) or (s.block_of(x) == s.block_of(p) and r >= step)]
            expected.append(oracle.log_probs(clean, hidden)[p])
        assert_close(values, expected)


def test_the_block_diffusion_rows_would_not_replay_it(setup):
    """The check can fail: block diffusion's one-row-per-step replay (later blocks visible) misses the rollout."""
    s = setup["samples"][0]
    block_rows = Sample(s.prompt_ids, s.generated_ids, s.reveal_steps, s.block_size, s.rollout_logprobs)
    rows, plan = build("trajectory", setup["mask_id"]).rows([block_rows], [torch.Generator()])
    lp = noisy_log_probs(setup["runner"], rows_to_batch(rows, BLOCK, two_stream=False), 1)
    values = build("trajectory", setup["mask_id"]).quantities(lp, plan)[0]
    assert float((values - torch.tensor(s.rollout_logprobs)).abs().max()) > 1e-3


def test_d1_is_the_one_step_mean_field(setup):
    oracle, samples = setup["oracle"], setup["samples"]
    _, _, q = quantities(setup, build("d1", setup["mask_id"], prompt_mask=0.0))
    for s, values in zip(samples, q):
        full = oracle.log_probs(s.clean().tolist(), responses(s))
        assert_close(values, [full[p] for p in responses(s)])


def test_coupled_is_the_complementary_formula(setup):
    oracle, samples = setup["oracle"], setup["samples"]
    _, plan, q = quantities(setup, build("coupled", setup["mask_id"]), seed=3)
    for s, (_, _, _, positions, in_s, t), values in zip(samples, plan, q):
        clean = s.clean().tolist()
        chosen = [p for p, k in zip(positions, in_s) if k]
        rest = [p for p, k in zip(positions, in_s) if not k]
        a, b, c = oracle.log_probs(clean, positions), oracle.log_probs(clean, chosen), oracle.log_probs(clean, rest)
        assert_close(values, [0.5 * (a[p] + (b[p] / t if p in b else c[p] / (1 - t))) for p in positions])


@pytest.mark.parametrize("name", ["bgpo", "espo", "spg"])
def test_monte_carlo_rows_match_their_formula(setup, name):
    estimator = make(name, setup["mask_id"], mc=3)
    rows, plan, q = quantities(setup, estimator, seed=7)
    assert_close(torch.cat([v.reshape(-1) for v in q]),
                 torch.cat([v.reshape(-1) for v in estimator.quantities(table_log_probs(setup["oracle"], rows),
                                                                        plan)]))
    if name == "spg":  # SPG's blocks are the response's: every block after j* fully masked, none before it
        s = setup["samples"][1]
        for row, masked, _ in plan[1][0]:
            blocks = {s.block_of(p) for p in masked}
            assert all(all(p in masked for p in b) for b in s.blocks() if s.block_of(b[0]) > min(blocks))


@pytest.mark.parametrize("name,mc", [("bgpo", 2), ("espo", 3)])
def test_monte_carlo_estimators_are_unbiased_for_the_masked_diffusion_elbo(setup, name, mc):
    """Exactly, every mask enumerated: E[estimate] = (1/L) sum_x (1/x) E_{|S|=x} sum_{i in S} log p(y_i | S
    masked), the masked diffusion ELBO over the length, with every masked set seen by the whole sequence."""
    oracle, s = setup["oracle"], setup["samples"][0]
    target = elbo_over_length(oracle, s)
    exact = {"bgpo": bgpo_expectation, "espo": espo_expectation}[name](oracle, s, mc)
    assert abs(exact - target) < 1e-9 * max(1.0, abs(target)), (exact, target)
    assert abs(bgpo_expectation(oracle, s, mc, weight=lambda x, L: x / (L + 1)) - target) > 1e-3  # can fail


@pytest.mark.parametrize("name,pack", [("trajectory", None), ("trajectory", 40), ("d1", None), ("coupled", None),
                                       ("bgpo", None), ("espo", None), ("spg", 40)])
def test_policy_gradient_is_the_exact_gradient_of_the_loss(setup, name, pack):
    """main_grad after `policy_gradient` on single-stream rows equals autograd of the loss through a plain model,
    with clipping active, importance weights and the estimator's weighting."""
    from dare_mega.algorithms.rl import policy_gradient, prepare
    from dare_mega.models.runner import vocab_parallel_log_probs

    samples, runner, plain, args = setup["samples"], setup["trainable"], setup["plain"], setup["args"]
    estimator = make(name, setup["mask_id"], mc=2)
    generators = lambda: [torch.Generator().manual_seed(40 + i) for i in range(len(samples))]  # noqa: E731
    totals = Totals(len(samples), sum(s.length for s in samples))
    cfg = LossConfig(eps_low=0.05, eps_high=0.05, tis_cap=1.5)
    rows, plan = estimator.rows(samples, generators())
    laid = rows_to_batch(rows, BLOCK, row_multiple=2, pack_tokens=pack, two_stream=False)
    batch = laid.batch
    with torch.no_grad():
        q_true = estimator.quantities(noisy_log_probs(runner, laid, 1).double(), plan)
    shift = torch.Generator().manual_seed(3)
    q_old = [q - 0.2 * math.copysign(1, s.advantage) * torch.randn(q.shape, generator=shift, dtype=q.dtype).abs()
             for q, s in zip(q_true, samples)]
    prepared, _ = prepare(runner, estimator, samples, generators(), cfg, micro_batch_size=2,
                          q_old=[q.float() for q in q_old], pack_tokens=pack)
    assert prepared.laid.batch.seq_len == prepared.laid.stream  # the trainer chose the single stream itself
    stats = policy_gradient(runner, estimator, samples, prepared, cfg, totals, micro_batch_size=2)
    assert name == "spg" or (stats["ratio_max_dev"] > 0 and stats["clipped"] > 0)

    plain.zero_grad()
    device = next(plain.parameters()).device
    logits = plain(batch.input_ids.to(device), batch.position_ids.to(device), batch.mask.to(device))
    direct_lp = laid.unpack(vocab_parallel_log_probs(logits, batch.labels.to(device), args.vocab_size).cpu())
    q_rollout = [torch.tensor(s.rollout_logprobs) for s in samples] if name == "trajectory" else None
    loss, _ = estimator.loss(estimator.quantities(direct_lp, plan), [q.float() for q in q_old], samples, cfg, totals,
                             q_rollout=q_rollout)
    loss.backward()
    assert abs(float(loss.detach()) - stats["loss"]) < 1e-5
    assert_main_grads_match(runner, plain)
