"""SFT objectives for diffusion LLMs: turning packed rows into a noised Batch with loss weights.

Pure functions of the rows and a generator (no model, no process group); the loss itself is the Runner's
weighted NLL, sum(weight * -log p(label)) / sum(normalizer), over the global batch.

- sdar_block (SDAR, the block-diffusion recipe of its LlamaFactory fork): per document t ~ U(t_min, t_max),
  mask rate p = (1 - eps) t + eps, each response token masked with probability p, on the two-stream layout
  [x_t ; x_0]; weight 1/p on masked noisy positions; normalised by the answer length. A document that draws
  no masked token adds nothing that step: the expected weight of a document of n tokens is exactly n
  (SDAR's trainer re-draws up to 10 times and then forces one token, which over-weights short answers:
  docs/algorithms.md).
- llada2_block (dFactory's LLaDA2 block-diffusion SFT): t ~ U(0.3, 0.8) per document, mask rate t, the same
  two-stream layout; weight 1; normalised by the number of masked tokens (a plain mean).
- masked_diffusion (LLaDA's and Dream's MDM SFT, as DARE's trainers run it): one stream, bidirectional attention
  within each document, p as in sdar_block, weight 1/p, normalised by the number of masked tokens (DARE;
  `normalize="answer"`: by the answer length, as LLaDA's published guidelines do). The prompt is never masked;
  with data.pad_to the response is padded with end-of-text to a fixed length and the padding is masked and
  trained like any response token (data/sft.py).

`normalize` ("auto": the objective's own, above) chooses the normaliser of any objective: "answer" (the answer
lengths) or "masked" (the masked tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dare_mega.algorithms.layout import lay_out
from dare_mega.data.sft import PackedRow, Sample
from dare_mega.models.runner import Batch


@dataclass(frozen=True)
class Objective:
    name: str  # sdar_block | llada2_block | masked_diffusion
    t_min: float
    t_max: float
    eps: float
    two_stream: bool
    inverse_p: bool  # weight 1/p (else 1)
    per_answer: bool  # normalise by answer length (else by the number of masked tokens)


NORMALIZERS = ("auto", "answer", "masked")


def objective(name: str, family: str, eps: float = 1e-3, t_min: float | None = None,
              t_max: float | None = None, normalize: str = "auto") -> Objective:
    """The objective `name` ("auto": the published recipe of `family`, a models/ registry name) with its
    defaults filled in; `normalize` overrides its normaliser ("answer" or "masked")."""
    if name == "auto":
        from dare_mega.models.family import family_named

        name = family_named(family).sft_objective
    if normalize not in NORMALIZERS:
        raise ValueError(f"loss.normalize={normalize!r}; expected one of {', '.join(NORMALIZERS)}")
    if name == "llada2_block":
        obj = Objective(name, 0.3 if t_min is None else t_min, 0.8 if t_max is None else t_max, 0.0, True,
                        inverse_p=False, per_answer=False)
    elif name == "sdar_block":
        obj = Objective(name, t_min or 0.0, 1.0 if t_max is None else t_max, eps, True, inverse_p=True,
                        per_answer=True)
    elif name == "masked_diffusion":
        obj = Objective(name, t_min or 0.0, 1.0 if t_max is None else t_max, eps, False, inverse_p=True,
                        per_answer=False)
    else:
        raise ValueError(f"unknown SFT objective {name!r}")
    if normalize == "auto":
        return obj
    return dataclasses.replace(obj, per_answer=normalize == "answer")


def document_noise(length: int, eligible: torch.Tensor, t_uniform: float, uniforms: torch.Tensor,
                   obj: Objective) -> tuple[torch.Tensor, float]:
    """(masked [length] bool, p) for one document from its uniform draws: t = t_min + (t_max - t_min) u_t,
    p = (1 - eps) t + eps, token i masked when u_i < p and it is a response token. Nothing is forced: the
    expected 1/p weight of a document is its number of response tokens."""
    t = obj.t_min + (obj.t_max - obj.t_min) * t_uniform
    p = (1 - obj.eps) * t + obj.eps
    return (uniforms[:length] < p) & eligible, p


def noise_document(sample: Sample, obj: Objective, generator: torch.Generator):
    """(masked [n] bool, rate [n] float) of one document: its response tokens masked at its own rate."""
    n = len(sample.ids)
    eligible = torch.arange(n) >= sample.prompt_len
    t_uniform = float(torch.rand((), generator=generator))
    masked, p = document_noise(n, eligible, t_uniform, torch.rand(n, generator=generator), obj)
    return masked, torch.full((n,), p)


def loss_weights(masked: torch.Tensor, rate: torch.Tensor, obj: Objective) -> torch.Tensor:
    """Per-position loss weights: 1/p on masked positions (or 1), 0 elsewhere."""
    return masked.float() / rate if obj.inverse_p else masked.float()


def sft_batch(rows: list[PackedRow], obj: Objective, mask_token_id: int, block_size: int,
              generators: list[torch.Generator]) -> Batch:
    """Noise the rows (row i's documents in order with generators[i]) and lay them out for the model
    (two-stream or single, algorithms/layout.py)."""
    noisy, clean, weights, bins, normalizer = [], [], [], [], []
    for row, generator in zip(rows, generators):
        bins.append([])
        masked_in_row = 0
        for sample in row.samples:
            masked, rate = noise_document(sample, obj, generator)
            ids = torch.tensor(sample.ids, dtype=torch.long)
            bins[-1].append(len(clean))
            clean.append(ids)
            noisy.append(torch.where(masked, torch.full_like(ids, mask_token_id), ids))
            weights.append(loss_weights(masked, rate, obj))
            masked_in_row += int(masked.sum())
        normalizer.append(sum(s.answer_len for s in row.samples) if obj.per_answer else masked_in_row)
    length = max(r.length for r in rows)
    return lay_out(noisy, clean, bins, block_size, weights=weights, normalizer=normalizer, min_length=length,
                   two_stream=obj.two_stream).batch
