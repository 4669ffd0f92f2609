"""Image -> text: load images, preprocess as the model was trained, decode, detokenize."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmodal.data.images import ImageLoadError, Preprocess, load_image, make_transform
from xmodal.models.decoding import DecodeOptions, decode
from xmodal.models.row_workers import row_parts, run_chunks

ImageLike = Image.Image | str | Path | np.ndarray


def to_image(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image, an image file path or an (H, W, 3) uint8 array."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an array image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read a {type(image).__name__} as an image; give PIL images, paths or uint8 arrays")
    return image.convert("RGB")


@dataclass
class CaptionResult:
    caption: str
    score: float
    words: list[str]
    attention: torch.Tensor | None  # (L, h, w) grid per word, when asked for


class ImageToTextPipeline:
    def __init__(self, model, options: DecodeOptions | None = None):
        self.model = model.eval()
        self.vocab = model.vocab
        self.transform = make_transform(model.config.image_preset)
        c = model.config
        self.options = options or DecodeOptions("beam" if c.beam_size > 1 else "greedy", c.beam_size, c.max_len)

    @property
    def name(self) -> str:
        return self.model.source or self.model.registry_name

    def _batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> the model's (B, 3, H, W) input on its device, normalized a batch at a time."""
        if isinstance(self.transform, Preprocess):
            batch = torch.from_numpy(self.transform.batch(to_image(im) for im in images))
        else:
            batch = torch.stack([self.transform(to_image(im)) for im in images])
        return batch.to(self.model.device)

    @torch.no_grad()
    def image_features(self, images: Sequence[ImageLike], batch_size: int = 256) -> torch.Tensor:
        """The captioner's pooled image features, (N, D) unit vectors on the CPU (nearest-neighbour
        search among pictures as this captioner sees them)."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = self._batch(images[start:start + batch_size])
            out.append(torch.nn.functional.normalize(self.model.image_encoder.forward_pooled(batch).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def describe(self, images: Sequence[ImageLike], batch_size: int = 128, return_attention: bool = False,
                 generator: torch.Generator | None = None, **options) -> list[CaptionResult]:
        """Captions with scores (and attention grids) for each image, in order. On a CPU a batch is
        decoded in one part per core side by side (`run_chunks`), but when sampling (one generator
        draws for the whole batch, in order): each image's search is its own, so are its words.
        In inference mode, not just without gradients: a decoding step is some sixty small
        operations, and their autograd bookkeeping was a tenth of one image's time."""
        opts = replace(self.options, **options) if options else self.options
        results = []
        for start in range(0, len(images), batch_size):
            batch = self._batch(images[start:start + batch_size])
            rows = [slice(None)] if opts.method == "sample" else row_parts(len(batch), batch.device)
            parts = run_chunks(partial(self._decode, batch, opts, generator, return_attention), rows)
            for d in (d for part in parts for d in part):
                words = [self.vocab.words[i] for i in d.tokens]
                attention = None
                if d.attention is not None:
                    n = d.attention.size(-1)
                    side = int(round(n ** 0.5))
                    attention = d.attention.view(-1, side, n // side) if side * (n // side) == n else d.attention
                results.append(CaptionResult(" ".join(words), d.score, words, attention))
        return results

    def _decode(self, batch: torch.Tensor, opts: DecodeOptions, generator, return_attention: bool, rows: slice) -> list:
        return decode(self.model, batch[rows], opts, generator=generator, return_attention=return_attention)

    def describe_files(self, paths: Sequence[str | Path], batch_size: int = 64,
                       on_skip: Callable[[Path, ImageLoadError], None] | None = None,
                       **options) -> Iterator[tuple[Path, CaptionResult]]:
        """(path, result) for each readable image file, batch by batch; an unreadable file is
        handed to `on_skip` and skipped alone, never failing its batch."""
        from xmodal.data.files import read_batches

        for good, images, errors in read_batches(list(paths), batch_size):
            for path, e in errors:
                if on_skip is not None:
                    on_skip(path, e)
            if images:
                yield from zip(good, self.describe(images, batch_size=batch_size, **options))

    def __call__(self, images: Sequence[ImageLike] | ImageLike, **options) -> list[str]:
        """Caption images (PIL images, paths or (H, W, 3) uint8 arrays) -> one string each."""
        if isinstance(images, (Image.Image, str, Path, np.ndarray)):
            images = [images]
        return [r.caption for r in self.describe(list(images), **options)]
