"""A transformer decoder over CNN grid features (pre-norm; causal self-attention, cross-attention).

In the spirit of "Attention Is All You Need" (Vaswani et al. 2017) applied to
captioning as in many follow-ups: the grid features, projected and given learned
position embeddings, are the memory the decoder cross-attends to. Differences: a
small model for CPU, pre-norm blocks, and cross-attention weights (mean over heads of
the last layer) returned per step so attention maps work as with the LSTM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.data.text import Vocabulary
from xmodal.models.captioning import Captioner
from xmodal.models.registry import register_model


@dataclass
class TransformerCaptionerConfig:
    vocab_size: int = 32
    image_encoder: str = "small-cnn"
    encoder_width: int = 32
    encoder_dim: int = 128
    encoder_weights: str | None = None
    encoder_trainable: bool = True
    image_preset: str = "shapes64"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ff_dim: int = 512
    dropout: float = 0.1
    max_regions: int = 256  # N: grid positions with a learned embedding
    max_len: int = 20  # words, for decoding
    beam_size: int = 3  # the decoding a pipeline uses unless told (1 = greedy; `xmodal caption --beam` overrides)
    word_dropout: float = 0.0  # share of previous words hidden (as <unk>) from the decoder in training
    label_smoothing: float = 0.0  # cross-entropy against (1 - e) on the word + e spread over the vocabulary


class DecoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, causal_mask, need_weights: bool = False):
        # x (B, T, d), memory (B, N, d), causal_mask (T, T) bool, True = blocked
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0])
        h = self.norm2(x)
        attended, weights = self.cross_attn(h, memory, memory, need_weights=need_weights)  # weights (B, T, N)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.mlp(self.norm3(x)))
        return x, weights

    def cross_keys(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention's keys and values over the memory, (B, H, N, d/H) each: once per image."""
        d = memory.size(-1)
        w, b = self.cross_attn.in_proj_weight[d:], self.cross_attn.in_proj_bias[d:]
        k, v = F.linear(memory, w, b).chunk(2, dim=-1)
        # contiguous once here, or every step's matmul copies them (the largest cost of decoding was that copy)
        return _heads(k, self.cross_attn.num_heads).contiguous(), _heads(v, self.cross_attn.num_heads).contiguous()

    def step(self, x, keys, values, cross_k, cross_v, need_weights: bool = True):
        """One new position x (B, 1, d) against the cached self-attention keys/values (B, H, t, d/H)
        of the positions before it: the same arithmetic as `forward` (eval mode), one row at a time.
        Returns x, the keys and values with this position appended, and the cross-attention weights
        (B, N), the mean over heads (None unless `need_weights`: the fused attention kernel took a
        quarter of the time of the softmax spelled out)."""
        b, d, heads = x.size(0), x.size(-1), self.self_attn.num_heads
        one = (b, -1, 1, d // heads)  # (B, 1, d) as (B, H', 1, d/H): one position needs no transpose
        qkv = F.linear(_norm(self.norm1, x), self.self_attn.in_proj_weight, self.self_attn.in_proj_bias)
        q, k, v = qkv.view(one).split(heads, 1)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        attended = F.scaled_dot_product_attention(q, keys, values)  # sees every earlier position
        x = x + _linear(self.self_attn.out_proj, attended.reshape(b, 1, d))
        q = F.linear(_norm(self.norm2, x), self.cross_attn.in_proj_weight[:d], self.cross_attn.in_proj_bias[:d]).view(one)
        if need_weights:
            weights = (q @ cross_k.transpose(-1, -2) * q.size(-1) ** -0.5).softmax(-1)  # (B, H, 1, N)
            attended = weights @ cross_v
        else:
            weights, attended = None, F.scaled_dot_product_attention(q, cross_k, cross_v)
        x = x + _linear(self.cross_attn.out_proj, attended.reshape(b, 1, d))
        up, down = self.mlp[0], self.mlp[2]
        x = x + _linear(down, F.gelu(_linear(up, _norm(self.norm3, x))))
        return x, keys, values, None if weights is None else weights.mean(1)[:, 0]


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # (B, T, d) -> (B, H, T, d/H)
    return x.view(x.size(0), x.size(1), heads, -1).transpose(1, 2)


@register_model("transformer-captioner")
class TransformerCaptioner(Captioner):
    config_class = TransformerCaptionerConfig

    def __init__(self, config: TransformerCaptionerConfig, vocab: Vocabulary | None = None):
        super().__init__(config, vocab)
        c = config
        self.memory_proj = nn.Linear(self.image_encoder.out_dim, c.d_model)
        self.region_pos = nn.Parameter(torch.zeros(c.max_regions, c.d_model))
        self.token_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.token_pos = nn.Parameter(torch.zeros(c.max_len + 2, c.d_model))
        nn.init.normal_(self.region_pos, std=0.02)
        nn.init.normal_(self.token_pos, std=0.02)
        self.blocks = nn.ModuleList(DecoderBlock(c.d_model, c.n_heads, c.ff_dim, c.dropout) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.token_emb.weight  # tied input/output embeddings

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.image_encoder.forward_features(images)  # (B, N, D)
        n = features.size(1)
        if n > self.config.max_regions:
            raise ValueError(f"the image gives {n} regions; this model embeds at most max_regions={self.config.max_regions}")
        return {"memory": self.memory_proj(features) + self.region_pos[:n]}  # (B, N, d)

    def _decode(self, memory: torch.Tensor, tokens: torch.Tensor, need_weights: bool = False):
        hidden, weights = self._hidden(memory, tokens, need_weights)
        return self.head(hidden), weights  # (B, T, V), (B, T, N) | None

    def _hidden(self, memory: torch.Tensor, tokens: torch.Tensor, need_weights: bool = False):
        """The decoder's normed output at every position, (B, T, d), before the word head."""
        t = tokens.size(1)
        if t > self.token_pos.size(0):
            raise ValueError(f"{t} tokens exceed this model's max_len + 2 = {self.token_pos.size(0)}")
        x = self.token_emb(tokens) + self.token_pos[:t]  # (B, T, d)
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        weights = None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, memory, mask, need_weights=need_weights and i == len(self.blocks) - 1)
        return self.norm(x), weights

    def init_state(self, memory: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoding state: per layer, the cross-attention keys/values over the memory (computed
        once) and the self-attention keys/values of the words so far (the KV cache); batch first."""
        m = memory["memory"]
        b, heads = m.size(0), self.config.n_heads
        empty = m.new_zeros(b, heads, 0, self.config.d_model // heads)
        state = {}
        for i, block in enumerate(self.blocks):
            state[f"cross_k{i}"], state[f"cross_v{i}"] = block.cross_keys(m)
            state[f"k{i}"], state[f"v{i}"] = empty, empty
        return state

    def step(self, state: dict, tokens: torch.Tensor):
        """One word for every row: O(t) with the cache, where re-running the prefix is O(t^2)."""
        hidden, new, weights = self._step_hidden(state, tokens)
        return _linear(self.head, hidden).float().log_softmax(-1), new, weights

    def _step_hidden(self, state: dict, tokens: torch.Tensor):
        """The decoder's normed output for the next position (B, d), the new state, the weights."""
        t = state["k0"].size(2)
        if t >= self.token_pos.size(0):
            raise ValueError(f"{t + 1} tokens exceed this model's max_len + 2 = {self.token_pos.size(0)}")
        x = F.embedding(tokens, self.token_emb.weight)[:, None] + self.token_pos[t:t + 1]  # (B, 1, d); a slice exports to ONNX with t dynamic
        new = {}
        for i, block in enumerate(self.blocks):
            x, new[f"k{i}"], new[f"v{i}"], weights = block.step(x, state[f"k{i}"], state[f"v{i}"], state[f"cross_k{i}"],
                                                                state[f"cross_v{i}"], need_weights=i == len(self.blocks) - 1)
            new[f"cross_k{i}"], new[f"cross_v{i}"] = state[f"cross_k{i}"], state[f"cross_v{i}"]
        return _norm(self.norm, x[:, 0]), new, weights

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        memory = self.encode_images(images)["memory"]
        logits, _ = self._decode(memory, tokens[:, :-1])
        return logits, logits.new_zeros(())
