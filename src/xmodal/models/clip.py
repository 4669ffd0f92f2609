"""A CLIP-style dual encoder (Radford et al. 2021, https://arxiv.org/abs/2103.00020).

An image tower (one of `xmodal.models.image_encoders`, pooled) and a text tower (one of
`xmodal.models.text_encoders`, pooled), each followed by a linear projection to a shared
space of unit vectors; trained with the symmetric InfoNCE loss and a learnable
temperature (initialised at 1/0.07, clamped at 100, as in the paper). Differences: small
towers trained from scratch for CPU, and in-batch negatives only.

`encode_image` / `encode_text` give normalized embeddings (their dot product is the cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.models.image_encoders import create_image_encoder
from xmodal.models.registry import register_model
from xmodal.models.text_encoders import TextEncoderConfig
from xmodal.models.with_text import WithTextEncoder


@dataclass
class CLIPConfig:
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig("learned", 128))
    image_encoder: str = "factorized-cnn"
    encoder_width: int = 32
    encoder_dim: int = 128
    encoder_weights: str | None = None
    image_preset: str = "shapes64"
    embed_dim: int = 128
    text_lr_scale: float = 1.0  # the text tower's learning rate relative to the rest (a pretrained one: small)

    def __post_init__(self):
        if not 0 <= self.text_lr_scale <= 1:
            raise ValueError(f"text_lr_scale {self.text_lr_scale} is not in [0, 1]")


@register_model("clip")
class DualEncoder(WithTextEncoder):
    config_class = CLIPConfig
    task = "image-text-alignment"

    def __init__(self, config: CLIPConfig, text_encoder: nn.Module | None = None):
        super().__init__(config, text_encoder)  # the text tower
        c = config
        self.image_encoder = create_image_encoder(c.image_encoder, c.encoder_width, c.encoder_dim, c.encoder_weights)
        self.image_projection = nn.Linear(self.image_encoder.out_dim, c.embed_dim)
        self.text_projection = nn.Linear(self.text_encoder.out_dim, c.embed_dim)
        # attention pooling over grid cells (a mean would blur where things are)
        self.image_pool = nn.Linear(self.image_encoder.out_dim, 1)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def param_groups(self) -> list[dict]:
        text = list(self.text_encoder.parameters())
        ids = {id(p) for p in text}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": rest}, {"params": text, "lr_scale": self.config.text_lr_scale}]

    def config_for_saving(self) -> dict:
        import dataclasses

        return {**dataclasses.asdict(self.config), "encoder_weights": None}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.image_encoder.forward_features(images)  # (B, N, D)
        weights = self.image_pool(grid).softmax(dim=1)  # (B, N, 1)
        return F.normalize(self.image_projection((grid * weights).sum(1)), dim=-1)  # (B, E)

    def encode_text(self, texts, strict: bool = False) -> torch.Tensor:
        _, _, pooled = self.text_encoder.encode(texts, strict=strict)
        return F.normalize(self.text_projection(pooled), dim=-1)  # (B, E)

    def loss(self, batch):
        image_emb = self.encode_image(batch["images"])
        text_emb = self.encode_text(batch["texts"])
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * image_emb @ text_emb.t()  # (B, B)
        # a text can repeat within a batch (one Shapes scene, a clipart title shared by many
        # drawings): every pair with the same text is a right answer, weighted equally
        ids: dict[str, int] = {}
        text_ids = torch.tensor([ids.setdefault(t, len(ids)) for t in batch["texts"]], device=logits.device)  # (B,)
        same = text_ids[:, None] == text_ids[None, :]  # (B, B)
        target = same.float() / same.sum(1, keepdim=True)  # (B, B), rows sum to 1; symmetric
        loss = 0.5 * (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.t().float(), target))
        accuracy = same.gather(1, logits.argmax(1, keepdim=True)).float().mean()
        return loss, {"batch_accuracy": accuracy.detach(), "temperature": (1 / scale).detach()}
