"""What every task reads from records: prompts, Shapes scene specs, and embeddings in chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from xmodal.worlds.shapes import Scene, SceneSpec


def prompts(records: Sequence[dict], pick: int = 0) -> list[str]:
    """Reference `pick` of each record (0: the first, for Shapes the canonical caption; a record
    with fewer references gives its last)."""
    return [r["captions"][min(pick, len(r["captions"]) - 1)] for r in records]


def scene_specs(records: Sequence[dict]) -> list[SceneSpec] | None:
    """The Shapes scene of every record, or None unless every record has one."""
    if records and all("scene" in r for r in records):
        return [Scene.from_dict(r["scene"]).spec for r in records]
    return None


def class_labels(records: Sequence[dict]) -> list[str] | None:
    """The Fashion-MNIST class of every record, or None unless every record has one."""
    from xmodal.data.fashion import CLASSES

    if records and all(r.get("class") in CLASSES for r in records):
        return [r["class"] for r in records]
    return None


def record_images(records: Sequence[dict], folder: str | Path) -> list[Path]:
    """The image file of each record of a prepared data set."""
    return [Path(folder) / r["image"] for r in records]


def in_chunks(fn: Callable[[Sequence], torch.Tensor], items: Sequence, size: int = 256) -> torch.Tensor:
    """`fn` over consecutive chunks of `items`, concatenated (embedding many images or texts)."""
    if not len(items):
        raise ValueError("nothing to embed")
    with torch.no_grad():
        return torch.cat([fn(items[i:i + size]) for i in range(0, len(items), size)])
