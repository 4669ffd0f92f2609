"""Autoencoding: the first stage of latent diffusion, trained on images alone, measured by PSNR."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xmodal.data.collate import GenerationCollate
from xmodal.tasks.data import TrainData
from xmodal.training.config import ConfigError

TASK = "image-autoencoder"
RECIPE_KEYS: dict[str, object] = {"init_from": None}  # a trained autoencoder to start from (a second stage)
DATA_DEFAULTS: dict[str, object] = {}


def load_autoencoder(path: str, key: str):
    """The trained autoencoder that `[model] key` names, or a ConfigError saying why not."""
    from xmodal.models.hub import load_model

    try:
        autoencoder = load_model(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"[model] {key} {path!r}: {err}") from err
    if autoencoder.registry_name != "autoencoder":
        raise ConfigError(f"[model] {key} {path!r} holds a {autoencoder.registry_name}, not an autoencoder")
    return autoencoder


def latent_scale(autoencoder, dataset, count: int = 1000) -> float:
    """The std of the autoencoder's latents of the first `count` training images (latent
    diffusion divides by it so that its latents have unit variance)."""
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    with torch.no_grad():
        return float(autoencoder.encode(images).std())


def build(name: str, values: dict, data: TrainData, seed: int, init_from: str | None = None):
    from xmodal.models.registry import create_model

    torch.manual_seed(seed)
    try:
        model = create_model(name, **values)
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None
    if init_from is not None:
        _init_from(model, load_autoencoder(init_from, "init_from"), init_from)
    return model


def _init_from(model, source, path: str) -> None:
    """Copy a trained autoencoder's weights into `model`: the encoder always (a second stage keeps
    the latent space), the decoder where its layers have the same shapes."""
    try:
        model.encoder.load_state_dict(source.encoder.state_dict())
    except RuntimeError as err:
        raise ConfigError(f"[model] init_from {path!r}: its encoder differs from this config's "
                          f"(latent_channels and channels must match)") from err
    mine = model.decoder.state_dict()
    mine.update({k: v for k, v in source.decoder.state_dict().items() if k in mine and mine[k].shape == v.shape})
    model.decoder.load_state_dict(mine)


def collate(model, data: TrainData) -> GenerationCollate:
    return GenerationCollate("first")


def measure(model, images: Sequence[torch.Tensor] | torch.Tensor) -> dict:
    """PSNR (dB) of the round trip encode -> decode, on images in [-1, 1] (peak-to-peak 2)."""
    images = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    with torch.no_grad():
        mse = ((model.decode(model.encode(images)) - images) ** 2).mean()
    return {"psnr": float(10 * torch.log10(4.0 / mse))}


def evaluator(data: TrainData):
    if data.evaluation is None:
        return None
    images = torch.stack([data.evaluation[i][0] for i in range(len(data.evaluation))])
    return lambda model: measure(model, images)
