"""Text -> image: prompts in, PIL images out, one seed per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from xmodal.data.images import to_pil
from xmodal.models.text_encoders import check_texts


@dataclass
class GeneratedImage:
    prompt: str
    seed: int
    image: Image.Image


class TextToImagePipeline:
    def __init__(self, model):
        self.model = model.eval()

    @property
    def name(self) -> str:
        return getattr(self.model, "source", self.model.registry_name)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | str, n: int = 1, seed: int = 0, batch_size: int = 64,
                 strict: bool = False, progress=None, **options) -> list[GeneratedImage]:
        """n images per prompt, prompt-major; image k (0-based overall) uses seed `seed + k`."""
        prompts = check_texts(prompts)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        jobs = [(p, seed + k) for k, p in enumerate(p for p in prompts for _ in range(n))]
        self.model.text_encoder.encode(sorted(set(prompts)), strict=strict)  # name unknown words once, up front
        out = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already reported above
                images = self.model.generate([p for p, _ in chunk], [s for _, s in chunk], **options)
            out.extend(GeneratedImage(p, s, to_pil(img)) for (p, s), img in zip(chunk, images))
            if progress is not None:
                progress(len(chunk))
        return out

    def __call__(self, prompts: Sequence[str] | str, n: int = 1, seed: int = 0, **options) -> list[Image.Image]:
        """Generate `n` images per prompt; the same seed gives the same images."""
        return [g.image for g in self.generate(prompts, n=n, seed=seed, **options)]
