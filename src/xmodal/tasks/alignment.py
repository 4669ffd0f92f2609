"""Image-text alignment: a dual encoder trained contrastively, measured by retrieval."""

from __future__ import annotations

from collections.abc import Sequence

from xmodal.metrics.retrieval import recall_at_k
from xmodal.tasks.data import TrainData, stored_images
from xmodal.tasks.records import prompts as record_prompts
from xmodal.tasks.text_to_image import build as _build_with_text_encoder
from xmodal.tasks.text_to_image import collate as _collate

TASK = "image-text-alignment"
RECIPE_KEYS: dict[str, object] = {}
DATA_DEFAULTS = {"captions": "random"}


def build(name: str, values: dict, data: TrainData, seed: int):
    """A complete dual encoder: its text tower prepared on the training captions (as a generator's)."""
    return _build_with_text_encoder(name, values, data, seed)


collate = _collate


def measure(pipeline, records: Sequence[dict], images: Sequence, k: int = 1) -> dict:
    """Recall@k both ways among all (image, first reference) pairs: pair i matches pair i."""
    return recall_at_k(pipeline(list(images), record_prompts(records)), k=k)


def evaluator(data: TrainData):
    if data.evaluation is None:
        return None
    from xmodal.pipelines import pipeline_for

    records, images = data.evaluation.records, stored_images(data.evaluation)
    return lambda model: measure(pipeline_for(model), records, images)
