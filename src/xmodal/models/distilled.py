"""A few-step student of a latent-diffusion teacher: guidance and sampler distilled together.

The teacher (`LatentDiffusion`) draws with DPM-Solver++ in `steps` steps and classifier-free
guidance: two UNet passes per step (20 for the bundled `shapes-diffusion`). The student is
the same network, initialized from the teacher, that goes from the same starting noise to
the same picture in K deterministic DDIM jumps (`student_timesteps`, e.g. 900 -> 450 ->
clean), one conditional pass each, guidance built in.

It learns from the teacher's own sampling trajectories (`LatentDiffusion.denoise(record=...)`),
recorded once for the training prompts: for a trajectory's latents x_a at timestep a and
x_b at the next student timestep b, the student's noise estimate eps(x_a, a, text) is taken
through one DDIM jump,

    x0 = (x_a - sigma_a eps) / alpha_a,    x_b' = alpha_b x0 + sigma_b eps,

and the loss is |x_b' - x_b|^2. This is the target of progressive distillation (Salimans &
Ho 2022, https://arxiv.org/abs/2202.00512) with the guided teacher of guidance distillation
(Meng et al. 2023, https://arxiv.org/abs/2210.03142), taken from whole recorded trajectories
in one stage instead of halving the steps round by round, as knowledge distillation of the
sampler does (Luhman & Luhman 2021, https://arxiv.org/abs/2101.02388). Only the UNet trains;
the text encoder, the layout stage and the autoencoder are the teacher's, frozen.

Sampling needs no diffusers: the cosine schedule's alphas are computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.models.base import DRAW, LAYOUT, SAMPLER_OPTIONS
from xmodal.models.diffusion import DiffusionConfig, LatentDiffusion, make_scheduler
from xmodal.models.registry import register_model

CLEAN = -1  # the timestep of a finished picture


@dataclass
class DistilledConfig(DiffusionConfig):
    # One UNet pass at each, then a DDIM jump to the next (or to the picture); on the teacher's
    # sampling grid (10 DPM-Solver++ steps: 900, 810, ..., 90)
    student_timesteps: tuple[int, ...] = (900, 450)
    # For the record (sampling needs neither): the teacher's name or folder and its steps; the
    # inherited `steps`, `guidance` and `sampler` keep the teacher's values too
    teacher: str = ""
    teacher_steps: int = 10


def alphas_cumprod(train_timesteps: int, beta_schedule: str) -> torch.Tensor:
    """alpha-bar per training timestep, as diffusers' schedulers compute it (float32)."""
    if beta_schedule != "squaredcos_cap_v2":
        return make_scheduler("ddim", DiffusionConfig(train_timesteps=train_timesteps,
                                                      beta_schedule=beta_schedule)).alphas_cumprod.float()

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / train_timesteps) / alpha_bar(i / train_timesteps), 0.999)
                          for i in range(train_timesteps)], dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


@register_model("distilled-diffusion")
class DistilledDiffusion(LatentDiffusion):
    config_class = DistilledConfig
    capabilities = frozenset({LAYOUT, SAMPLER_OPTIONS, DRAW})

    def __init__(self, config: DistilledConfig, text_encoder=None, autoencoder=None):
        super().__init__(config, text_encoder, autoencoder)
        times = list(config.student_timesteps)
        if not times or any(not 0 <= t < config.train_timesteps for t in times) or times != sorted(set(times))[::-1]:
            raise ValueError(f"student_timesteps must be distinct, decreasing and in 0..{config.train_timesteps - 1}, "
                             f"got {times}")
        bar = torch.cat([alphas_cumprod(config.train_timesteps, config.beta_schedule), torch.ones(1)])  # [CLEAN] = 1
        self.register_buffer("_alpha_bar", bar, persistent=False)
        self.times = [*times, CLEAN]

    def _jump(self, x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """One DDIM jump from timestep a to b (CLEAN: the picture), per row."""
        bar_a, bar_b = (self._alpha_bar[t].view(-1, 1, 1, 1) for t in (a, b))
        x0 = (x - (1 - bar_a).sqrt() * eps) / bar_a.sqrt()
        return bar_b.sqrt() * x0 + (1 - bar_b).sqrt() * eps

    def loss(self, batch):
        """batch: "texts", "states" (B, K + 1, C, 16, 16), the teacher's latents at each student
        timestep and its result, and "layout_map" (B, M, 16, 16) or None: one jump per row, from a
        random student timestep to the next."""
        states, texts = batch["states"], batch["texts"]
        b, k = states.size(0), len(self.times) - 1
        if states.size(1) != k + 1:
            raise ValueError(f"states hold {states.size(1)} latents per trajectory; this student needs {k + 1}")
        step = torch.randint(0, k, (b,))
        rows = torch.arange(b)
        x_a, x_b = states[rows, step], states[rows, step + 1]
        times = torch.tensor(self.times, device=states.device)
        a, target_b = times[step.to(states.device)], times[(step + 1).to(states.device)]
        with torch.no_grad():
            tokens, mask, pooled = self.condition(texts)
        eps = self.unet(x_a, a, tokens, mask, pooled, batch["layout_map"]).float()
        mse = F.mse_loss(self._jump(x_a, eps, a, target_b), x_b)
        return mse, {"mse": mse.detach()}

    def check_options(self, steps: int | None = None, guidance: float | None = None,
                      sampler: str | None = None, negative: str | None = None) -> tuple[int, float, str]:
        k = len(self.times) - 1
        if steps not in (None, k) or guidance is not None or sampler not in (None, "distilled") or negative:
            teacher = f" (its teacher {self.config.teacher} takes them)" if self.config.teacher else ""
            raise ValueError(f"this model is distilled to {k} steps with guidance {self.config.guidance:g} built in: "
                             f"steps, guidance, sampler and negative prompts do not apply{teacher}")
        return k, self.config.guidance, "distilled"

    def work(self, **_) -> int:
        return len(self.times) - 1

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        return (self.autoencoder.config.latent_channels, 16, 16)

    @torch.no_grad()
    def generate(self, texts, seeds, steps: int | None = None, guidance: float | None = None,
                 sampler: str | None = None, negative: str | None = None, strict: bool = False):
        self.check_options(steps, guidance, sampler, negative)
        return self.generate_by_draw(texts, seeds, strict=strict)

    def draw(self, noise, tokens, mask, pooled, layout=None) -> torch.Tensor:
        """Starting noise (B, C, 16, 16), the text and a sampled layout (or None) -> pictures: a
        UNet pass and a DDIM jump per student timestep, then the autoencoder's decoder."""
        layout_map = self.paint_layout(layout, (16,))[0] if layout is not None else None
        x = noise
        row = torch.zeros_like(x[:, 0, 0, 0], dtype=torch.long)  # (B,): its batch size stays a variable when traced
        for a, t in zip(self.times, self.times[1:]):
            a, t = row + a, row + t
            x = self._jump(x, self.unet(x, a, tokens, mask, pooled, layout_map).float(), a, t)
        return self.picture(x)
