"""Text -> image: prompts in, PIL images out, one seed per image."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from xmodal.data.images import GeneratedImage, stream_images, to_pils
from xmodal.data.text import check_texts
from xmodal.models.base import SAMPLER_OPTIONS, GenerateOptions, supports
from xmodal.models.hub import autocast_for, check_precision
from xmodal.models.row_workers import row_parts, run_chunks


class TextToImagePipeline:
    def __init__(self, model, precision: str = "auto"):
        self.model = model.eval()
        self.precision = precision  # "auto": the model's default dtype where the device runs it natively

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    @property
    def name(self) -> str:
        return self.model.source or self.model.registry_name

    def options(self, options: GenerateOptions | None = None, **values) -> GenerateOptions:
        """Checked sampler options: a GenerateOptions, or its fields as keywords."""
        if options is None:
            unknown = sorted(set(values) - set(GenerateOptions.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown generate option(s) {unknown}; valid: {sorted(GenerateOptions.__dataclass_fields__)}")
            options = GenerateOptions(**values)
        elif values:
            raise ValueError("give GenerateOptions or option keywords, not both")
        return options.check(self.model)

    def work(self, images: int, options: GenerateOptions | None = None) -> int:
        """Network evaluations that `images` images take with these options (1 each for a
        one-pass generator; steps, x2 with guidance, for diffusion)."""
        if not supports(self.model, SAMPLER_OPTIONS):
            return images
        return images * self.model.work(**(options or GenerateOptions()).given())

    @torch.no_grad()
    def check_prompts(self, prompts: Sequence[str] | str, strict: bool = False) -> list[str]:
        """The warnings (unknown words) the prompts would give; raises when one cannot be drawn
        (empty, not text, or unknown words when `strict`)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask = self.model.text_encoder.token_mask(check_texts(prompts), strict=strict)
        self.model.check_lengths(mask)
        return [str(w.message) for w in caught]

    @torch.no_grad()
    def render(self, prompts: Sequence[str], seeds: Sequence[int], options: GenerateOptions | None = None) -> list[Image.Image]:
        """One image per (prompt, seed) pair; prompts already checked. On a CPU the batch is cut
        in one part per core, drawn side by side (`run_chunks`): image i is a function of its own
        prompt and seed, so the pictures are the same (text, layout and PIL work run beside the
        other part's convolutions: shapes-gan drew 800-960 images/s at batch 256 against 670-790)."""
        prompts, seeds, given = list(prompts), list(seeds), (options or GenerateOptions()).given()

        def part(rows: slice) -> list[Image.Image]:
            return to_pils(self.model.generate(prompts[rows], seeds[rows], **given))

        with warnings.catch_warnings(), autocast_for(self.model, self.precision):  # the workers run in both
            # (warning filters are the process's; `run_chunks` carries autocast into its threads)
            warnings.simplefilter("ignore")  # unknown words are reported by check_prompts
            parts = run_chunks(part, row_parts(len(prompts), self.model.device))
        return [image for images in parts for image in images]

    def generate(self, prompts: Sequence[str] | str, n: int = 1, seed: int = 0, batch_size: int = 64,
                 strict: bool = False, progress: Callable[[int], None] | None = None,
                 options: GenerateOptions | None = None, seeds: Sequence[int] | None = None,
                 **option_values) -> list[GeneratedImage]:
        """n images per prompt, prompt-major, batched across prompts. Image k (0-based overall)
        uses seed `seed + k`; with `seeds` (one per prompt), image j of prompt i uses `seeds[i] + j`."""
        prompts = check_texts(prompts)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        options = self.options(options, **option_values)
        starts = list(seeds) if seeds is not None else [seed + i * n for i in range(len(prompts))]
        for message in self.check_prompts(sorted(set(prompts)), strict=strict):  # named once, up front
            warnings.warn(message, stacklevel=2)
        jobs = ((p, s + j) for p, s in zip(prompts, starts) for j in range(n))
        return list(self.stream(jobs, batch_size, options, progress))

    def stream(self, jobs: Iterable[tuple[str, int]], batch_size: int = 64, options: GenerateOptions | None = None,
               progress: Callable[[int], None] | None = None) -> Iterator[GeneratedImage]:
        """Images for (prompt, seed) jobs as they are made, `batch_size` at a time; the jobs are read
        lazily, so a million of them cost no memory up front. Prompts already checked."""
        return stream_images(lambda prompts, seeds: self.render(prompts, seeds, options), jobs, batch_size, progress)

    def __call__(self, prompts: Sequence[str] | str, n: int = 1, seed: int = 0, **options) -> list[Image.Image]:
        """Generate `n` images per prompt; the same seed gives the same images."""
        return [g.image for g in self.generate(prompts, n=n, seed=seed, **options)]
