"""Text-conditional latent diffusion with classifier-free guidance.

- Denoiser: a compact UNet of our own over (C, 16, 16) latents: residual blocks with the
  timestep (and pooled sentence vector) added, self-attention and cross-attention to the
  text encoder's per-token features at every level (as in Rombach et al. 2022,
  https://arxiv.org/abs/2112.10752). We chose it over diffusers' `UNet2DConditionModel`
  because, at the same width, ours does one cross-attention per level and nothing else,
  and speed on a 2-core CPU is the constraint (measured in benchmarks/generator.py and benchmarks/diffusion_grid.py).
- Process: diffusers' noise schedules and samplers (DDPM, DDIM, DPM-Solver++), epsilon
  prediction, cosine ("squaredcos_cap_v2") betas.
- Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598): the text
  is replaced by a learned null sequence for `p_uncond` of training samples; at sampling,
  eps = eps_uncond + w * (eps_cond - eps_uncond), where the unconditional branch may be
  conditioned on a negative prompt instead.
- The first stage is `xmodal.models.autoencoder.Autoencoder`, frozen, stored inside this
  model's folder so the folder is self-contained.
- Optional layout stage (`layout` set; `xmodal.models.layout`): boxes drawn from the text,
  painted as a map at 16 latent pixels and concatenated to the UNet's input, as GLIGEN grounds
  a diffusion model on boxes (https://arxiv.org/abs/2301.07093; GLIGEN uses gated attention
  to box tokens, we use the map). Condition dropout drops the map with the text.
The network (`UNet`) is apart from the process (`LatentDiffusion.loss` / `generate`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.models.autoencoder import Autoencoder, AutoencoderConfig
from xmodal.models.base import LAYOUT, SAMPLER_OPTIONS, in_cpu_chunks
from xmodal.models.generation import TextToImageModel
from xmodal.models.image_encoders import Upsample2x
from xmodal.models.layout import LayoutConfig
from xmodal.models.registry import register_model
from xmodal.models.text_encoders import TextEncoderConfig

SAMPLERS = ("ddpm", "ddim", "dpm")


@dataclass
class DiffusionConfig:
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig("learned", 128))
    autoencoder: AutoencoderConfig | None = None  # the first stage's (required; a trained one is a part)
    image_preset: str = "shapes64"  # preprocessing of the training images (xmodal.data.images.make_transform)
    latent_scale: float = 1.0  # latents are divided by their std so that they have unit variance
    channels: tuple[int, ...] = (32, 64)  # UNet width at 16 and 8 latent pixels
    heads: int = 4
    p_uncond: float = 0.1  # condition dropout for classifier-free guidance
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # sampling defaults
    sampler: str = "dpm"
    steps: int = 10
    guidance: float = 3.0
    layout: LayoutConfig | None = None  # None: no layout stage


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, cin), nn.GroupNorm(8, cout)
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.emb = nn.Linear(emb_dim, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):  # x (B, C, H, W), emb (B, E)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[..., None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions, then cross-attention to text tokens."""

    def __init__(self, channels: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.GroupNorm(8, channels), nn.GroupNorm(8, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(text_dim, 2 * channels)
        self.out1, self.out2 = nn.Linear(channels, channels), nn.Linear(channels, channels)

    def _split(self, x):  # (B, L, C) -> (B, heads, L, C/heads)
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x, tokens, mask):  # x (B, C, H, W), tokens (B, T, D), mask (B, T) True = real
        b, c, h, w = x.shape
        seq = self.norm1(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        att = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))  # (B, h, HW, C/h)
        x = x + self.out1(att.transpose(1, 2).reshape(b, h * w, c)).transpose(1, 2).view(b, c, h, w)
        seq = self.norm2(x).flatten(2).transpose(1, 2)
        k, v = self.kv(tokens).chunk(2, dim=-1)  # (B, T, C)
        att = F.scaled_dot_product_attention(self._split(self.q(seq)), self._split(k), self._split(v),
                                             attn_mask=mask[:, None, None, :])  # (B, h, HW, C/h)
        return x + self.out2(att.transpose(1, 2).reshape(b, h * w, c)).transpose(1, 2).view(b, c, h, w)


class UNet(nn.Module):
    """(B, C, 16, 16) noisy latents, timesteps, text -> predicted noise. Two levels: 16 and 8 px."""

    def __init__(self, latent_channels: int, channels: tuple[int, ...], text_dim: int, heads: int,
                 map_channels: int = 0):
        super().__init__()
        c1, c2 = channels
        emb = 4 * c1
        self.time_mlp = nn.Sequential(nn.Linear(c1, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_to_emb = nn.Linear(text_dim, emb)
        self.conv_in = nn.Conv2d(latent_channels + map_channels, c1, 3, 1, 1)
        self.down1, self.att1 = ResBlock(c1, c1, emb), AttentionBlock(c1, text_dim, heads)  # 16 px
        self.downsample = nn.Conv2d(c1, c1, 3, 2, 1)
        self.down2, self.att2 = ResBlock(c1, c2, emb), AttentionBlock(c2, text_dim, heads)  # 8 px
        self.mid, self.att_mid = ResBlock(c2, c2, emb), AttentionBlock(c2, text_dim, heads)
        self.up2, self.att_up2 = ResBlock(2 * c2, c2, emb), AttentionBlock(c2, text_dim, heads)
        self.upsample = nn.Sequential(Upsample2x(), nn.Conv2d(c2, c1, 3, 1, 1))
        self.up1, self.att_up1 = ResBlock(2 * c1, c1, emb), AttentionBlock(c1, text_dim, heads)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, latent_channels, 3, 1, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.c1 = c1

    def forward(self, x, t, tokens, mask, pooled, layout_map=None):  # layout_map (B, M, 16, 16) or None
        emb = self.time_mlp(timestep_embedding(t, self.c1)) + self.text_to_emb(pooled)  # (B, E)
        if layout_map is not None:
            x = torch.cat([x, layout_map.to(x.dtype)], 1)
        h1 = self.att1(self.down1(self.conv_in(x), emb), tokens, mask)  # (B, c1, 16, 16)
        h2 = self.att2(self.down2(self.downsample(h1), emb), tokens, mask)  # (B, c2, 8, 8)
        h = self.att_mid(self.mid(h2, emb), tokens, mask)
        h = self.att_up2(self.up2(torch.cat([h, h2], 1), emb), tokens, mask)  # (B, c2, 8, 8)
        h = self.att_up1(self.up1(torch.cat([self.upsample(h), h1], 1), emb), tokens, mask)  # (B, c1, 16, 16)
        return self.conv_out(F.silu(self.norm_out(h)))


def make_scheduler(name: str, config: DiffusionConfig):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = {"num_train_timesteps": config.train_timesteps, "beta_schedule": config.beta_schedule,
              "prediction_type": "epsilon"}
    # The cosine schedule ends at alpha_bar ~ 0: an x0 estimate from epsilon at t = 999 divides by
    # ~0 and turns samples into speckles. So no sampler starts there: all use "leading" spacing
    # (first step 1000 - 1000/steps), and DPM-Solver also clips lambda_min as diffusers advises
    # for squaredcos_cap_v2.
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False, timestep_spacing="leading")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    if name == "dpm":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           lambda_min_clipped=-5.1, timestep_spacing="leading")
    raise ValueError(f"unknown sampler {name!r}; valid: {SAMPLERS}")


@functools.lru_cache(maxsize=32)
def max_steps(name: str, train_timesteps: int, beta_schedule: str) -> int:
    """The most sampler steps that give distinct timesteps: DPM-Solver's clipped lambda_min leaves
    fewer usable timesteps than training had (995 of 1000 for the cosine schedule)."""
    config = DiffusionConfig(train_timesteps=train_timesteps, beta_schedule=beta_schedule)

    def distinct(steps: int) -> bool:
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(steps)
        t = scheduler.timesteps
        return len(t) == steps and bool((t[1:] < t[:-1]).all())

    low, high = 1, train_timesteps  # distinct(low) holds; find the largest steps that does
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if distinct(mid) else (low, mid - 1)
    return low


@register_model("latent-diffusion")
class LatentDiffusion(TextToImageModel):
    config_class = DiffusionConfig
    capabilities = frozenset({LAYOUT, SAMPLER_OPTIONS})
    parts = ("text_encoder", "autoencoder")

    def __init__(self, config: DiffusionConfig, text_encoder: nn.Module | None = None,
                 autoencoder: Autoencoder | None = None):
        super().__init__(config, text_encoder)
        if autoencoder is None:
            if config.autoencoder is None:
                raise ValueError("latent-diffusion needs its first stage: autoencoder=<a trained Autoencoder> "
                                 "(or its config, when loading a folder)")
            autoencoder = Autoencoder(config.autoencoder)
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        d = self.text_encoder.out_dim
        m = self.layout.config.channels if self.layout is not None else 0
        self.unet = UNet(self.autoencoder.config.latent_channels, tuple(config.channels), d, config.heads, m)
        self.null_tokens = nn.Parameter(torch.zeros(1, 1, d))  # the "no text" condition
        self.null_pooled = nn.Parameter(torch.zeros(1, d))

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen first stage
        return self

    @functools.cached_property
    def _train_scheduler(self):  # made when first trained: sampling a distilled student needs no diffusers
        return make_scheduler("ddpm", self.config)

    def condition(self, texts, strict: bool = False):
        tokens, mask, pooled = self.encode_text(texts, strict=strict)
        return tokens, mask.bool(), pooled

    def _null(self, b: int, t: int):
        tokens = torch.cat([self.null_tokens.expand(b, 1, -1), self.null_tokens.new_zeros(b, t - 1, self.null_tokens.size(-1))], 1)
        mask = torch.zeros(b, t, dtype=torch.bool, device=tokens.device)
        mask[:, 0] = True
        return tokens, mask, self.null_pooled.expand(b, -1)

    def loss(self, batch):
        images = batch["images"]
        b = images.size(0)
        with torch.no_grad():
            latents = self.autoencoder.encode(images) / self.config.latent_scale  # (B, C, 16, 16)
        tokens, mask, pooled = self.condition(batch["texts"])
        layout_map, layout_nll = None, None
        if self.layout is not None:
            (layout_map,), layout_nll = self.layout_maps(tokens, mask, (16,), batch=batch)
        drop = torch.rand(b, device=images.device) < self.config.p_uncond
        null_tokens, null_mask, null_pooled = self._null(b, tokens.size(1))
        tokens = torch.where(drop[:, None, None], null_tokens, tokens)
        mask = torch.where(drop[:, None], null_mask, mask)
        pooled = torch.where(drop[:, None], null_pooled, pooled)
        if layout_map is not None:
            layout_map = layout_map * (~drop)[:, None, None, None]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.config.train_timesteps, (b,), device=images.device)
        noisy = self._train_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, tokens, mask, pooled, layout_map)
        loss = F.mse_loss(pred.float(), noise)
        if layout_nll is None:
            return loss, {"mse": loss.detach()}
        return loss + self.layout.config.weight * layout_nll, {"mse": loss.detach(), "layout_nll": layout_nll.detach()}

    @classmethod
    def config_from_parts(cls, parts: dict) -> dict:
        values = super().config_from_parts(parts)
        if "autoencoder" in parts:
            values["autoencoder"] = parts["autoencoder"].config
        return values

    def check_options(self, steps: int | None = None, guidance: float | None = None,
                      sampler: str | None = None, negative: str | None = None) -> tuple[int, float, str]:
        """(steps, guidance, sampler) with the model's defaults filled in; a ValueError names a bad one."""
        c = self.config
        steps = c.steps if steps is None else steps
        guidance = c.guidance if guidance is None else guidance
        sampler = sampler or c.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
        most = max_steps(sampler, c.train_timesteps, c.beta_schedule)
        if not 1 <= steps <= most:
            raise ValueError(f"steps must be in 1..{most} for the {sampler} sampler, got {steps}")
        if not (guidance >= 0 and math.isfinite(guidance)):
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        return steps, guidance, sampler

    def work(self, steps: int | None = None, guidance: float | None = None, **_) -> int:
        """UNet evaluations per image: steps, twice with classifier-free guidance."""
        steps = self.config.steps if steps is None else steps
        guidance = self.config.guidance if guidance is None else guidance
        return steps * (1 if guidance == 1.0 else 2)

    @torch.no_grad()
    def generate(self, texts, seeds, steps: int | None = None, guidance: float | None = None,
                 sampler: str | None = None, negative: str | None = None, strict: bool = False):
        latents, _ = self.denoise(texts, seeds, steps, guidance, sampler, negative, strict)
        return self.picture(latents)

    def picture(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents (unscaled) -> pictures (B, 3, 64, 64) in [-1, 1], through the first stage."""
        return in_cpu_chunks(self.autoencoder.decode, latents * self.config.latent_scale).clamp(-1, 1)

    @torch.no_grad()
    def denoise(self, texts, seeds, steps: int | None = None, guidance: float | None = None,
                sampler: str | None = None, negative: str | None = None, strict: bool = False,
                record: Sequence[int] = ()) -> tuple[torch.Tensor, dict]:
        """The sampled latents (B, C, 16, 16), unscaled, and what a student needs to learn this
        sampling (`xmodal.models.distilled`): with `record`, "states" (B, len(record), C, 16, 16),
        the latents after each recorded number of steps (0: the starting noise, `steps`: the
        result), and "layout_map", the drawn layout (or None)."""
        c = self.config
        steps, guidance, sampler = self.check_options(steps, guidance, sampler)
        if any(not 0 <= i <= steps for i in record):
            raise ValueError(f"record: step counts must be in 0..{steps}, got {list(record)}")
        scheduler = make_scheduler(sampler, c)
        scheduler.set_timesteps(steps)
        b = len(texts)
        device = self.null_pooled.device
        tokens, mask, pooled = self.condition(texts, strict=strict)
        layout_map = un_map = None
        if self.layout is not None:
            (layout_map,), _ = self.layout_maps(tokens, mask, (16,), seeds=seeds, texts=texts)
            un_map = torch.zeros_like(layout_map)
        if negative:
            neg = self.condition([negative] * b, strict=strict)
            t_max = max(tokens.size(1), neg[0].size(1))
            un_tokens, un_mask = _pad(neg[0], t_max), _pad(neg[1], t_max)
            tokens, mask, un_pooled = _pad(tokens, t_max), _pad(mask, t_max), neg[2]
        else:
            un_tokens, un_mask, un_pooled = self._null(b, tokens.size(1))
        ae = self.autoencoder.config
        latents = self.noise(seeds, (ae.latent_channels, 16, 16), device) * scheduler.init_noise_sigma
        generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]  # per-image sampler noise
        both_tokens, both_mask = torch.cat([tokens, un_tokens]), torch.cat([mask, un_mask])
        both_pooled = torch.cat([pooled, un_pooled])
        both_map = torch.cat([layout_map, un_map]) if layout_map is not None else None
        states = {0: latents} if 0 in record else {}
        for i, t in enumerate(scheduler.timesteps, start=1):
            x = scheduler.scale_model_input(latents, t)
            if guidance == 1.0:
                eps = self.unet(x, t.expand(b).to(device), tokens, mask, pooled, layout_map)
            else:
                eps_c, eps_u = self.unet(torch.cat([x, x]), t.expand(2 * b).to(device), both_tokens, both_mask,
                                         both_pooled, both_map).float().chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, generator=generators).prev_sample
            if i in record:
                states[i] = latents
        recorded = torch.stack([states[i] for i in record], 1) if record else None
        return latents, {"states": recorded, "layout_map": layout_map}


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.size(1) == length:
        return x
    pad = x.new_zeros(x.size(0), length - x.size(1), *x.shape[2:])
    return torch.cat([x, pad], dim=1)
