"""Drawing a layout's boxes, in numpy: the one sampling loop that the PyTorch layout stage
(`xmodal.models.layout`) and the ONNX runtime (`xmodal.runtime`) both run.

The networks are given as two functions, so each runtime brings its own: `radius(k, boxes,
present)` gives slot k's context and the probabilities of its half-extent bins, given the
boxes placed so far; `centre(context, r_bin)` the probabilities of its centre bins. Draws come
from one random source per row (`pick(probs)`, `uniform()` draw for every row from its own),
so row i's boxes depend on its own seed only, whatever the batch. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

CANVAS = 64.0  # box coordinates are in 64-pixel units, whatever the image size


@dataclass
class LayoutConfig:
    slots: int = 2  # the most objects a prompt can name
    dim: int = 128  # width of the slot decoder
    heads: int = 4
    layers: int = 2
    max_len: int = 32  # word positions the slot decoder knows
    grid: int = 32  # centre bins per axis
    radius_bins: int = 26
    radius_range: tuple[float, float] = (3.0, 16.0)  # half-extent range, 64-px units
    feature_dim: int = 32  # channels each slot paints into its box
    weight: float = 0.1  # of the layout's negative log-likelihood in the generator's loss
    temperature: float = 1.0  # sampling: < 1 draws boxes from the likelier part of the learned distribution
    labels: dict[str, list[str]] = field(default_factory=dict)  # object attribute -> its values (one-hot in the map)
    min_gap: float | None = None  # sampling: least distance between two boxes' edges (64-px units); None: any
    # labels read from the prompt's words alone by their own slot reader (`WordLabels`), not from the
    # slots: a word-level text encoder's contextual states carry a shape's training colour into an
    # unseen colour-shape pair, its words do not (needs `labels` and a learned or word2vec encoder)
    word_labels: bool = False

    @property
    def label_channels(self) -> int:
        return sum(len(values) for values in self.labels.values())

    @property
    def channels(self) -> int:  # of the painted map: features, labels, u, v, mask
        return self.feature_dim + self.label_channels + 3


def check_length(config: LayoutConfig, tokens: int) -> None:
    """A ValueError when a prompt of `tokens` tokens is longer than the layout stage reads."""
    if tokens > config.max_len:
        raise ValueError(f"the prompt has {tokens} tokens; the layout stage reads at most {config.max_len}")


def sample_boxes(config: LayoutConfig, p_present: np.ndarray, radius: Callable, centre: Callable,
                 pick: Callable[[np.ndarray], np.ndarray], uniform: Callable[[], np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One layout per row -> boxes (B, K, 3) float32 (centre x, y and half-extent, 64-px units)
    and present (B, K) bool. p_present (B, K): each slot's presence probability. Slot k is drawn
    after slots < k: its half-extent bin (`pick(probs (B, R)) -> (B,)`, one draw per row from that
    row's own source), then its centre bin given it, then 4 uniforms per row (`uniform() -> (B, 4)`:
    presence, and the position inside the r, x and y bins)."""
    c = config
    b, k_slots = p_present.shape
    lo, hi = c.radius_range
    boxes = np.zeros((b, k_slots, 3), dtype=np.float32)
    present = np.zeros((b, k_slots), dtype=bool)
    for k in range(k_slots):
        context, r_probs = radius(k, boxes, present)
        r_bin = pick(r_probs)
        xy_probs = centre(context, r_bin)
        if k and c.min_gap is not None:
            xy_probs = keep_apart(c, xy_probs, boxes[:, :k], present[:, :k], r_bin)
        xy = pick(xy_probs)
        u = uniform().astype(np.float64)  # float64 arithmetic below, as Python floats had it (the same boxes)
        present[:, k] = True if k == 0 else (u[:, 0] < p_present[:, k]) & present[:, k - 1]
        r = lo + (r_bin + u[:, 1]) * (hi - lo) / c.radius_bins
        x = (xy % c.grid + u[:, 2]) * CANVAS / c.grid
        y = (xy // c.grid + u[:, 3]) * CANVAS / c.grid
        boxes[:, k] = np.stack([x, y, r], -1)
    return boxes, present


def keep_apart(config: LayoutConfig, xy_probs: np.ndarray, placed: np.ndarray, placed_present: np.ndarray,
               r_bin: np.ndarray) -> np.ndarray:
    """Zero the centres closer to a placed box than r + r_placed + min_gap (+ a bin's diagonal
    for the jitter inside a bin); a row with no centre left keeps its distribution."""
    c = config  # float32 throughout, each operation in the order the PyTorch stage had it (same boxes)
    lo, hi = c.radius_range
    cell = CANVAS / c.grid
    centres = (np.arange(c.grid, dtype=np.float32) + 0.5) * cell
    cy, cx = np.repeat(centres, c.grid), np.tile(centres, c.grid)  # (G*G,)
    r = lo + (r_bin.astype(np.float32) + 1) * (hi - lo) / c.radius_bins  # (B,) upper edge of the bin
    distance = np.sqrt((cx[None, None] - placed[..., 0:1]) ** 2 + (cy[None, None] - placed[..., 1:2]) ** 2)
    near = distance < (placed[..., 2:3] + r[:, None, None] + c.min_gap + cell * 2**0.5)  # (B, k, G*G)
    near = (near & placed_present[..., None]).any(1)
    kept = np.where(near, np.float32(0.0), xy_probs)
    ok = kept.sum(-1, keepdims=True) > 0
    return np.where(ok, kept, xy_probs)
