"""Image <-> text alignment: a dual encoder behind one `__call__` (cosine similarities)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xmodal.data.images import make_transform
from xmodal.pipelines.image_to_text import ImageLike, to_image


class AlignmentPipeline:
    def __init__(self, model):
        self.model = model.eval()
        self.transform = make_transform(model.config.image_preset)

    @property
    def name(self) -> str:
        return self.model.source or self.model.registry_name

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageLike], batch_size: int = 256) -> torch.Tensor:
        """Unit vectors (N, E), one per image (PIL images, paths or (H, W, 3) uint8 arrays)."""
        if not len(images):
            raise ValueError("no images to embed")
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.transform(to_image(im)) for im in images[start:start + batch_size]])
            out.append(self.model.encode_image(batch.to(self.model.device)))
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit vectors (N, E), one per text."""
        if not len(texts):
            raise ValueError("no texts to embed")
        return torch.cat([self.model.encode_text(list(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)])

    def __call__(self, images: Sequence[ImageLike], texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of every image with every text, (N_images, N_texts)."""
        return self.embed_images(images) @ self.embed_texts(texts).t()
