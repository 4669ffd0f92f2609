"""What every text-to-image model shares: a text encoder inside, conditioning on its
embeddings (never on raw strings), per-image seeds, and the batch format.

A generator implements `loss(batch)` with batch = {"images": (B, 3, H, W) in [-1, 1],
"texts": list[str]} and `generate(texts, seeds) -> (B, 3, H, W) in [-1, 1]`, where
image i is a function of (texts[i], seeds[i]) only: the same seed gives the same image.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from xmodal.models.hub import PretrainedModel
from xmodal.models.layout import LayoutConfig, LayoutModel, layout_generators, layout_targets
from xmodal.models.text_encoders import create_text_encoder


class WithTextEncoder(PretrainedModel):
    """A model holding a text encoder built from `config.text_encoder` (its files travel as assets)."""

    def __init__(self, config):
        super().__init__(config)
        self.text_encoder = create_text_encoder(config.text_encoder)

    def save_assets(self, folder: Path) -> None:
        if hasattr(self.text_encoder, "save_assets"):
            self.text_encoder.save_assets(folder)

    def load_assets(self, folder: Path) -> None:
        if hasattr(self.text_encoder, "load_assets"):
            self.text_encoder.load_assets(folder)

    def encode_text(self, texts: Sequence[str], strict: bool = False):
        return self.text_encoder.encode(texts, strict=strict)


class TextToImageModel(WithTextEncoder):
    """Generators may add a layout stage (`xmodal.models.layout`): `config.layout` non-empty
    builds `self.layout`, and `layout_maps()` gives the map the image generator paints from."""

    task = "text-to-image"

    def __init__(self, config):
        super().__init__(config)
        layout = getattr(config, "layout", None)
        self.layout = LayoutModel(self.text_encoder.out_dim, LayoutConfig(**layout)) if layout else None

    @property
    def layout_slots(self) -> int:
        return self.layout.config.slots if self.layout is not None else 0

    @property
    def layout_labels(self) -> dict[str, list[str]]:
        return self.layout.config.labels if self.layout is not None else {}

    def layout_maps(self, tokens, mask, sizes: Sequence[int], batch: dict | None = None,
                    seeds: Sequence[int] | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Layout maps (B, C, s, s) for each s in `sizes`, and the layout's NLL: in training
        the true boxes of `batch["layout"]` are painted, in generation boxes drawn per seed.
        Without a layout stage: (None, None)."""
        if self.layout is None:
            return None, None
        slots = self.layout.read(tokens, mask)  # (B, K, D)
        if batch is not None:
            if "layout" not in batch:
                raise ValueError("this generator has a layout stage and trains on object boxes, but the batch has "
                                 "none: collate with GenerationCollate(layout_slots=model.layout_slots)")
            boxes, present, *labels = batch["layout"]
            labels = labels[0] if labels else None
            nll = self.layout.loss(slots, boxes, present, labels)
        else:
            boxes, present = self.layout.sample(slots, layout_generators(seeds))
            nll, labels = None, None  # paint() predicts the labels
        return [self.layout.paint(slots, boxes, present, s, labels) for s in sizes], nll

    @staticmethod
    def noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> torch.Tensor:
        """One standard-normal tensor of `shape` per seed, stacked (B, *shape); independent of batching."""
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


class GenerationCollate:
    """(image, captions, record) items -> {"images", "texts"}; a random reference per image
    (Python's RNG, restored on resume) so the model learns every paraphrase. With
    `layout_slots` > 0 also "layout": the true boxes of the records' objects (and their
    `layout_labels`)."""

    def __init__(self, choice: str = "random", layout_slots: int = 0, layout_labels: dict | None = None):
        if choice not in ("first", "random"):
            raise ValueError(f"caption choice {choice!r} is not one of ('first', 'random')")
        self.choice, self.layout_slots, self.layout_labels = choice, layout_slots, layout_labels or {}

    def __call__(self, items: list) -> dict:
        texts = [caps[0] if self.choice == "first" else random.choice(caps) for _, caps, _ in items]
        batch = {"images": torch.stack([it[0] for it in items]), "texts": texts}
        if self.layout_slots:
            batch["layout"] = layout_targets([it[2] for it in items], self.layout_slots, self.layout_labels)
        return batch
