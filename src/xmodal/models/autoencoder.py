"""A small convolutional autoencoder: 64 px images <-> (C, 16, 16) latents, for latent diffusion.

As in Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models",
https://arxiv.org/abs/2112.10752): a first stage that compresses pixels 4x per side with a
light KL penalty so that the latent space stays smooth; the diffusion model then works on
16 x 16 latents, 16x fewer positions than pixels, which is what makes it fast on a CPU.
Differences: no perceptual or adversarial loss (flat-coloured images reconstruct well
with L2 alone) and a narrow network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xmodal.models.hub import PretrainedModel
from xmodal.models.registry import register_model


@dataclass
class AutoencoderConfig:
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64)  # at 64, 32, 16 px
    kl_weight: float = 1e-6


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 4, 2, 1) if stride == 2 else nn.Conv2d(cin, cout, 3, 1, 1)
    return nn.Sequential(conv, nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU())


@register_model("autoencoder")
class Autoencoder(PretrainedModel):
    config_class = AutoencoderConfig
    task = "image-autoencoder"

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config)
        c1, c2, c3 = config.channels
        self.encoder = nn.Sequential(
            _conv(3, c2, stride=2), _conv(c2, c2),  # 32 px
            _conv(c2, c3, stride=2), _conv(c3, c3),  # 16 px
            nn.Conv2d(c3, 2 * config.latent_channels, 1),  # mean and log-variance
        )
        self.decoder = nn.Sequential(
            _conv(config.latent_channels, c3), _conv(c3, c3),  # 16 px
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(c3, c2), _conv(c2, c2),  # 32 px
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(c2, c1),  # 64 px
            nn.Conv2d(c1, 3, 3, 1, 1), nn.Tanh(),
        )

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        mean, logvar = self.encoder(images).chunk(2, dim=1)  # (B, C, 16, 16) each
        if sample:
            return mean + torch.randn_like(mean) * (0.5 * logvar.clamp(-30, 20)).exp()
        return mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)  # (B, 3, 64, 64) in [-1, 1]

    def loss(self, batch):
        images = batch["images"]
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = self.decode(z)
        mse = ((recon.float() - images) ** 2).mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.exp() - 1 - logvar).mean()
        return mse + self.config.kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}
