"""SFT samples: chat-templated, padded to the block grid, packed under a token budget, dealt to DP ranks.

Each sample is the prompt (the tokenizer's own chat template with the generation prompt), the response, the
end-of-turn token, then padding to a multiple of the block size with labels kept on the padding (SDAR and
LLaDA2 both train the model to fill the tail of its last block with padding: that is how it learns to stop),
and with data.pad_to further padding to that fixed length (LLaDA's SFT pads responses with end-of-text, which
is masked and trained like the response: the masked-diffusion model learns to fill its canvas with it).

Samples are packed into rows of exactly `token_budget` tokens, in order or first-fit decreasing
(`data.packing`); each sample keeps its own positions 0..n-1 (which is how the attention mask keeps documents
apart) and the row's leftover is one padding pseudo-document with no loss. Rows are shuffled per epoch with the run's seed; every step deals the same
number of rows to every data-parallel rank, and the loader's position is part of the checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dare_mega.data.packing import pack_lengths
from dare_mega.errors import ConfigError


@dataclass
class Sample:
    ids: list[int]
    prompt_len: int
    source: str = ""

    @property
    def answer_len(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class PackedRow:
    """Samples packed into one row of `length` tokens: each keeps its own positions 0..n-1 and the leftover
    is one padding pseudo-document with no loss (laid out by algorithms/layout.py)."""

    samples: list[Sample]
    length: int

    @property
    def documents(self) -> list[tuple[int, int, int]]:
        """(start, length, answer length) of each sample in the row."""
        out, start = [], 0
        for s in self.samples:
            out.append((start, len(s.ids), s.answer_len))
            start += len(s.ids)
        return out

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)


def tokenize_record(record: dict, tokenizer, data_cfg, block_size: int, pad_id: int, eos_id: int) -> Sample:
    source = record.get("_source", "")
    if data_cfg.messages_key in record:
        messages = record[data_cfg.messages_key]
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise ConfigError(f"{source}: '{data_cfg.messages_key}' must end with an assistant message")
        prompt_messages, response = messages[:-1], messages[-1]["content"]
    elif data_cfg.prompt_key in record and data_cfg.response_key in record:
        prompt_messages = [{"role": "user", "content": str(record[data_cfg.prompt_key])}]
        response = str(record[data_cfg.response_key])
    else:
        raise ConfigError(f"{source or 'record'}: needs '{data_cfg.prompt_key}' and '{data_cfg.response_key}', or "
                          f"'{data_cfg.messages_key}'")
    prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True)
    if hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id]
    ids = list(prompt) + answer
    ids += [pad_id] * (-len(ids) % block_size)
    if len(ids) < data_cfg.pad_to:  # LLaDA's fixed length: the response continues with end-of-text
        ids += [pad_id] * (data_cfg.pad_to - len(ids))
    return Sample(ids, len(prompt), source)


def pack(samples: list[Sample], budget: int, overlong: str = "drop",
         packing: str = "in_order") -> tuple[list[PackedRow], int]:
    """Pack into rows of `budget` tokens (`packing`: data/packing.py); returns (rows, number of samples dropped
    as too long)."""
    kept = []
    for sample in samples:
        if len(sample.ids) <= budget:
            kept.append(sample)
        elif overlong == "error":
            raise ConfigError(f"{sample.source or 'a sample'}: {len(sample.ids)} tokens exceed "
                              f"data.token_budget={budget} (or set data.overlong=drop)")
    bins = pack_lengths([len(s.ids) for s in kept], budget, packing)
    return [PackedRow([kept[i] for i in members], budget) for members in bins], len(samples) - len(kept)


class PackedLoader:
    """Deals rows to data-parallel ranks: each step, `micro_batches` rows per rank, equal for all ranks."""

    def __init__(self, rows: list[PackedRow], dp_size: int, dp_rank: int, micro_batches: int, seed: int,
                 shuffle: bool = True):
        if len(rows) < dp_size * micro_batches:
            raise ConfigError(
                f"data: {len(rows)} packed rows cannot give {micro_batches} micro-batch(es) to each of {dp_size} "
                "data-parallel ranks; add data or lower train.micro_batches / data.token_budget"
            )
        self.rows, self.dp_size, self.dp_rank, self.micro = rows, dp_size, dp_rank, micro_batches
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_step(self) -> tuple[list[PackedRow], list[int]]:
        """This rank's rows for the next step, and their indices within the step's global batch (so that
        per-row randomness, such as the noise, does not depend on how the batch is split over ranks)."""
        need = self.dp_size * self.micro
        if self.cursor + need > len(self._order):  # the tail that does not divide evenly waits for next epoch
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order(self.epoch)
        first = self.dp_rank * self.micro
        picked = [self.rows[i] for i in self._order[self.cursor + first : self.cursor + first + self.micro]]
        self.cursor += need
        return picked, list(range(first, first + self.micro))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
