"""Pipelines: a loaded model plus its preprocessing and decoding, behind one `__call__`."""

from __future__ import annotations

from xmodal.pipelines.image_to_text import ImageToTextPipeline


def pipeline_for(model):
    if model.task == "image-to-text":
        return ImageToTextPipeline(model)
    raise ValueError(f"no pipeline for task {model.task!r} (model {model.registry_name!r})")


__all__ = ["ImageToTextPipeline", "pipeline_for"]
