"""Trajectory replay (TraceRL / DARE's CJ-GRPO): exact log-probs of the tokens as the rollout revealed them."""

from __future__ import annotations

import torch

from dare_mega.algorithms.estimators.base import Estimator, Rows, register
from dare_mega.algorithms.policy import token_ppo_loss


@register
class TrajectoryReplay(Estimator):
    """Block diffusion: row s shows every block as it was at local step s (tokens revealed at an earlier step
    visible, the rest masked; earlier blocks clean through the clean stream), so one row serves every block.
    Masked diffusion (every position sees the whole canvas): one row per (block, step) the rollout took, the
    canvas as it was then: earlier blocks decoded, the block's tokens revealed at earlier steps visible, the
    rest of the block and every later block masked (DARE's MDLM CJ-GRPO replay, step_merge off). Each token's
    log-prob is read in the row of the step that revealed it.
    Loss: token-level dual-clip PPO with DARE's CJ weights (1 / tokens of the token's (block, step) transition /
    transitions of the sample, each sample's weights sum to 1), the mean over samples, and truncated importance
    weights against the rollout's own log-probs."""

    name = "trajectory"
    needs = frozenset({"step_maps", "rollout_logprobs"})
    random_rows = False

    def describe(self, block_diffusion: bool) -> str:
        if not block_diffusion:
            return ("trajectory replay: one forward per (block, step) of the rollout, the whole canvas as it was "
                    "then (later blocks masked); each token's log-prob at the step that revealed it")
        return ("trajectory replay: each token's log-prob with its block as it was at the step that revealed it "
                "(earlier blocks clean), as the rollout saw it")

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        for i, s in enumerate(samples):
            if s.masked_diffusion:
                plan.append(self._canvas_rows(rows, i, s))
                continue
            clean = s.clean()
            steps = max(s.reveal_steps) + 1 if s.reveal_steps else 1
            row_of_step = []
            for step in range(steps):
                masked = [s.prompt_len + k for k, r in enumerate(s.reveal_steps) if r >= step]
                row_of_step.append(rows.add(i, clean, masked, self.mask_id))
            plan.append([(row_of_step[r], s.prompt_len + k) for k, r in enumerate(s.reveal_steps)])
        return rows, plan

    def _canvas_rows(self, rows: Rows, i: int, s) -> list[tuple[int, int]]:
        """Masked diffusion: the canvas at each (block, step) the rollout decoded; [(row, position)] per token."""
        clean, response = s.clean(), s.response()
        moments = sorted({(s.block_of(p), r) for p, r in zip(response, s.reveal_steps)})
        row_of = {}
        for block, step in moments:
            hidden = [p for p, r in zip(response, s.reveal_steps)
                      if s.block_of(p) > block or (s.block_of(p) == block and r >= step)]
            row_of[(block, step)] = rows.add(i, clean, hidden, self.mask_id)
        return [(row_of[(s.block_of(p), r)], p) for p, r in zip(response, s.reveal_steps)]

    def quantities(self, logp, plan):
        return [torch.stack([logp[row, pos] for row, pos in where]) if where else logp.new_zeros(0) for where in plan]

    def token_weights(self, samples) -> list[torch.Tensor]:
        """CJ-GRPO: 1 / (tokens in the token's (block, step) transition) / (transitions in the sample)."""
        out = []
        for s in samples:
            key = [(s.block_of(p), r) for p, r in zip(s.response(), s.reveal_steps)]
            sizes: dict = {}
            for k in key:
                sizes[k] = sizes.get(k, 0) + 1
            out.append(torch.tensor([1.0 / sizes[k] / len(sizes) for k in key]))
        return out

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        from dare_mega.algorithms.estimators.base import new_stats

        stats = new_stats()
        weights = [w / totals.samples for w in self.token_weights(samples)]
        return token_ppo_loss(self, q, q_old, samples, cfg, weights, stats, q_ref, q_rollout), stats
