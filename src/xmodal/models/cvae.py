"""A conditional VAE for text -> image (Sohn et al. 2015, "Learning Structured Output
Representation using Deep Conditional Generative Models").

The classic three parts: a recognition network q(z | x, c), a conditional prior
p(z | c), and a decoder p(x | z, c), with c the text encoder's sentence vector.
Loss: Gaussian reconstruction with a fixed sigma (`recon_sigma`, smaller = sharper)
plus KL(q || p), per pixel. Generation samples z from the prior and decodes its mean.
Differences from the paper: convolutional networks for 32 or 64 px, the sentence vector also
modulates every decoder stage (FiLM), and a KL warm-up. With `cond_noise` > 0 the sentence
vector is scaled to unit length and, in training, jittered by Gaussian noise of that std (a
fixed-variance form of StackGAN's conditioning augmentation, Zhang et al. 2017,
https://arxiv.org/abs/1612.03242): the decoder then sees a neighbourhood of each training
caption, not a point, so prompts a pretrained text encoder places near them draw alike.
`image_channels = 1` draws grayscale (returned in 3 equal channels). With `layout` set, a layout stage
(`xmodal.models.layout`) first draws the objects' boxes from the text and every decoder
stage also reads the layout map (concatenated after upsampling, as SPADE feeds its
semantic map to every stage: Park et al. 2019, https://arxiv.org/abs/1903.07291).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xmodal.models.generation import TextToImageModel, stage_sizes
from xmodal.models.image_encoders import upsample2x
from xmodal.models.layout import LayoutConfig, conv_over_map
from xmodal.models.registry import register_model
from xmodal.models.text_encoders import TextEncoderConfig


@dataclass
class CVAEConfig:
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig("learned", 128))
    image_size: int = 64  # 32 or 64
    image_preset: str = "shapes64"  # preprocessing of the training images (xmodal.data.images.make_transform)
    image_channels: int = 3  # 1: grayscale
    z_dim: int = 32
    # decoder channels at 4, 8, ..., image_size px (the encoder mirrors them); halving per stage
    # keeps every stage equally cheap, which is what makes it fast on a CPU
    channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    cond_noise: float = 0.0  # > 0: unit-length sentence vector, jittered by noise of this std in training
    temperature: float = 1.0  # generation: z drawn with the prior's std times this (< 1: likelier, less varied)
    recon_sigma: float = 0.1  # std of the Gaussian likelihood, in [-1, 1] pixel units
    kl_warmup_steps: int = 500
    layout: LayoutConfig | None = None  # None: no layout stage


class FiLM(nn.Module):
    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.to_scale_shift = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x, cond):  # x (B, C, H, W), cond (B, E)
        scale, shift = self.to_scale_shift(cond)[..., None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class UpStage(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, map_channels: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin + map_channels, cout, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, cout // 4), cout)
        self.film = FiLM(cond_dim, cout)

    def forward(self, x, cond, layout_map=None):  # layout_map (B, M, 2H, 2W), its BoxPlanes, or None
        x = upsample2x(x)
        x = self.conv(x) if layout_map is None else conv_over_map(self.conv, x, layout_map)
        return nn.functional.silu(self.film(self.norm(x), cond))


@register_model("cvae")
class ConditionalVAE(TextToImageModel):
    config_class = CVAEConfig

    def __init__(self, config: CVAEConfig, text_encoder: nn.Module | None = None):
        super().__init__(config, text_encoder)
        c, e = config, self.text_encoder.out_dim
        sizes = stage_sizes("the cvae", c.image_size, c.image_channels, c.channels)
        if config.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: the prior's mean), got {config.temperature}")
        self.map_sizes = tuple(sizes[1:])  # where the decoder stages read the layout map
        chans = list(c.channels)
        layers, cin = [], 3
        for ch in chans[::-1][1:]:  # image_size -> ... -> 4 px
            layers += [nn.Conv2d(cin, ch, 4, 2, 1), nn.GroupNorm(min(8, ch // 4), ch), nn.SiLU()]
            cin = ch
        self.encoder = nn.Sequential(*layers, nn.Flatten())  # (B, C0*4*4)
        self.posterior = nn.Sequential(nn.Linear(chans[0] * 16 + e, 512), nn.SiLU(), nn.Linear(512, 2 * c.z_dim))
        self.prior = nn.Sequential(nn.Linear(e, 256), nn.SiLU(), nn.Linear(256, 2 * c.z_dim))
        self.from_latent = nn.Linear(c.z_dim + e, chans[0] * 16)
        m = self.layout.config.channels if self.layout is not None else 0
        self.up = nn.ModuleList(UpStage(a, b, e, m) for a, b in zip(chans[:-1], chans[1:]))
        self.to_rgb = nn.Conv2d(chans[-1], c.image_channels, 3, padding=1)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimizer steps done, for the KL warm-up

    def decode(self, z, cond, maps=None):
        x = self.from_latent(torch.cat([z, cond], dim=-1)).view(z.size(0), -1, 4, 4)  # (B, C0, 4, 4)
        for i, stage in enumerate(self.up):
            x = stage(x, cond, maps[i] if maps is not None else None)  # 8, 16, ... px
        return torch.tanh(self.to_rgb(x)).expand(-1, 3, -1, -1)  # (B, 3, S, S); grayscale in 3 equal channels

    def condition(self, texts, strict: bool = False):
        """Text encoder outputs, the sentence vector unit-length (and jittered in training) with `cond_noise`."""
        tokens, mask, cond = self.encode_text(texts, strict=strict)  # (B, T, E), (B, T), (B, E)
        if self.config.cond_noise > 0:
            cond = nn.functional.normalize(cond.float(), dim=-1)
            if self.training:
                cond = cond + self.config.cond_noise * torch.randn_like(cond)
        return tokens, mask, cond

    def loss(self, batch):
        images = batch["images"]
        if self.config.image_channels == 1:
            images = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        tokens, mask, cond = self.condition(batch["texts"])
        maps, layout_nll = self.layout_maps(tokens, mask, self.map_sizes, batch=batch)
        mu_q, logvar_q = self.posterior(torch.cat([self.encoder(images), cond], -1)).chunk(2, dim=-1)
        mu_p, logvar_p = self.prior(cond).chunk(2, dim=-1)
        z = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp()
        recon = self.decode(z, cond, maps)
        pixels = images[0].numel()
        nll = ((recon.float() - images) ** 2).sum(dim=(1, 2, 3)) / (2 * self.config.recon_sigma ** 2)
        kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)
        warm = min(1.0, (self.step.item() + 1) / max(self.config.kl_warmup_steps, 1))
        loss = (nll + warm * kl.float()).mean() / pixels
        logs = {"nll": nll.mean().detach() / pixels, "kl": kl.mean().detach()}
        if layout_nll is not None:
            loss = loss + self.layout.config.weight * layout_nll
            logs["layout_nll"] = layout_nll.detach()
        return loss, logs

    def on_train_step(self, step: int) -> None:
        self.step.fill_(step)

    @torch.no_grad()
    def generate(self, texts, seeds, strict: bool = False):
        tokens, mask, cond = self.condition(texts, strict=strict)
        layout = self.sample_layout(tokens, mask, seeds, words=self.layout_words(texts)) if self.layout is not None else None
        mu_p, logvar_p = self.prior(cond).chunk(2, dim=-1)
        eps = self.noise(seeds, (self.config.z_dim,), cond.device)
        z = mu_p + self.config.temperature * eps * (0.5 * logvar_p).exp()
        return self.in_drawing_chunks(lambda rows, maps: self.decode(z[rows], cond[rows], maps), len(z), z.device, layout)
