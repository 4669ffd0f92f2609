"""The public Python API: `load`, `list_models`."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from xmodal.models.folders import bundled_names, read_model_meta, resolve_model_dir


def load(name_or_dir: str | Path, device: str | torch.device = "cpu"):
    """A ready-to-call pipeline for a bundled model name or a saved model folder.

    `xmodal.load("shapes-captioner-transformer")(images) -> list[str]`.
    """
    from xmodal.pipelines import load_pipeline

    return load_pipeline(name_or_dir, device=device)


def _card_quality(card: str, where: str = "model card") -> dict:
    """The `quality:` JSON line of a model card (written by the training recipe from measured
    numbers); {} with a warning when the line is not JSON (an edited card must not break a listing)."""
    m = re.search(r"^quality: (\{.*\})$", card, flags=re.M)
    if not m:
        return {}
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError as e:
        warnings.warn(f"{where}: its quality line is not JSON ({e}); shown without it", stacklevel=2)
        return {}


def list_models() -> list[dict]:
    """Every bundled model: name, task, registry model and the quality its card reports; an
    alias (a task's default name) also names the model it stands for (`alias_of`)."""
    out = []
    for name in bundled_names():
        folder = resolve_model_dir(name)
        meta = read_model_meta(folder)
        card = folder / "README.md"
        quality = _card_quality(card.read_text(), str(card)) if card.is_file() else {}
        entry = {"name": name, "task": meta.get("task", "?"), "model": meta["model"], "quality": quality}
        if folder.name != name:
            entry["alias_of"] = folder.name
        out.append(entry)
    return out
