"""A small convolutional autoencoder: 64 px images <-> (C, 16, 16) latents, for latent diffusion.

As in Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models",
https://arxiv.org/abs/2112.10752): a first stage that compresses pixels 4x per side with a
light KL penalty so that the latent space stays smooth; the diffusion model then works on
16 x 16 latents, 16x fewer positions than pixels, which is what makes it fast on a CPU.
Differences: no perceptual or adversarial loss (flat-coloured images need none) and a narrow
network. As Stable Diffusion's released autoencoders did, a second stage may train the decoder
alone (`train_encoder = false`, starting from a trained autoencoder): the latent space stays
exactly the same, so a diffusion model trained on it needs no retraining, while the decoder gets
more steps, an L1 term for sharper edges (`l1_weight`) and, if wanted, more width
(`decoder_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xmodal.models.hub import PretrainedModel
from xmodal.models.image_encoders import Upsample2x
from xmodal.models.registry import register_model


@dataclass
class AutoencoderConfig:
    latent_channels: int = 4
    image_preset: str = "shapes64"  # preprocessing of the training images (xmodal.data.images.make_transform)
    channels: tuple[int, ...] = (16, 32, 64)  # at 64, 32, 16 px
    kl_weight: float = 1e-6
    decoder_channels: tuple[int, ...] | None = None  # at 16, 32, 64 px; None = channels reversed
    decoder_depth: int = 1  # convolutions at 64 px before the output
    l1_weight: float = 0.0  # loss = mse + l1_weight * |x - x'| + kl_weight * kl
    train_encoder: bool = True  # false: the encoder is frozen (a decoder-only second stage)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 4, 2, 1) if stride == 2 else nn.Conv2d(cin, cout, 3, 1, 1)
    return nn.Sequential(conv, nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU())


@register_model("autoencoder")
class Autoencoder(PretrainedModel):
    config_class = AutoencoderConfig
    task = "image-autoencoder"

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config)
        _, c2, c3 = config.channels
        self.encoder = nn.Sequential(
            _conv(3, c2, stride=2), _conv(c2, c2),  # 32 px
            _conv(c2, c3, stride=2), _conv(c3, c3),  # 16 px
            nn.Conv2d(c3, 2 * config.latent_channels, 1),  # mean and log-variance
        )
        d16, d32, d64 = config.decoder_channels or tuple(reversed(config.channels))
        self.decoder = nn.Sequential(
            _conv(config.latent_channels, d16), _conv(d16, d16),  # 16 px
            Upsample2x(), _conv(d16, d32), _conv(d32, d32),  # 32 px
            Upsample2x(), _conv(d32, d64),  # 64 px
            *(_conv(d64, d64) for _ in range(config.decoder_depth - 1)),
            nn.Conv2d(d64, 3, 3, 1, 1), nn.Tanh(),
        )
        if not config.train_encoder:
            self.encoder.requires_grad_(False)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        mean, logvar = self.encoder(images).chunk(2, dim=1)  # (B, C, 16, 16) each
        if sample:
            return mean + torch.randn_like(mean) * (0.5 * logvar.clamp(-30, 20)).exp()
        return mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)  # (B, 3, 64, 64) in [-1, 1]

    def loss(self, batch):
        images = batch["images"]
        with torch.set_grad_enabled(self.config.train_encoder and torch.is_grad_enabled()):
            mean, logvar = self.encoder(images).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        error = self.decode(z).float() - images
        mse, l1 = (error ** 2).mean(), error.abs().mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = mse + self.config.l1_weight * l1
        if self.config.train_encoder:
            loss = loss + self.config.kl_weight * kl
        return loss, {"mse": mse.detach(), "l1": l1.detach(), "kl": kl.detach()}
