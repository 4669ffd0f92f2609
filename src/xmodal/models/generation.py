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
    task = "text-to-image"

    @staticmethod
    def noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> torch.Tensor:
        """One standard-normal tensor of `shape` per seed, stacked (B, *shape); independent of batching."""
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


class GenerationCollate:
    """(image, captions, record) items -> {"images", "texts"}; a random reference per image
    (Python's RNG, restored on resume) so the model learns every paraphrase."""

    def __init__(self, choice: str = "random"):
        if choice not in ("first", "random"):
            raise ValueError(f"caption choice {choice!r} is not one of ('first', 'random')")
        self.choice = choice

    def __call__(self, items: list) -> dict:
        texts = [caps[0] if self.choice == "first" else random.choice(caps) for _, caps, _ in items]
        return {"images": torch.stack([it[0] for it in items]), "texts": texts}
