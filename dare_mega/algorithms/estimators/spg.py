"""SPG (sandwiched PO): an ELBO for positive advantages, an EUBO (or a mix) for negative ones, no ratio."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_mega.algorithms.estimators.base import Estimator, Rows, masked_prompt, masked_subset, new_stats, register


@dataclass(frozen=True)
class SPGOptions:
    mc: int = 1  # rows per sample (DARE: num_t = mc_num = 1)
    eubo_beta: float = 1.5
    mix: float = 0.5  # omega: negative advantages use omega EUBO + (1 - omega) ELBO (1.0: EUBO only)
    prompt_mask: float = 0.15  # probability of masking each prompt token (DARE's p=0.15)


@register
class SPG(Estimator):
    """Per MC row a random response block j*: blocks after it fully masked, c ~ U{1..|block|} of its tokens
    masked (p = c / |block|), earlier blocks clean, prompt tokens masked with probability `prompt_mask`. Per
    sample: the ELBO-like mean masked log-prob, and the EUBO (1/beta) mean_i log mean_MC[pi_i^beta m_i / t_hat]
    (t_hat: the row's masked fraction of the response). Loss, on-policy (no ratio, no clip):
    sum_seq -A logp_seq |y| / sum |y|, logp_seq the ELBO for A > 0, else mix EUBO + (1 - mix) ELBO."""

    name = "spg"
    level = "sequence"
    Options = SPGOptions
    uses_old = False
    supports_kl = False  # DARE refuses use_kl_loss for SPG

    def describe(self, block_diffusion: bool) -> str:
        if block_diffusion:
            return ("spg on block diffusion: a random block j* partly masked and the blocks after it fully masked "
                    "in the noisy stream, but every block also sees the clean stream's earlier blocks, so "
                    "'later blocks masked' hides them from nothing but themselves: each later block is scored "
                    "fully masked given the clean blocks before it")
        return "spg: block j* partly masked, later blocks fully masked, mix %g, beta %g" % (self.options.mix,
                                                                                          self.options.eubo_beta)

    def rows(self, samples, generators):
        rows, plan = Rows(), []
        for i, s in enumerate(samples):
            generator = generators[i]
            blocks = s.blocks()
            prompt = masked_prompt(s, self.options.prompt_mask, generator)
            entries = []
            for _ in range(self.options.mc):
                j = int(torch.randint(0, len(blocks), (), generator=generator))
                block = blocks[j]
                count = int(torch.randint(1, len(block) + 1, (), generator=generator))
                masked = masked_subset(block, count, generator) + [p for b in blocks[j + 1 :] for p in b]
                fraction = len(masked) / s.length
                entries.append((rows.add(i, s.clean(), prompt + masked, self.mask_id), masked, fraction))
            plan.append((entries, s.prompt_len, s.length))
        return rows, plan

    def quantities(self, logp, plan):
        beta = self.options.eubo_beta
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

    def loss(self, q, q_old, samples, cfg, totals, q_ref=None, q_rollout=None):
        stats = new_stats()
        total = q[0].new_zeros(()) if q else torch.zeros(())
        for i, s in enumerate(samples):
            adv = torch.tensor(s.advantage, dtype=q[i].dtype, device=q[i].device)
            elbo, eubo = q[i][0], q[i][1]
            logp_seq = elbo if s.advantage > 0 else self.options.mix * eubo + (1 - self.options.mix) * elbo
            total = total - adv * logp_seq * s.length / max(totals.tokens, 1)
            stats["units"] += 1
        return total, stats
