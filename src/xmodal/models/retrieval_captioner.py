"""A transformer captioner that reads the titles of similar training pictures and may copy them.

Retrieval-augmented captioning in the manner of SmallCap (Ramos et al. 2023,
https://arxiv.org/abs/2209.15323) with a pointer-generator output (See et al. 2017,
https://arxiv.org/abs/1704.04368):

- The model holds a memory of the training set: each training picture's pooled image features
  (unit vectors, from its own image encoder, which is frozen so that they stay valid) and its
  first caption as word ids.
- For a picture, the `retrieve` most similar memory rows are looked up; their captions are
  embedded and appended to the image regions that the decoder cross-attends to.
- Each word is drawn from a mixture: the decoder's own word distribution, weighted by a learned
  gate, and a copy distribution over the retrieved captions' words (an attention from the
  decoder's state over them). A picture that repeats a training picture (collections hold
  many, in series or filed under two folders) can have its title copied word for word, rare
  words included, while an unfamiliar one is described from the picture.

In training a picture never retrieves its own memory row (the collate names the row), as a
test picture cannot, and looks up its neighbours as its unaugmented self. The encoder comes
from a trained captioner (`encoder_from`) and is frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.data.text import Vocabulary
from xmodal.models.decoding import Decoded, Rescorer
from xmodal.models.registry import register_model
from xmodal.models.transformer_captioner import TransformerCaptioner, TransformerCaptionerConfig

MAX_MEMORY = 1_000_000  # memory rows at most (a million training captions)


@dataclass
class RetrievalCaptionerConfig(TransformerCaptionerConfig):
    retrieve: int = 4  # memory captions read per picture
    prefer_retrieved: bool = True  # a retrieved caption, whole, replaces the search's if it scores higher per word
    memory_size: int = 0  # memory rows: the training set's pictures (set when the model is built)
    memory_len: int = 12  # words kept of each memory caption (then <end>)
    encoder_from: str | None = None  # a captioner (name or folder) whose image encoder is copied, then frozen


@register_model("retrieval-captioner")
class RetrievalCaptioner(TransformerCaptioner, Rescorer):
    config_class = RetrievalCaptionerConfig
    retrieves = True

    def __init__(self, config: RetrievalCaptionerConfig, vocab: Vocabulary | None = None):
        super().__init__(config, vocab)
        c = config
        if not 1 <= c.memory_size <= MAX_MEMORY:
            raise ValueError(f"memory_size must be in 1..{MAX_MEMORY}, got {c.memory_size}")
        if not 1 <= c.retrieve <= min(32, c.memory_size):
            raise ValueError(f"retrieve must be in 1..min(32, memory_size), got {c.retrieve}")
        if not 1 <= c.memory_len <= 64:
            raise ValueError(f"memory_len must be in 1..64, got {c.memory_len}")
        if c.vocab_size > 32767:
            raise ValueError(f"vocab_size {c.vocab_size} is over 32767: memory captions are stored as int16")
        self.register_buffer("memory_keys", torch.zeros(c.memory_size, self.image_encoder.out_dim))
        self.register_buffer("memory_tokens", torch.zeros(c.memory_size, c.memory_len + 1, dtype=torch.int16))
        self.retrieved_pos = nn.Parameter(torch.zeros(c.retrieve * (c.memory_len + 1), c.d_model))
        nn.init.normal_(self.retrieved_pos, std=0.02)
        self.copy_query = nn.Linear(c.d_model, c.d_model)
        self.copy_key = nn.Linear(c.d_model, c.d_model)
        self.copy_gate = nn.Linear(c.d_model, 1)  # the share of the decoder's own words
        self.image_encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.image_encoder.eval()  # frozen: batch-norm statistics stay those the memory was made with
        return self

    def config_for_saving(self) -> dict:
        return {**super().config_for_saving(), "encoder_from": None}  # the encoder travels in the weights

    @torch.no_grad()
    def fill_memory(self, keys: torch.Tensor, captions: list[str]) -> None:
        """The memory: `keys` (M, D), the pooled image features of the training pictures as
        `image_features` gives them, and their captions (M of them, in the same order)."""
        m, length = self.memory_tokens.shape
        if keys.shape != self.memory_keys.shape or len(captions) != m:
            raise ValueError(f"the memory holds {m} rows of {self.memory_keys.size(1)} features; got keys "
                             f"{tuple(keys.shape)} and {len(captions)} captions")
        self.memory_keys.copy_(F.normalize(keys.float(), dim=-1))
        self.memory_tokens.zero_()
        for row, caption in enumerate(captions):
            ids = [*self.vocab.encode(caption, add_special=False)[: length - 1], Vocabulary.end_id]
            self.memory_tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int16)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit pooled features (B, D), as the memory keys are made."""
        return F.normalize(self.image_encoder.forward_pooled(images).float(), dim=-1)

    def _retrieve(self, features: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
        """Word ids (B, retrieve * (memory_len + 1)) of the captions of the nearest memory rows,
        most similar first. A picture with its own row named in `exclude` (-1: none; training)
        looks up with that row's key, the features of the picture as evaluation preprocesses it
        (not of the augmented crop it is trained on: neighbours as a test picture finds them),
        and never reads the row itself."""
        query = F.normalize(features.mean(1).float(), dim=-1)
        rows = torch.nonzero(exclude >= 0).flatten() if exclude is not None else None
        if rows is not None:
            query[rows] = self.memory_keys[exclude[rows]]
        similarity = query @ self.memory_keys.t()  # (B, M)
        if rows is not None:
            similarity[rows, exclude[rows]] = float("-inf")
        nearest = similarity.topk(self.config.retrieve, dim=1).indices  # (B, k)
        return self.memory_tokens[nearest].flatten(1).long()

    def encode_images(self, images: torch.Tensor, exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            features = self.image_encoder.forward_features(images)  # (B, N, D), frozen
        n = features.size(1)
        if n > self.config.max_regions:
            raise ValueError(f"the image gives {n} regions; this model embeds at most max_regions={self.config.max_regions}")
        retrieved = self._retrieve(features, exclude)
        words = self.token_emb(retrieved) + self.retrieved_pos  # (B, R, d)
        memory = torch.cat([self.memory_proj(features) + self.region_pos[:n], words], 1)
        return {"memory": memory, "retrieved": retrieved, "copy_keys": self.copy_key(words)}

    def _mix(self, hidden: torch.Tensor, copy_keys: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        """log p(word) (B, T, V) from the decoder's output (B, T, d): the gated mixture of its word
        distribution and the copy distribution over the retrieved words."""
        scores = self.copy_query(hidden) @ copy_keys.transpose(1, 2) * hidden.size(-1) ** -0.5  # (B, T, R)
        # padding is never copied (a large negative, not -inf: an empty memory gives no NaN, its share goes to <pad>)
        scores = scores.float().masked_fill((retrieved == Vocabulary.pad_id)[:, None], -1e9)
        gate = torch.sigmoid(self.copy_gate(hidden).float())  # (B, T, 1)
        words = self.head(hidden).float().softmax(-1) * gate
        index = retrieved[:, None].expand(-1, hidden.size(1), -1)
        mixed = words.scatter_add(2, index, scores.softmax(-1) * (1 - gate))
        return mixed.clamp_min(1e-12).log()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, exclude: torch.Tensor | None = None):
        """log-probabilities (B, T-1, V) of each next word: already normalized, so that the
        cross-entropy of `Captioner.loss` (a log-softmax first) reads them unchanged."""
        encoded = self.encode_images(images, exclude)
        hidden, _ = self._hidden(encoded["memory"], tokens[:, :-1])
        log_probs = self._mix(hidden, encoded["copy_keys"], encoded["retrieved"])
        return log_probs, log_probs.new_zeros(())

    def forward_batch(self, batch: dict, tokens: torch.Tensor):
        return self(batch["images"], tokens, batch.get("memory_row"))

    def init_state(self, memory: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**super().init_state(memory), "copy_keys": memory["copy_keys"], "retrieved": memory["retrieved"]}

    def step(self, state: dict, tokens: torch.Tensor):
        hidden, new, weights = self._step_hidden(state, tokens)
        new["copy_keys"], new["retrieved"] = state["copy_keys"], state["retrieved"]
        log_probs = self._mix(hidden[:, None], state["copy_keys"], state["retrieved"])[:, 0]
        return log_probs, new, weights[:, : weights.size(1) - state["retrieved"].size(1)]

    @torch.no_grad()
    def rescore(self, memory: dict, decoded: list[Decoded], allowed: Callable[[list[int]], bool],
                return_attention: bool = False) -> list[Decoded]:
        """Each picture's decoded caption against its retrieved captions taken whole: the one
        with the highest mean log-probability per word (`<end>` counted) under this model is
        kept (`prefer_retrieved`; measured on the validation split: CIDEr-D 3.237 -> 3.243 for
        clipart). The search builds a caption word by word and can leave a title it began to
        copy; a whole title is scored as one. `allowed(ids)`: the decoding's rules."""
        if not self.config.prefer_retrieved:
            return decoded
        length = self.config.memory_len + 1
        rows, candidates = [], []
        for i, d in enumerate(decoded):
            whole = [[t for t in part if t != Vocabulary.pad_id] for part in memory["retrieved"][i].view(-1, length).tolist()]
            for ids in dict.fromkeys(tuple(w[:-1]) for w in whole if w and w[-1] == Vocabulary.end_id):
                if list(ids) != d.tokens and allowed(list(ids)):
                    rows.append(i)
                    candidates.append(list(ids))
        if not rows:
            return decoded
        scores, attention = self._score(memory, rows, candidates, return_attention)
        out = list(decoded)
        for j, (i, ids) in enumerate(zip(rows, candidates)):
            best = out[i]
            if scores[j] / (len(ids) + 1) > best.score / (len(best.tokens) + 1):
                out[i] = Decoded(ids, float(scores[j]), True, attention[j, : len(ids)] if return_attention else None)
        return out

    def _score(self, memory: dict, rows: list[int], candidates: list[list[int]], return_attention: bool):
        """Summed log-probabilities of whole captions (words then <end>) for the pictures `rows`,
        and the last layer's attention over the image regions at each word (C, T, N)."""
        index = torch.tensor(rows, device=memory["memory"].device)
        picked = {k: v.index_select(0, index) for k, v in memory.items()}
        width = max(map(len, candidates)) + 2
        tokens = torch.full((len(candidates), width), Vocabulary.pad_id, dtype=torch.long, device=index.device)
        for j, ids in enumerate(candidates):
            tokens[j, : len(ids) + 2] = torch.tensor([Vocabulary.start_id, *ids, Vocabulary.end_id])
        hidden, weights = self._hidden(picked["memory"], tokens[:, :-1], need_weights=return_attention)
        log_probs = self._mix(hidden, picked["copy_keys"], picked["retrieved"]).gather(2, tokens[:, 1:, None])[..., 0]
        scores = (log_probs * (tokens[:, 1:] != Vocabulary.pad_id)).sum(1).cpu()
        regions = picked["memory"].size(1) - picked["retrieved"].size(1)
        return scores, (weights[..., :regions].float().cpu() if weights is not None else None)
