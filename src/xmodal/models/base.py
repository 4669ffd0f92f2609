"""What every model family must offer, written down once, and the one place capabilities are read.

- Every trainable model: `loss(batch) -> (loss, logs)`, always a pair: the scalar tensor the
  optimizer minimises, and a dict of named detached terms for the log (may be empty).
- Captioners (`image-to-text`): `forward(images, tokens)` for teacher forcing, and
  `encode_images` / `init_state` / `step`, so that one decoding module serves them all
  (`xmodal.models.decoding`); a `vocab` travels with the weights.
- Generators (`text-to-image`): `generate(texts, seeds, strict=False, **options) -> (B, 3, H, W)`
  in [-1, 1], image i a function of (texts[i], seeds[i]) only.
- Dual encoders (`image-text-alignment`): `encode_image` / `encode_text`, unit vectors.
- Text encoders: `encode(texts, strict) -> (tokens (B, T, D), mask (B, T), pooled (B, D))`.
- Image encoders: `forward_features(images) -> (B, N, D)` grid features.

Optional abilities are declared, not probed: a model class lists them in `capabilities`
(`SAMPLER_OPTIONS`, `LAYOUT`, `DRAW`), and callers ask `supports(model, ...)` / `require(...)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

import torch

from xmodal.models.row_workers import run_chunks

# generate() takes GenerateOptions (steps, guidance, sampler, negative); the model also offers
# check_options(**options) (its own ranges) and work(**options) (network evaluations per image)
SAMPLER_OPTIONS = "sampler_options"
LAYOUT = "layout"  # the model may carry a layout stage (text -> boxes -> image)
# generate() is text -> (layout drawn per seed) -> noise per seed -> draw(noise, tokens, mask,
# pooled, layout): one pass of fixed work that `xmodal export onnx` traces into one graph; the
# model offers `noise_shape` and `draw` (xmodal.models.generation)
DRAW = "draw"
CAPABILITIES = (SAMPLER_OPTIONS, LAYOUT, DRAW)

SAMPLERS = ("ddpm", "ddim", "dpm")
MAX_NEGATIVE_CHARS = 500


# Images per call of a conv net at inference on a CPU. The activations of a few images stay in
# the cache, those of 256 do not: the Shapes captioners' encoder ran 3.6x faster in calls of 8
# than in one call of 256, the diffusion autoencoder's decoder 2.6x (benchmarks/). The same
# numbers either way: every layer here works on each image alone at inference.
CPU_CHUNK = 8


def in_cpu_chunks(fn, x: torch.Tensor, chunk: int = CPU_CHUNK):
    """fn(x), computed `chunk` rows at a time on a CPU; fn returns a tensor or a dict of tensors."""
    return in_cpu_row_chunks(lambda rows: fn(x[rows]), len(x), x.device, chunk)


def image_chunk(images: torch.Tensor) -> int:
    """Rows per call of an image encoder on a CPU: CPU_CHUNK at 64 px and above, as many pictures
    as hold the same pixels below (fashion-captioner's 32 px encoder: 2,100-2,370 captions/s in
    calls of 32-64 against 1,384-1,628 in calls of 8)."""
    return max(CPU_CHUNK, CPU_CHUNK * 64 * 64 // (images.shape[-2] * images.shape[-1]))


def in_cpu_row_chunks(fn, count: int, device, chunk: int = CPU_CHUNK):
    """fn(rows) over row slices of `chunk` rows on a CPU, concatenated (tensors, or dicts of
    tensors key by key); one call with all rows (`slice(None)`) elsewhere or for a few rows, so a
    traced graph keeps its batch size a variable."""
    if torch.device(device).type != "cpu" or count <= chunk:
        return fn(slice(None))
    parts = run_chunks(fn, [slice(start, start + chunk) for start in range(0, count, chunk)])
    if isinstance(parts[0], dict):
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return torch.cat(parts)


def supports(model, capability: str) -> bool:
    """Whether a model (or model class) declares `capability`."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; valid: {CAPABILITIES}")
    cls = model if isinstance(model, type) else type(model)
    return capability in cls.capabilities


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Sampler options of a text-to-image request, shared by the CLI, the server and the pipeline.
    `None` leaves the model's own default."""

    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    negative: str | None = None

    def given(self) -> dict:
        """The options set, as keyword arguments of a generator's `generate`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def check(self, model=None) -> GenerateOptions:
        """Raise a ValueError naming the first bad value (or an option the model does not take)."""
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if self.guidance is not None and not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance)
                                              and 0 <= self.guidance <= 50):
            raise ValueError(f"guidance must be a number in 0..50, got {self.guidance!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {SAMPLERS}")
        if self.negative is not None and len(self.negative) > MAX_NEGATIVE_CHARS:
            raise ValueError(f"negative prompt is longer than {MAX_NEGATIVE_CHARS} characters")
        if model is not None and self.given() and not supports(model, SAMPLER_OPTIONS):
            names = ", ".join(self.given())
            raise ValueError(f"model {model.registry_name!r} takes no sampler options (got {names})")
        if model is not None and supports(model, SAMPLER_OPTIONS):
            model.check_options(**self.given())  # the model's own ranges (e.g. steps per sampler)
        return self


class Capable:
    """Mixed into `PretrainedModel`: the declared capabilities, empty unless a class adds some."""

    capabilities: ClassVar[frozenset[str]] = frozenset()


# ----------------------------------------------------------------------------- the contracts


@runtime_checkable
class TextEncoder(Protocol):
    out_dim: int

    def encode(self, texts: Sequence[str], strict: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def token_mask(self, texts: Sequence[str], strict: bool = False) -> torch.Tensor: ...


@runtime_checkable
class ImageEncoder(Protocol):
    out_dim: int

    def forward_features(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Trainable(Protocol):
    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@runtime_checkable
class Captioner(Trainable, Protocol):
    vocab: object

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def init_state(self, memory: dict[str, torch.Tensor]): ...

    def step(self, state, tokens: torch.Tensor) -> tuple[torch.Tensor, object, torch.Tensor | None]: ...


@runtime_checkable
class Generator(Trainable, Protocol):
    def generate(self, texts: Sequence[str], seeds: Sequence[int], strict: bool = False,
                 **options) -> torch.Tensor: ...


@runtime_checkable
class DualEncoder(Trainable, Protocol):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, texts: Sequence[str], strict: bool = False) -> torch.Tensor: ...


CONTRACTS = {"image-to-text": Captioner, "text-to-image": Generator, "image-text-alignment": DualEncoder,
             "image-autoencoder": Trainable}
