"""Pipelines: a loaded model plus its preprocessing and decoding, behind one `__call__`."""

from __future__ import annotations

from xmodal.pipelines.image_to_text import ImageToTextPipeline
from xmodal.pipelines.text_to_image import TextToImagePipeline


def pipeline_for(model):
    if model.task == "image-to-text":
        return ImageToTextPipeline(model)
    if model.task == "text-to-image":
        return TextToImagePipeline(model)
    raise ValueError(f"no pipeline for task {model.task!r} (model {model.registry_name!r})")


__all__ = ["ImageToTextPipeline", "TextToImagePipeline", "pipeline_for"]
