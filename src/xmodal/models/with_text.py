"""A model that holds a text encoder: text-to-image models and the dual encoder share this."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from torch import nn

from xmodal.models.hub import PretrainedModel
from xmodal.models.text_encoders import create_text_encoder


class WithTextEncoder(PretrainedModel):
    """A model holding a text encoder: the prepared one given as `text_encoder=` (training), or one
    built from `config.text_encoder` (loading a folder, whose weights then fill it)."""

    parts: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(self, config, text_encoder: nn.Module | None = None):
        super().__init__(config)
        self.text_encoder = text_encoder if text_encoder is not None else create_text_encoder(config.text_encoder)

    @classmethod
    def config_from_parts(cls, parts: dict) -> dict:
        return {"text_encoder": parts["text_encoder"].spec} if "text_encoder" in parts else {}

    def packaged_prefixes(self) -> tuple[str, ...]:
        return ("text_encoder.",) if self.text_encoder.packaged else ()

    def save_assets(self, folder: Path) -> None:
        self.text_encoder.save_assets(folder)

    def load_assets(self, folder: Path) -> None:
        self.text_encoder.load_assets(folder)

    def encode_text(self, texts: Sequence[str], strict: bool = False):
        return self.text_encoder.encode(texts, strict=strict)
