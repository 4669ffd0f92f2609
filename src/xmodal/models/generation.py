"""What every text-to-image model shares: a text encoder inside, conditioning on its
embeddings (never on raw strings), per-image seeds, and an optional layout stage.

A generator implements `loss(batch) -> (loss, logs)` with batch = {"images": (B, 3, H, W) in
[-1, 1], "texts": list[str]} (and "layout" with a layout stage, see `xmodal.data.collate`),
and `generate(texts, seeds) -> (B, 3, H, W) in [-1, 1]`, where image i is a function of
(texts[i], seeds[i]) only: the same seed gives the same image (`xmodal.models.base`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from xmodal.models.base import LAYOUT, in_cpu_row_chunks
from xmodal.models.layout import LayoutModel, layout_generators
from xmodal.models.layout_draws import check_length
from xmodal.models.text_encoders import WordTextEncoder
from xmodal.models.with_text import WithTextEncoder


def stage_sizes(name: str, image_size: int, image_channels: int, channels: Sequence[int],
                subpixel: bool = False) -> list[int]:
    """The sides 4, 8, ..., image_size of a generator that doubles per stage, one width in
    `channels` each (but the last with `subpixel`: its last stage draws 2 x 2 pixels from each
    place at half the size); a 32 or 64 px, grayscale (1) or colour (3) picture, else a clear error."""
    if image_size not in (32, 64):
        raise ValueError(f"{name} draws 32 or 64 px images, got image_size={image_size}")
    if image_channels not in (1, 3):
        raise ValueError(f"image_channels must be 1 (grayscale) or 3, got {image_channels}")
    sizes = [4 * 2 ** i for i in range(4 if image_size == 32 else 5)]
    widths = sizes[:-1] if subpixel else sizes
    if len(channels) != len(widths):
        raise ValueError(f"channels must give {len(widths)} widths ({', '.join(map(str, widths))} px), got {channels}")
    return sizes


class TextToImageModel(WithTextEncoder):
    """Generators may add a layout stage (`xmodal.models.layout`): `config.layout` set builds
    `self.layout`, and `layout_maps()` gives the map the image generator paints from."""

    task = "text-to-image"
    capabilities = frozenset({LAYOUT})
    draw_rows = 0  # DRAW models: rows per call of the exported draw graph that run best on a CPU (0: the whole batch)
    # PyTorch's rows per image-network call on a CPU when drawing (`in_drawing_chunks`): shapes-gan
    # drew 10-30% faster in calls of 16 than of 8 or 64, shapes-vae at batch 256 half as fast in one call
    draw_chunk = 16

    def __init__(self, config, text_encoder: nn.Module | None = None):
        super().__init__(config, text_encoder)
        layout = config.layout
        words = len(self.text_encoder.vocab.words) if isinstance(self.text_encoder, WordTextEncoder) else 0
        self.layout = LayoutModel(self.text_encoder.out_dim, layout, words) if layout is not None else None

    def config_for_saving(self) -> dict:
        saved = dataclasses.asdict(self.config)
        if saved.get("layout") is None:
            saved["layout"] = {}  # how every saved folder says "no layout stage"
        return saved

    def check_lengths(self, mask: torch.Tensor) -> None:
        """A ValueError when a prompt (a row of the text encoder's mask) is longer than the layout
        stage reads, so that it can be skipped alone before its batch is drawn."""
        if self.layout is not None and mask.numel():
            check_length(self.layout.config, int(mask.sum(1).max()))

    @property
    def layout_slots(self) -> int:
        return self.layout.config.slots if self.layout is not None else 0

    @property
    def layout_labels(self) -> dict[str, list[str]]:
        return self.layout.config.labels if self.layout is not None else {}

    def layout_maps(self, tokens, mask, sizes: Sequence[int], batch: dict | None = None,
                    seeds: Sequence[int] | None = None, texts: Sequence[str] | None = None,
                    planes: bool = False) -> tuple[list | None, torch.Tensor | None]:
        """Layout maps (B, C, s, s) for each s in `sizes` (with `planes`, as `BoxPlanes`), and the
        layout's NLL: in training the true boxes of `batch["layout"]` are painted, in generation
        boxes drawn per seed for the prompts `texts` (NLL None). Without a layout stage: (None, None)."""
        if self.layout is None:
            return None, None
        slots = self.layout.read(tokens, mask)  # (B, K, D)
        if batch is not None:
            if "layout" not in batch:
                raise ValueError("this generator has a layout stage and trains on object boxes, but the batch has "
                                 "none: collate with GenerationCollate(layout_slots=model.layout_slots)")
            boxes, present, *labels = batch["layout"]
            labels = labels[0] if labels else None
            nll = self.layout.loss(slots, boxes, present, labels, self.layout_words(batch["texts"]))
        else:
            layout = self.sample_layout(tokens, mask, seeds, slots, self.layout_words(texts))
            return self.paint_layout(layout, sizes, planes=planes), None
        return self.paint_layout((slots, boxes, present, labels), sizes, planes=planes), nll

    def layout_words(self, texts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prompts' word ids and mask (B, T) where the layout reads its labels from the words, else None."""
        if self.layout is None or self.layout.word_labels is None:
            return None
        if texts is None:
            raise ValueError("this layout stage reads its labels from the prompts' words: pass the texts")
        ids, mask = self.text_encoder.ids(texts)
        device = self.layout.queries.device
        return ids.to(device), mask.to(device)

    def sample_layout(self, tokens, mask, seeds: Sequence[int], slots=None, words=None) -> tuple[torch.Tensor, ...]:
        """Generation: one layout drawn per seed -> (slots, boxes, present, labels), for
        `paint_layout`; labels (B, K, keys) predicted from the slots, or from `words` (the prompts'
        `layout_words`) with `word_labels`; None without labels."""
        slots = self.layout.read(tokens, mask) if slots is None else slots
        return (slots, *self.layout.sample(slots, layout_generators(seeds)), self.layout.predict_labels(slots, words))

    def paint_layout(self, layout: tuple[torch.Tensor, ...], sizes: Sequence[int], rows=slice(None),
                     planes: bool = False) -> list:
        """A sampled layout's maps at each size in `sizes`, for `rows` only; with `planes`, as
        `BoxPlanes` (the factored map, for `conv_over_map`)."""
        slots, boxes, present, labels = (None if t is None else t[rows] for t in layout)
        paint = self.layout.planes if planes else self.layout.paint
        return [paint(slots, boxes, present, s, labels) for s in sizes]

    def in_drawing_chunks(self, draw, count: int, device, layout: tuple[torch.Tensor, ...] | None = None):
        """draw(rows, maps) over `draw_chunk` rows at a time on a CPU, concatenated; `maps` is that
        chunk's sampled layout as `BoxPlanes` at `self.map_sizes` (for `conv_over_map`), or None
        without a layout: the maps and activations of a few pictures stay in the cache."""
        def rows_of(rows):
            maps = self.paint_layout(layout, self.map_sizes, rows, planes=True) if layout is not None else None
            return draw(rows, maps)

        return in_cpu_row_chunks(rows_of, count, device, self.draw_chunk)

    def generate_by_draw(self, texts: Sequence[str], seeds: Sequence[int], strict: bool = False) -> torch.Tensor:
        """generate() of a model that declares DRAW: the text, a layout drawn per seed (with a
        layout stage), noise of `self.noise_shape` per seed, then `self.draw(...)`. Under a caller's
        autocast only `draw` runs in its dtype; the text and layout stage stay in fp32: their small
        matmuls, attention and LSTM ran slower in bf16 on a CPU (shapes-gan, 128 pictures on one
        thread: 186 ms in fp32, 147 all in bf16, 133 with the generator alone in bf16)."""
        with torch.autocast(self.device.type, enabled=False):
            tokens, mask, pooled = self.encode_text(texts, strict=strict)
            mask = mask.bool()
            layout = self.sample_layout(tokens, mask, seeds, words=self.layout_words(texts)) if self.layout is not None else None
        return self.draw(self.noise(seeds, self.noise_shape, pooled.device), tokens, mask, pooled, layout)

    @staticmethod
    def noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> torch.Tensor:
        """One standard-normal tensor of `shape` per seed, stacked (B, *shape); independent of batching."""
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)
