"""Pipelines: a loaded model plus its preprocessing and decoding, behind one `__call__`."""

from __future__ import annotations

from xmodal.pipelines.alignment import AlignmentPipeline
from xmodal.pipelines.image_to_text import ImageToTextPipeline
from xmodal.pipelines.text_to_image import TextToImagePipeline

PIPELINES = {"image-to-text": ImageToTextPipeline, "text-to-image": TextToImagePipeline,
             "image-text-alignment": AlignmentPipeline}


def pipeline_for(model, task: str | None = None):
    """The pipeline of a loaded model's task; `task` names the one expected (a clear error otherwise)."""
    if task is not None and model.task != task:
        raise ValueError(f"{model.source or model.registry_name} is a {model.task} model "
                         f"({model.registry_name}); this needs a {task} model")
    if model.task not in PIPELINES:
        raise ValueError(f"no pipeline for task {model.task!r} (model {model.registry_name!r}); "
                         f"pipelines: {sorted(PIPELINES)}")
    return PIPELINES[model.task](model)


def load_pipeline(name_or_dir, task: str | None = None, device="cpu"):
    """The pipeline of a bundled model name or model folder; `task` names the one expected."""
    from xmodal.models.hub import load_model

    return pipeline_for(load_model(name_or_dir, device), task)


__all__ = ["load_pipeline", "AlignmentPipeline", "ImageToTextPipeline", "TextToImagePipeline", "pipeline_for", "PIPELINES"]
