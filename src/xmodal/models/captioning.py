"""What every captioner shares: the vocabulary asset, teacher-forced loss, and batching.

A captioner implements
- `forward(images, tokens) -> (logits (B, T, V), aux_loss)` (teacher forcing on tokens[:, :-1]),
- `encode_images(images) -> memory` (a dict of tensors, batch first),
- `init_state(memory) -> state` and `step(state, tokens (B,)) -> (log_probs (B, V), state, attention (B, N) | None)`,
so that one decoding module (`xmodal.models.decoding`) serves them all.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from xmodal.data.text import Vocabulary
from xmodal.models.hub import PretrainedModel


class Captioner(PretrainedModel):
    """Builds `self.image_encoder` from the shared config fields (image_encoder, encoder_width,
    encoder_dim, encoder_weights, encoder_trainable); subclasses add their decoder."""

    task = "image-to-text"
    vocab: Vocabulary | None = None

    def __init__(self, config):
        super().__init__(config)
        from xmodal.models.image_encoders import create_image_encoder

        self.image_encoder = create_image_encoder(config.image_encoder, config.encoder_width, config.encoder_dim,
                                                  config.encoder_weights, config.encoder_trainable)

    def save_assets(self, folder: Path) -> None:
        if self.vocab is None:
            raise ValueError("a captioner needs its vocabulary to be saved (set model.vocab)")
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

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"]  # (B, T) <start> ... <end> <pad>...
        inputs = tokens
        p = getattr(self.config, "word_dropout", 0.0)
        if self.training and p > 0:
            # word dropout (Bowman et al. 2016): hide some previous words from the decoder so that it
            # reads the image instead of guessing from the words so far (helps unseen combinations)
            hide = (torch.rand(tokens.shape, device=tokens.device) < p) & (tokens > Vocabulary.end_id)
            inputs = tokens.masked_fill(hide, Vocabulary.unk_id)
        logits, aux = self(batch["images"], inputs)  # (B, T-1, V)
        target = tokens[:, 1:]
        xent = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                               ignore_index=Vocabulary.pad_id)
        return xent + aux, {"xent": xent.detach()}


class CaptionCollate:
    """(image, captions, record) items -> {"images", "tokens"}; one caption per image.

    `choice="first"` takes the first caption (for Shapes, the canonical one);
    `"random"` draws one per item from Python's RNG (saved in checkpoints, so resume is exact).
    """

    def __init__(self, vocab: Vocabulary, max_len: int = 20, choice: str = "random"):
        if choice not in ("first", "random"):
            raise ValueError(f"caption choice {choice!r} is not one of ('first', 'random')")
        self.vocab, self.max_len, self.choice = vocab, max_len, choice

    def __call__(self, items: list) -> dict:
        images = torch.stack([item[0] for item in items])
        seqs = []
        for _, captions, _ in items:
            text = captions[0] if self.choice == "first" else random.choice(captions)
            ids = self.vocab.encode(text)
            if len(ids) > self.max_len + 2:
                ids = [*ids[: self.max_len + 1], self.vocab.end_id]
            seqs.append(torch.tensor(ids))
        tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.vocab.pad_id)
        return {"images": images, "tokens": tokens}
