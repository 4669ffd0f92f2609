"""What every captioner shares: the vocabulary part, the image encoder and the teacher-forced loss.

A captioner implements
- `forward(images, tokens) -> (logits (B, T, V), aux_loss)` (teacher forcing on tokens[:, :-1]),
- `encode_images(images) -> memory` (a dict of tensors, batch first),
- `init_state(memory) -> state` and `step(state, tokens (B,)) -> (log_probs (B, V), state, attention (B, N) | None)`,
so that one decoding module (`xmodal.models.decoding`) serves them all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from xmodal.data.text import Vocabulary
from xmodal.models.hub import PretrainedModel


class Captioner(PretrainedModel):
    """Builds `self.image_encoder` from the shared config fields (image_encoder, encoder_width,
    encoder_dim, encoder_weights, encoder_trainable); subclasses add their decoder. The
    vocabulary is a part: `create_model(name, vocab=vocab)` sets `vocab_size` from it."""

    task = "image-to-text"
    parts: ClassVar[tuple[str, ...]] = ("vocab",)
    retrieves: ClassVar[bool] = False  # reads a memory of training captions (xmodal.models.retrieval_captioner)

    def __init__(self, config, vocab: Vocabulary | None = None):
        super().__init__(config)
        if vocab is not None and len(vocab) != config.vocab_size:
            raise ValueError(f"the vocabulary has {len(vocab)} words, but the config says vocab_size={config.vocab_size}")
        self.vocab = vocab  # None until load_assets reads vocab.json
        if not 0 <= config.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
        from xmodal.models.image_encoders import create_image_encoder

        self.image_encoder = create_image_encoder(config.image_encoder, config.encoder_width, config.encoder_dim,
                                                  config.encoder_weights, config.encoder_trainable)

    @classmethod
    def config_from_parts(cls, parts: dict) -> dict:
        return {"vocab_size": len(parts["vocab"])} if "vocab" in parts else {}

    def save_assets(self, folder: Path) -> None:
        if self.vocab is None:
            raise ValueError("a captioner needs its vocabulary to be saved: create_model(name, vocab=vocab)")
        self.vocab.save(folder / "vocab.json")

    def load_assets(self, folder: Path) -> None:
        path = folder / "vocab.json"
        if not path.is_file():
            raise ValueError(f"{folder}: captioner folder has no vocab.json")
        self.vocab = Vocabulary.load(path)
        if len(self.vocab) != self.config.vocab_size:
            raise ValueError(f"{path}: {len(self.vocab)} words, but the config says vocab_size={self.config.vocab_size}")

    def config_for_saving(self) -> dict:
        # the weights file carries the encoder's weights; a local path would not travel with the folder
        return {**dataclasses.asdict(self.config), "encoder_weights": None}

    def forward_batch(self, batch: dict, tokens: torch.Tensor):
        """(logits (B, T-1, V), auxiliary loss) for a training batch with these input words."""
        return self(batch["images"], tokens)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"]  # (B, T) <start> ... <end> <pad>...
        inputs = tokens
        p = self.config.word_dropout
        if self.training and p > 0:
            # word dropout (Bowman et al. 2016): hide some previous words from the decoder so that it
            # reads the image instead of guessing from the words so far (helps unseen combinations)
            hide = (torch.rand(tokens.shape, device=tokens.device) < p) & (tokens > Vocabulary.end_id)
            inputs = tokens.masked_fill(hide, Vocabulary.unk_id)
        logits, aux = self.forward_batch(batch, inputs)  # (B, T-1, V)
        target = tokens[:, 1:]
        xent = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                               ignore_index=Vocabulary.pad_id, label_smoothing=self.config.label_smoothing)
        return xent + aux, {"xent": xent.detach()}
