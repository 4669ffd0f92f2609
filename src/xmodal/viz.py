"""Pictures for people: attention maps over the image, one panel per word (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def attention_figure(image: Image.Image, words: Sequence[str], attention: torch.Tensor, out: str | Path,
                     columns: int = 5) -> Path:
    """The image, then one panel per word with its attention (h, w grid) upsampled over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if attention is None or len(words) == 0:
        raise ValueError("this caption has no attention weights to draw")
    if attention.dim() != 3:
        raise ValueError(f"attention must be (words, h, w), got shape {tuple(attention.shape)}")
    panels = len(words) + 1
    rows = (panels + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    picture = np.asarray(image.convert("RGB"))
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(picture)
    axes[0][0].set_title("image", fontsize=9)
    h, w = picture.shape[:2]
    for i, (word, grid) in enumerate(zip(words, attention), start=1):
        ax = axes[i // columns][i % columns]
        heat = torch.nn.functional.interpolate(grid[None, None].float(), size=(h, w), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
        ax.imshow(picture)
        ax.imshow(heat, cmap="jet", alpha=0.55)
        ax.set_title(word, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)
