"""Show, Attend and Tell: a CNN grid encoder and an LSTM decoder with soft attention.

Xu et al. 2015, https://arxiv.org/abs/1502.03044. As in the paper: soft (deterministic)
attention over the grid, the gating scalar beta = sigmoid(f_beta(h)) on the attended
context, the initial state from the mean annotation vector, and the doubly stochastic
regularizer alpha_c * sum_i (1 - sum_t alpha_ti)^2. Differences: the encoder is ours
(a small CNN for 64 px, or a torchvision ResNet), dropout sits before the output
layer only, and decoding (greedy, beam, sampling) lives in `xmodal.models.decoding`.
Role names follow sgrvinod's tutorial (`init_h`, `f_beta`, `attention_weighted_encoding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xmodal.data.text import Vocabulary
from xmodal.models.captioning import Captioner
from xmodal.models.registry import register_model


@dataclass
class SATConfig:
    vocab_size: int = 32
    image_encoder: str = "small-cnn"  # small-cnn | resnet18 | resnet34 | resnet50
    encoder_width: int = 32  # small-cnn only
    encoder_dim: int = 128  # small-cnn only (ResNets: 512 / 2048)
    encoder_weights: str | None = None  # ResNets: None | "imagenet" | path to a state dict
    encoder_trainable: bool = True
    image_preset: str = "shapes64"  # preprocessing (xmodal.data.images.make_transform)
    embed_dim: int = 64
    decoder_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.3
    alpha_c: float = 1.0  # weight of the doubly stochastic attention regularizer
    max_len: int = 20  # words, for decoding
    beam_size: int = 3  # the decoding a pipeline uses unless told (1 = greedy; `xmodal caption --beam` overrides)
    word_dropout: float = 0.0  # share of previous words hidden (as <unk>) from the decoder in training
    label_smoothing: float = 0.0  # cross-entropy against (1 - e) on the word + e spread over the vocabulary


class SoftAttention(nn.Module):
    """Additive attention over N regions given the decoder state."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def forward(self, encoder_att: torch.Tensor, features: torch.Tensor, h: torch.Tensor):
        # encoder_att: (B, N, A) precomputed encoder_att(features); features (B, N, D); h (B, H)
        scores = self.full_att(torch.relu(encoder_att + self.decoder_att(h)[:, None])).squeeze(-1)  # (B, N)
        alpha = scores.softmax(dim=-1)  # (B, N)
        attention_weighted_encoding = (features * alpha[..., None]).sum(dim=1)  # (B, D)
        return attention_weighted_encoding, alpha


@register_model("sat-captioner")
class SATCaptioner(Captioner):
    config_class = SATConfig

    def __init__(self, config: SATConfig, vocab: Vocabulary | None = None):
        super().__init__(config, vocab)
        c = config
        d = self.image_encoder.out_dim
        self.attention = SoftAttention(d, c.decoder_dim, c.attention_dim)
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        self.init_h = nn.Linear(d, c.decoder_dim)
        self.init_c = nn.Linear(d, c.decoder_dim)
        self.f_beta = nn.Linear(c.decoder_dim, d)  # gating scalar per channel
        self.decode_step = nn.LSTMCell(c.embed_dim + d, c.decoder_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.decoder_dim, c.vocab_size)

    # -- decoding interface
    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.image_encoder.forward_features(images)  # (B, N, D)
        return {"features": features, "encoder_att": self.attention.encoder_att(features)}  # (B, N, A)

    def init_state(self, memory: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean = memory["features"].mean(dim=1)  # (B, D)
        return {**memory, "h": self.init_h(mean), "c": self.init_c(mean)}  # (B, H) each

    def _advance(self, state: dict, tokens: torch.Tensor):
        awe, alpha = self.attention(state["encoder_att"], state["features"], state["h"])  # (B, D), (B, N)
        awe = torch.sigmoid(self.f_beta(state["h"])) * awe  # gate
        h, c = self.decode_step(torch.cat([self.embedding(tokens), awe], dim=-1), (state["h"], state["c"]))
        return self.fc(self.dropout(h)), {**state, "h": h, "c": c}, alpha  # logits (B, V)

    def step(self, state: dict, tokens: torch.Tensor):
        logits, state, alpha = self._advance(state, tokens)
        return logits.float().log_softmax(dim=-1), state, alpha

    # -- teacher forcing
    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        state = self.init_state(self.encode_images(images))
        logits, alphas = [], []
        for t in range(tokens.size(1) - 1):
            step_logits, state, alpha = self._advance(state, tokens[:, t])
            logits.append(step_logits)
            alphas.append(alpha)
        logits = torch.stack(logits, dim=1)  # (B, T-1, V)
        alphas = torch.stack(alphas, dim=1)  # (B, T-1, N)
        valid = (tokens[:, 1:] != 0).to(alphas.dtype)[..., None]  # attention of real steps only
        doubly_stochastic = ((1.0 - (alphas * valid).sum(dim=1)) ** 2).mean()
        return logits, self.config.alpha_c * doubly_stochastic
