"""Tiny real models saved as folders, for tests of the surfaces (CLI, server, API)."""

from __future__ import annotations

from pathlib import Path

import torch

from xmodal.data.shapes import ShapesDataset
from xmodal.data.text import Vocabulary
from xmodal.models.registry import create_model
from xmodal.tasks.text_encoders import prepare_text_encoder

TINY_CVAE = dict(z_dim=4, channels=(16, 8, 8, 4, 4))
TINY_SAT = dict(encoder_width=8, encoder_dim=16, embed_dim=8, decoder_dim=16, attention_dim=8)


def shapes_captions(seed: int, count: int = 8) -> list[str]:
    data = ShapesDataset("train", count=count, seed=seed)
    return [c for i in range(count) for c in data[i][1]]


def save_tiny_models(root: Path, seed: int, kinds=("gen", "cap")) -> Path:
    """Folders under root: `gen` (cvae), `cap` (sat-captioner), `diff` (latent diffusion), `clip`."""
    captions = shapes_captions(seed)
    encoder, _ = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    torch.manual_seed(0)
    builders = {
        "gen": lambda: create_model("cvae", text_encoder=encoder, **TINY_CVAE),
        "cap": lambda: create_model("sat-captioner", vocab=Vocabulary.build(captions), **TINY_SAT),
        "diff": lambda: create_model("latent-diffusion", text_encoder=encoder, channels=(8, 16), heads=2, steps=2,
                                     autoencoder=create_model("autoencoder", latent_channels=2, channels=(8, 8, 8))),
        "clip": lambda: create_model("clip", text_encoder=encoder, encoder_width=8, encoder_dim=16, embed_dim=8),
    }
    for kind in kinds:
        builders[kind]().eval().save_pretrained(root / kind)
    return root
