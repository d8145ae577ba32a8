"""The objectives as DARE computes them: ESPO's and BGPO's KL, verl's loss aggregations, fresh noise per epoch,
the likelihood's temperature, estimators that own their options and loss (a toy one from one file), and the
configuration that refuses what an estimator does not have."""

from __future__ import annotations

import pytest
import torch

from dare_mega.algorithms.estimators import Sample, Totals, build
from dare_mega.algorithms.policy import LossConfig, kl_penalty

MASK = 99


def samples(lengths=(3, 5), advantages=(1.0, -0.5)):
    return [Sample([1, 2], list(range(10, 10 + n)), [0] * n, 4, None, a) for n, a in zip(lengths, advantages)]


def totals_of(batch):
    return Totals(len(batch), sum(s.length for s in batch))


def test_espo_kl_is_on_the_raw_elbo_then_divided_by_the_length():
    """DARE's compute_espo_kl: KL(ELBO - ELBO_ref) / L with ELBO = L q (q is the length-normalised ELBO), k2 by
    default; the old code applied k to q - q_ref, L times too weak for k2 and of another shape for k3."""
    batch = samples()
    q = [torch.tensor(-1.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)]
    q_ref = [torch.tensor(-1.3, dtype=torch.float64), torch.tensor(-1.8, dtype=torch.float64)]
    espo = build("espo", MASK)
    for kind in ("k2", "k3", "auto"):
        base, _ = espo.loss(q, q, batch, LossConfig(), totals_of(batch))
        with_kl, stats = espo.loss(q, q, batch, LossConfig(kl_coef=0.5, kl_kind=kind), totals_of(batch), q_ref)
        used = "k2" if kind == "auto" else kind
        expected = sum(float(kl_penalty(s.length * (a - b), used)) / s.length for s, a, b in zip(batch, q, q_ref))
        assert abs(float(with_kl - base) - 0.5 * expected / len(batch)) < 1e-12
        assert abs(stats["kl"] - expected) < 1e-12
    k2_old = sum(float(kl_penalty(a - b, "k2")) for a, b in zip(q, q_ref))
    k2_new = sum(float(kl_penalty(s.length * (a - b), "k2")) / s.length for s, a, b in zip(batch, q, q_ref))
    assert k2_new > 2.9 * k2_old  # L times stronger (L = 3 and 5)


def test_bgpo_kl_is_per_monte_carlo_row():
    """DARE's generic KL runs on each MC row's value (broadcast to its tokens), then aggregates: mean_j k(d_j),
    not k(mean_j d_j)."""
    batch = samples()
    bgpo = build("bgpo", MASK, mc=2)
    q = [torch.tensor([-1.0, -1.6], dtype=torch.float64), torch.tensor([-2.0, -0.4], dtype=torch.float64)]
    q_ref = [torch.tensor([-1.5, -1.0], dtype=torch.float64), torch.tensor([-1.0, -1.4], dtype=torch.float64)]
    base, _ = bgpo.loss(q, q, batch, LossConfig(), totals_of(batch))
    with_kl, _ = bgpo.loss(q, q, batch, LossConfig(kl_coef=1.0, kl_kind="k3"), totals_of(batch), q_ref)
    per_row = [float(kl_penalty(a - b, "k3").mean()) for a, b in zip(q, q_ref)]
    tokens = sum(s.length for s in batch)
    assert abs(float(with_kl - base) - sum(k * s.length / tokens for k, s in zip(per_row, batch))) < 1e-12


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_aggregation_is_verls(agg):
    """At ratio 1 every token's loss is -A: token-mean is sum_i -A_i L_i / sum L (DARE, d1, DiffuCoder: longer
    answers weigh more), seq-mean-token-mean the mean of -A_i, seq-mean-token-sum the mean of -A_i L_i."""
    batch = samples()
    for name in ("d1", "coupled", "bgpo"):
        estimator = build(name, MASK, loss_agg=agg, **({"mc": 2} if name == "bgpo" else {}))
        q = [torch.zeros(2 if name == "bgpo" else s.length, dtype=torch.float64) for s in batch]
        loss, _ = estimator.loss(q, q, batch, LossConfig(), totals_of(batch))
        lengths, adv = [s.length for s in batch], [s.advantage for s in batch]
        expected = {"token-mean": sum(-a * n for a, n in zip(adv, lengths)) / sum(lengths),
                    "seq-mean-token-mean": sum(-a for a in adv) / len(batch),
                    "seq-mean-token-sum": sum(-a * n for a, n in zip(adv, lengths)) / len(batch)}[agg]
        assert abs(float(loss) - expected) < 1e-12, (name, agg)
    assert build("d1", MASK).options.loss_agg == "token-mean"  # DARE's default


def test_estimator_options_are_their_own_and_checked():
    from dare_mega.config import load_config
    from dare_mega.errors import ConfigError
    from dare_mega.trainer.config import RLConfig

    assert build("bgpo", MASK).options.mc == 16 and build("espo", MASK).options.mc == 2  # DARE's defaults
    recipe = "configs/recipes/rl_tiny_sdar_moe.yaml"
    cfg = load_config(RLConfig, recipe, ["algorithm.estimator=ebpo", "algorithm.options.mc=3"])
    assert build(cfg.algorithm.estimator, MASK, cfg.algorithm.options).options.mc == 3
    with pytest.raises(ConfigError, match="unknown key algorithm.options.eubo_beta"):
        load_config(RLConfig, recipe, ["algorithm.estimator=ebpo", "algorithm.options.eubo_beta=2"])
    with pytest.raises(ConfigError, match="algorithm.options.mc=0 must be >= 1"):
        load_config(RLConfig, recipe, ["algorithm.estimator=bgpo", "algorithm.options.mc=0"])
    with pytest.raises(ConfigError, match="algorithm.estimator='grpo'; known: bgpo, coupled"):
        load_config(RLConfig, recipe, ["algorithm.estimator=grpo"])
    with pytest.raises(ConfigError, match="spg estimator has no KL term"):
        load_config(RLConfig, recipe, ["algorithm.estimator=spg", "algorithm.kl_coef=0.01"])
    with pytest.raises(ConfigError, match="algorithm.options.loss_agg='mean'"):
        load_config(RLConfig, recipe, ["algorithm.estimator=d1", "algorithm.options.loss_agg=mean"])


def test_block_diffusion_meanings_are_stated():
    d1 = build("d1", MASK).describe(block_diffusion=True)
    spg = build("spg", MASK).describe(block_diffusion=True)
    assert "clean earlier blocks" in d1 and "not the masked model's mean field" in d1
    assert "later block is scored fully masked given the clean blocks before it" in spg


def test_the_recorded_log_probs_follow_the_likelihood():
    """Raw likelihood (DARE): the rollout samples at T but records log softmax(logits) of the token, what the
    trainer recomputes; tempered: log softmax(logits / T). The tokens drawn are the same either way."""
    from dare_mega.rollout.policies import sample_block
    from dare_mega.rollout.types import SamplingParams

    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    tempered = SamplingParams(temperature=0.5)
    raw = SamplingParams(temperature=0.5, logprob_temperature=1.0)
    t1, _, lp_t, _ = sample_block(logits, tempered, torch.Generator().manual_seed(1))
    t2, _, lp_r, _ = sample_block(logits, raw, torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    assert torch.allclose(lp_t, torch.log_softmax(logits / 0.5, -1).gather(-1, t1[:, None])[:, 0])
    assert torch.allclose(lp_r, torch.log_softmax(logits, -1).gather(-1, t1[:, None])[:, 0])
    from dare_mega.config import load_config
    from dare_mega.trainer.config import RLConfig
    from dare_mega.trainer.rl_phases import likelihood_temperature

    recipe = "configs/recipes/rl_tiny_sdar_moe.yaml"
    assert likelihood_temperature(load_config(RLConfig, recipe, ["rollout.temperature=0.6"])) == 1.0
    assert likelihood_temperature(load_config(RLConfig, recipe, ["rollout.temperature=0.6",
                                                                 "algorithm.likelihood=tempered"])) == 0.6


# ---- on the model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_dir, world1):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.parallel import ParallelLayout

    chunks, args = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout())
    return Runner(wrap_for_training(chunks), args), args.diffusion.mask_token_id


class SGD:
    """The optimizer interface policy_update uses (zero_grad, step -> (ok, grad norm, _)), recording calls."""

    def __init__(self, runner, events, lr=1e-2):
        self.runner, self.events, self.lr = runner, events, lr

    def zero_grad(self):
        for p in self.runner.chunks[0].module.parameters():
            if getattr(p, "main_grad", None) is not None:
                p.main_grad.zero_()

    def step(self):
        self.events.append("step")
        norm = 0.0
        with torch.no_grad():
            for p in self.runner.chunks[0].module.parameters():
                if getattr(p, "main_grad", None) is not None:
                    norm += float(p.main_grad.pow(2).sum())
                    p.add_(-self.lr * p.main_grad)
        return True, norm**0.5, None


def test_each_epoch_draws_fresh_noise_and_its_old_values_come_first(model):
    """epochs=2: two mask sets (one per epoch, from noise(epoch)), both scored under the weights that sampled
    before the first optimizer step (DARE's inner iterations, each with its own masks)."""
    from dare_mega.algorithms.rl import policy_update

    runner, mask_id = model
    batch = samples(lengths=(6, 7))
    estimator = build("bgpo", mask_id, mc=2)
    events, drawn = [], []
    rows = estimator.rows

    def spy(samples_, generators):
        events.append("rows")
        out = rows(samples_, generators)
        drawn.append([r.clone() for r in out[0].noisy])
        return out

    estimator.rows = spy

    def noise(epoch):
        return [torch.Generator().manual_seed(1000 * epoch + i) for i in range(len(batch))]

    stats = policy_update(runner, SGD(runner, events), estimator, batch, noise, LossConfig(), totals_of(batch),
                          epochs=2)
    assert events == ["rows", "rows", "step", "step"]
    assert any(not torch.equal(a, b) for a, b in zip(*drawn))  # the second epoch's masks are new
    assert stats["ratio_max_dev"] > 0  # epoch 2 compares the updated policy with the old one on its own masks


def test_a_toy_estimator_from_one_file_trains(model):
    """Registered by importing its file, built by name with its own options, trained one step by the project's
    update: the loss is its own formula and the weights move."""
    import toy_estimator  # noqa: F401 - registers toy_mean_masked

    from dare_mega.algorithms.estimators import ESTIMATORS
    from dare_mega.algorithms.rl import noisy_log_probs, policy_update, rows_to_batch

    runner, mask_id = model
    assert "toy_mean_masked" in ESTIMATORS
    estimator = build("toy_mean_masked", mask_id, scale=2.0)
    batch = samples(lengths=(4, 6))
    rows, plan = estimator.rows(batch, [None, None])
    with torch.no_grad():
        lp = noisy_log_probs(runner, rows_to_batch(rows, 4), 1)
    expected = sum(-s.advantage * 2.0 * float(lp[r, p].mean()) for s, (r, p) in zip(batch, plan)) / len(batch)
    before = [p.detach().clone() for p in runner.chunks[0].module.parameters()]
    events = []
    stats = policy_update(runner, SGD(runner, events), estimator, batch, lambda e: [None, None], LossConfig(),
                          totals_of(batch))
    assert abs(stats["loss"] - expected) < 1e-5 and events == ["step"]
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(runner.chunks[0].module.parameters(), before))
    assert moved > 0
