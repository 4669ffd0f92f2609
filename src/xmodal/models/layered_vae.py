"""A conditional VAE whose decoder paints object layers (text -> image).

The classic conditional VAE (Sohn et al. 2015: recognition network q(z | x, c),
conditional prior p(z | c), decoder p(x | z, c)) with an object-centric decoder in the
spirit of layered and spatial-broadcast decoders (LR-GAN, Yang et al. 2017; MONet,
Burgess et al. 2019; Watters et al. 2019):

- a *text reader* turns the encoder's tokens into K slot vectors, one per object the
  prompt names (learned queries attending over the tokens), each with a presence gate;
- each slot has a small latent z_k: a position (2 numbers) and free style dims;
- the decoder paints every slot as a layer: a mask MLP evaluated at every pixel on the
  coordinates *relative to the slot's position* (so a shape is learned once and drawn
  anywhere) and modulated by the slot vector, with one colour per slot, composited over
  a background whose gray level is a latent of its own;
- the recognition network finds each named object in the image (the slot vector attends
  over a CNN grid; the attention-weighted coordinates give the position);
- the prior is autoregressive over slots, p(z_1 | c) p(z_2 | z_1, c) ..., which is how a
  relation ("to the left of") becomes a distribution over where the second object goes.

What a shape, a colour, a size or a relation look like is all learned from the captions;
nothing about the world's geometry is written here. The structure only says "a picture
is objects on a background" -- it is what lets the model learn on a CPU in minutes and
compose colour-shape pairs it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from xmodal.models.generation import TextToImageModel
from xmodal.models.registry import register_model


@dataclass
class LayeredVAEConfig:
    text_encoder: dict = field(default_factory=lambda: {"kind": "learned", "dim": 128})
    image_size: int = 64
    slots: int = 2  # the most objects one picture holds
    width: int = 128  # slot vectors and the text reader
    mask_hidden: int = 64  # width of the per-pixel mask MLP
    window: int = 40  # side of each object's painting window, in canvas pixels at 64 px (scales with size):
    # wide enough that objects are in reach from the start, too small to stand in for the background
    window_samples: int = 32  # the mask MLP's grid over the window (interpolated between samples)
    style_dim: int = 2  # free latent dims per slot besides the position
    max_words: int = 32
    recon_sigma: float = 0.1  # std of the Gaussian likelihood, in [-1, 1] pixel units
    kl_warmup_steps: int = 500
    temperature: float = 1.0  # scales the prior's noise at generation (lower: more typical pictures)


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.SiLU(), nn.Linear(hidden, cout))


def _gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


class TextReader(nn.Module):
    """Tokens (B, T, E) and sentence vector (B, E) -> K slot vectors (B, K, W) and presence logits (B, K)."""

    def __init__(self, token_dim: int, width: int, slots: int, max_words: int):
        super().__init__()
        self.proj = nn.Linear(token_dim, width)
        self.sentence = nn.Linear(token_dim, width)
        self.position = nn.Parameter(torch.randn(max_words, width) * 0.02)  # word order, for every encoder
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        # distinct slot identities from the start: near-equal queries would read the same words
        self.queries = nn.Parameter(torch.randn(slots, width) * 0.5)
        self.attend = nn.MultiheadAttention(width, 4, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width), _mlp(width, width, width))
        self.presence = nn.Linear(2 * width, 1)

    def forward(self, tokens, mask, pooled):
        t = tokens.size(1)
        if t > self.position.size(0):
            raise ValueError(f"prompt of {t} tokens is longer than max_words={self.position.size(0)}")
        pad = ~mask.bool()
        x = self.layer(self.proj(tokens) + self.position[:t], src_key_padding_mask=pad)
        q = self.queries.expand(tokens.size(0), -1, -1)
        slots, _ = self.attend(q, x, x, key_padding_mask=pad)
        slots = slots + self.out(slots)
        sentence = self.sentence(pooled)[:, None].expand_as(slots)  # is there a k-th object, given the sentence
        return slots, self.presence(torch.cat([slots, sentence], dim=-1)).squeeze(-1)


class LayerPainter(nn.Module):
    """Slot vectors + latents -> image: each object's mask logits are computed in its own window
    (a fixed grid of coordinates relative to the object's centre, so a shape is learned once and
    drawn anywhere), moved to the object's position by bilinear resampling of the logits (sharp
    edges between samples), and the layers composited over the background."""

    def __init__(self, width: int, hidden: int, style_dim: int, size: int, window: float, samples: int):
        super().__init__()
        self.size, self.window, self.samples = size, window, samples
        # the window's coordinates run over [-2, 2]; `samples` x `samples` points
        axis = (torch.arange(samples) + 0.5 - samples / 2) / samples * 4
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).view(1, 1, samples * samples, 2)
        self.register_buffer("window_grid", grid, persistent=False)  # (1, 1, samples^2, 2) as (x, y)
        axis = (torch.arange(size) + 0.5) / size * 2 - 1
        canvas = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)  # (S, S, 2) in [-1, 1]
        self.register_buffer("canvas_grid", canvas, persistent=False)
        cond = width + style_dim
        self.coords = nn.Linear(2, hidden)
        self.film1 = nn.Linear(cond, 2 * hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.film2 = nn.Linear(cond, 2 * hidden)
        self.hidden2 = nn.Linear(hidden, hidden)  # three layers: a cross is a union of intersections
        self.to_mask = nn.Linear(hidden, 1)
        self.to_color = _mlp(cond, width, 3)
        self.background = nn.Linear(1, 3)  # a flat background: colour and how the latent moves it

    def forward(self, slots, presence_logits, z_slots, z_background):
        b, k, _ = slots.shape
        position, style = z_slots[..., :2], z_slots[..., 2:]
        cond = torch.cat([slots, style], dim=-1)  # (B, K, W + S)
        s1, t1 = self.film1(cond)[:, :, None].chunk(2, dim=-1)
        h = F.silu(self.coords(self.window_grid) * (1 + s1) + t1)  # (B, K, samples^2, H)
        s2, t2 = self.film2(cond)[:, :, None].chunk(2, dim=-1)
        h = F.silu(self.hidden(h) * (1 + s2) + t2)
        h = F.silu(self.hidden2(h))
        logits = self.to_mask(h).float().view(b * k, 1, self.samples, self.samples)
        # canvas pixel -> window coordinates in [-1, 1]: (p - centre) / (window half-width on the canvas)
        half = self.window / self.size
        where = (self.canvas_grid[None] - position.float().reshape(b * k, 1, 1, 2)) / half
        # outside the window nothing is painted: pad the logits with a large negative value
        logits = F.pad(logits, (1, 1, 1, 1), value=-20.0)
        where = where * self.samples / (self.samples + 2)  # the padded grid is 2 samples wider
        logits = F.grid_sample(logits, where, mode="bilinear", padding_mode="border", align_corners=False)
        alpha = torch.sigmoid(logits).view(b, k, -1) * torch.sigmoid(presence_logits.float())[..., None]
        color = torch.tanh(self.to_color(cond).float())  # (B, K, 3)
        image = torch.tanh(4 * self.background(z_background.float()))[:, :, None].expand(b, 3, self.size * self.size)
        for i in range(k):  # later slots are painted over earlier ones
            a = alpha[:, i][:, None]
            image = image * (1 - a) + color[:, i][:, :, None] * a
        return image.reshape(b, 3, self.size, self.size)


class ObjectFinder(nn.Module):
    """Recognition network: for each slot, where in the image is the object it names (and its style).

    The slots compete for image locations as in Slot Attention (Locatello et al. 2020): the
    attention is normalized over the slots at each location, then over locations per slot, so
    two slots cannot both explain the same object.
    """

    def __init__(self, width: int, style_dim: int):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(5, 32, 3, 2, 1), nn.SiLU(),  # 32 px
            nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),  # 16 px
            nn.Conv2d(64, width, 1), nn.SiLU(),
        )
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.slot_head = _mlp(2 * width + 2, width, 2 * (2 + style_dim))
        self.background_head = _mlp(width, width, 2)

    def forward(self, images, slots):
        b, _, h, w = images.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=images.device),
                                torch.linspace(-1, 1, w, device=images.device), indexing="ij")
        coords = torch.stack([xs, ys])[None].expand(b, -1, -1, -1)
        features = self.cnn(torch.cat([images, coords], dim=1))  # (B, W, 16, 16)
        grid_xy = F.interpolate(coords, size=features.shape[-2:], mode="bilinear", align_corners=True)
        features = self.norm(features.flatten(2).transpose(1, 2))  # (B, N, W)
        grid_xy = grid_xy.flatten(2).transpose(1, 2)  # (B, N, 2)
        logits = self.query(slots) @ self.key(features).transpose(1, 2) / features.size(-1) ** 0.5  # (B, K, N)
        weights = logits.softmax(dim=1) + 1e-8  # slots compete for each location
        weights = weights / weights.sum(dim=-1, keepdim=True)  # then a weighted mean over locations
        found = weights @ self.value(features)  # (B, K, W)
        where = weights @ grid_xy  # attention-weighted coordinates (B, K, 2)
        mu, logvar = self.slot_head(torch.cat([found, slots, where], dim=-1)).chunk(2, dim=-1)
        mu = torch.cat([mu[..., :2] + where, mu[..., 2:]], dim=-1)
        mu_bg, logvar_bg = self.background_head(features.mean(1)).chunk(2, dim=-1)
        return (mu, logvar), (mu_bg, logvar_bg)


class SlotPrior(nn.Module):
    """p(z_k | z_<k, c): a Gaussian per slot given its slot vector and the slots before it."""

    def __init__(self, width: int, z_dim: int):
        super().__init__()
        self.context = _mlp(width + z_dim, width, width)
        self.head = _mlp(2 * width, width, 2 * z_dim)

    def step(self, slot, context):
        mu, logvar = self.head(torch.cat([slot, context], dim=-1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-12, 4)

    def add(self, context, slot, z):
        return context + self.context(torch.cat([slot, z], dim=-1))


@register_model("layered-vae")
class LayeredVAE(TextToImageModel):
    config_class = LayeredVAEConfig

    def __init__(self, config: LayeredVAEConfig):
        super().__init__(config)
        c = config
        if not 32 <= c.image_size <= 256:
            raise ValueError(f"image_size must be in 32..256, got {c.image_size}")
        self.z_dim = 2 + c.style_dim
        self.reader = TextReader(self.text_encoder.out_dim, c.width, c.slots, c.max_words)
        self.finder = ObjectFinder(c.width, c.style_dim)
        self.prior = SlotPrior(c.width, self.z_dim)
        self.painter = LayerPainter(c.width, c.mask_hidden, c.style_dim, c.image_size,
                                    c.window * c.image_size / 64, c.window_samples)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # for the KL warm-up

    def read(self, texts, strict: bool = False):
        return self.reader(*self.encode_text(texts, strict=strict))

    def loss(self, batch):
        images = batch["images"]
        if self.training and self.step.item() == 0:  # data-dependent init: background = mean colour
            with torch.no_grad():
                mean = images.mean(dim=(0, 2, 3)).clamp(-0.95, 0.95)
                self.painter.background.bias.copy_(torch.atanh(mean) / 4)
        slots, presence = self.read(batch["texts"])
        (mu_q, logvar_q), (mu_bg, logvar_bg) = self.finder(images, slots)
        z = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp()  # (B, K, Z)
        z_bg = mu_bg + torch.randn_like(mu_bg) * (0.5 * logvar_bg).exp()
        kl = _gaussian_kl(mu_bg, logvar_bg, torch.zeros_like(mu_bg), torch.zeros_like(logvar_bg))
        context = torch.zeros_like(slots[:, 0])
        for k in range(slots.size(1)):
            mu_p, logvar_p = self.prior.step(slots[:, k], context)
            kl = kl + _gaussian_kl(mu_q[:, k], logvar_q[:, k], mu_p, logvar_p)
            context = self.prior.add(context, slots[:, k], z[:, k])
        recon = self.painter(slots, presence, z, z_bg)
        pixels = images[0].numel()
        nll = ((recon.float() - images) ** 2).sum(dim=(1, 2, 3)) / (2 * self.config.recon_sigma ** 2)
        warm = min(1.0, (self.step.item() + 1) / max(self.config.kl_warmup_steps, 1))
        if self.training:
            self.step += 1
        loss = (nll + warm * kl.float()).mean() / pixels
        return loss, {"nll": nll.mean().detach() / pixels, "kl": kl.mean().detach()}

    @torch.no_grad()
    def generate(self, texts, seeds, strict: bool = False, temperature: float | None = None):
        t = self.config.temperature if temperature is None else float(temperature)
        if not t >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        slots, presence = self.read(texts, strict=strict)
        b, k, _ = slots.shape
        eps = self.noise(seeds, (k + 1, self.z_dim), slots.device) * t  # image i depends only on seeds[i]
        context, zs = torch.zeros_like(slots[:, 0]), []
        for i in range(k):
            mu_p, logvar_p = self.prior.step(slots[:, i], context)
            zs.append(mu_p + eps[:, i] * (0.5 * logvar_p).exp())
            context = self.prior.add(context, slots[:, i], zs[-1])
        return self.painter(slots, presence, torch.stack(zs, dim=1), eps[:, k, :1])
