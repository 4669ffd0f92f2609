"""An independent reader of Shapes pictures: pixels in, `SceneSpec` out.

It shares no code path with the renderer; it knows only the published palette
and geometry of WORLD.md. Used to check the renderer (the data set must read
back as recorded) and as the scene-accuracy judge for generated images.

How it reads: estimate the background from the border, find connected regions
that differ from it, give each region the nearest palette colour, measure each
pixel's coverage (alpha) along the colour-to-background line, and classify the
shape from scale-free features of the alpha mask (fill of the bounding box,
aspect ratio, vertical centroid offset). Size follows from the shape's
geometry; the relation from box centres along the dominant axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xmodal.worlds.shapes import BASE_SIZE, PALETTE, ObjectSpec, SceneSpec

_COLOR_NAMES = list(PALETTE)
_COLOR_RGB = np.array([PALETTE[c] for c in _COLOR_NAMES], dtype=np.float32)  # (6, 3)
# half-extent r from the measured box, per shape: (width factor, height factor)
_EXTENT = {"circle": (2.0, 2.0), "square": (1.7, 1.7), "triangle": (2.0, 1.8), "diamond": (1.5, 2.0), "cross": (2.0, 2.0)}
_SIZE_THRESHOLD = 9.5  # between small (<= 8) and large (>= 11), 64-px units


@dataclass(frozen=True)
class ReadObject:
    spec: ObjectSpec
    cx: float  # box centre, pixels
    cy: float
    area: float  # sum of alpha, pixels


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _classify_shape(alpha: np.ndarray) -> tuple[str, float, float, float, float]:
    """Shape name and the box (x centre, y centre, width, height) of an alpha mask."""
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    width, height = float(cols.sum()), float(rows.sum())  # sub-pixel extents
    xs, ys = np.nonzero(cols > 0.5)[0], np.nonzero(rows > 0.5)[0]
    if len(xs) == 0 or len(ys) == 0:
        xs, ys = np.nonzero(cols)[0], np.nonzero(rows)[0]
    cx = (xs[0] + xs[-1] + 1) / 2.0
    cy = (ys[0] + ys[-1] + 1) / 2.0
    area = float(alpha.sum())
    fill = area / max(width * height, 1e-6)
    aspect = width / max(height, 1e-6)
    yy = np.arange(alpha.shape[0], dtype=np.float32)[:, None] + 0.5
    centroid_y = float((alpha * yy).sum() / max(area, 1e-6))
    offset = (centroid_y - cy) / max(height, 1e-6)  # triangle: mass sits low (~+0.17)
    if offset > 0.08:
        shape = "triangle"
    elif aspect < 0.87:
        shape = "diamond"
    elif fill > 0.9:
        shape = "square"
    elif fill > 0.68:
        shape = "circle"
    else:
        shape = "cross"
    return shape, cx, cy, width, height


def read_objects(image: np.ndarray, min_area: float = 12.0) -> list[ReadObject]:
    """Every object found in an (S, S, 3) uint8 image, in no particular order."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    size = image.shape[0]
    scale = size / BASE_SIZE
    pixels = image.astype(np.float32)
    bg = _background(pixels)
    diff = np.abs(pixels - bg).max(axis=2)  # (H, W)
    labels, count = ndimage.label(diff > 25)
    found = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = region
        # widen the window by a pixel so the anti-aliased rim is included
        ys = slice(max(ys.start - 1, 0), min(ys.stop + 1, size))
        xs = slice(max(xs.start - 1, 0), min(xs.stop + 1, size))
        mask = labels[ys, xs] == index
        window = pixels[ys, xs]
        strength = diff[ys, xs] * mask
        core = strength >= 0.8 * strength.max()
        mean_rgb = window[core].mean(axis=0)
        color_index = int(np.argmin(((_COLOR_RGB - mean_rgb) ** 2).sum(axis=1)))
        target = mean_rgb - bg  # direction from background to this object's colour
        alpha = ((window - bg) @ target) / max(float(target @ target), 1e-6)
        near = ndimage.binary_dilation(mask, iterations=1)
        alpha = np.clip(alpha, 0.0, 1.0) * near
        if alpha.sum() < min_area * scale * scale:
            continue  # speck of noise
        shape, cx, cy, width, height = _classify_shape(alpha)
        fw, fh = _EXTENT[shape]
        r = 0.5 * (width / fw + height / fh) / scale
        size_name = "large" if r > _SIZE_THRESHOLD else "small"
        spec = ObjectSpec(size_name, _COLOR_NAMES[color_index], shape)
        found.append(ReadObject(spec, xs.start + cx, ys.start + cy, float(alpha.sum())))
    return found


def read_scene(image: np.ndarray) -> SceneSpec | None:
    """The scene an image shows, or None when it holds no object or more than two."""
    objects = read_objects(np.asarray(image))
    if len(objects) == 1:
        return SceneSpec((objects[0].spec,))
    if len(objects) != 2:
        return None
    a, b = objects
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        first, second = (a, b) if dx > 0 else (b, a)
        return SceneSpec((first.spec, second.spec), "left")
    first, second = (a, b) if dy > 0 else (b, a)
    return SceneSpec((first.spec, second.spec), "above")
