"""Collates: (image, captions, record) items -> the batch dicts models train on.

Both pick one reference caption per image: `"first"` (for Shapes, the canonical one) or
`"random"`, drawn from Python's RNG, which checkpoints save, so a resumed run draws the same.
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from xmodal.data.boxes import DEFAULT_BOXES, layout_targets
from xmodal.data.text import Vocabulary

CaptionChoice = Literal["first", "random"]


def pick_caption(captions: list[str], choice: CaptionChoice) -> str:
    return captions[0] if choice == "first" else random.choice(captions)


def _check_choice(choice: str) -> None:
    if choice not in ("first", "random"):
        raise ValueError(f"caption choice {choice!r} is not one of ('first', 'random')")


class CaptionCollate:
    """-> {"images" (B, 3, H, W), "tokens" (B, T)}: <start> words <end>, padded, at most `max_len` words.
    With `memory_rows` ({record "image": row}), also "memory_row" (B,): each picture's own row
    of a retrieval captioner's memory (-1: none), which it must not read."""

    def __init__(self, vocab: Vocabulary, max_len: int = 20, choice: CaptionChoice = "random",
                 memory_rows: dict | None = None):
        _check_choice(choice)
        self.vocab, self.max_len, self.choice, self.memory_rows = vocab, max_len, choice, memory_rows

    def __call__(self, items: list) -> dict:
        seqs = []
        for _, captions, _ in items:
            ids = self.vocab.encode(pick_caption(captions, self.choice))
            if len(ids) > self.max_len + 2:
                ids = [*ids[: self.max_len + 1], self.vocab.end_id]
            seqs.append(torch.tensor(ids))
        tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.vocab.pad_id)
        batch = {"images": torch.stack([item[0] for item in items]), "tokens": tokens}
        if self.memory_rows is not None:
            batch["memory_row"] = torch.tensor([self.memory_rows.get(item[2].get("image"), -1) for item in items])
        return batch


class GenerationCollate:
    """-> {"images" (B, 3, H, W), "texts"}; with `layout_slots` > 0 also "layout": the true boxes
    of the records' objects (found at `boxes`, see `xmodal.data.boxes`) and their `layout_labels`."""

    def __init__(self, choice: CaptionChoice = "random", layout_slots: int = 0,
                 layout_labels: dict | None = None, boxes: str = DEFAULT_BOXES):
        _check_choice(choice)
        self.choice, self.layout_slots, self.layout_labels, self.boxes = choice, layout_slots, layout_labels or {}, boxes

    def __call__(self, items: list) -> dict:
        batch = {"images": torch.stack([it[0] for it in items]),
                 "texts": [pick_caption(caps, self.choice) for _, caps, _ in items]}
        if self.layout_slots:
            batch["layout"] = layout_targets([it[2] for it in items], self.layout_slots, self.layout_labels,
                                             self.boxes)
        return batch
