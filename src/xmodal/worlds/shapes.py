"""The Shapes world (`shapes64`, version 1): scenes, renderer, captions, grammar.

Implements shared/WORLD.md exactly. A *scene* is what was drawn (geometry and
colours, in 64-pixel units); a *spec* (`SceneSpec`) is what a caption says
(objects and their relation). Captions, the parser and the judge all meet in
`SceneSpec`, which is normalized so that equal scenes compare equal however the
text ordered them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

WORLD_NAME = "shapes64"
WORLD_VERSION = 1
BASE_SIZE = 64  # every length in the spec is given at this size

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (50, 160, 70),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 40),
    "purple": (145, 65, 185),
    "orange": (240, 135, 35),
}
RADIUS_RANGE = {"small": (6.0, 8.0), "large": (11.0, 14.0)}
HELD_OUT_PAIRS = frozenset(
    {("green", "triangle"), ("purple", "circle"), ("orange", "square"), ("blue", "diamond"), ("yellow", "cross")}
)
Split = Literal["train", "test", "novel"]
SPLITS: tuple[str, ...] = ("train", "test", "novel")
# Disjoint seed ranges per split: scene seed = SPLIT_OFFSET + base_seed * MAX_COUNT + index.
MAX_COUNT = 1_000_000
SPLIT_OFFSET = {"train": 0, "test": 10**12, "novel": 2 * 10**12}

Relation = Literal["left", "above"]  # normalized: first object is left of / above the second
REL_WORDS = {"to the left of": ("left", False), "to the right of": ("left", True), "above": ("above", False), "below": ("above", True)}
CANONICAL_REL = {"left": "to the left of", "above": "above"}
INVERSE_REL = {"left": "to the right of", "above": "below"}


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True, order=True)
class ObjectSpec:
    size: str
    color: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT_PAIRS


@dataclass(frozen=True)
class SceneSpec:
    """What a caption names: 1 or 2 objects and, for two, their relation.

    Normalized: with two objects, the first is left of (`relation="left"`) or
    above (`relation="above"`) the second. Build one with `SceneSpec.make`.
    """

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None

    @staticmethod
    def make(objects: tuple[ObjectSpec, ...], relation_words: str | None = None) -> SceneSpec:
        if len(objects) == 1:
            return SceneSpec(objects, None)
        if relation_words not in REL_WORDS:
            raise ValueError(f"relation {relation_words!r} is not one of {sorted(REL_WORDS)}")
        relation, swap = REL_WORDS[relation_words]
        a, b = objects
        return SceneSpec((b, a) if swap else (a, b), relation)

    def canonical_caption(self) -> str:
        if len(self.objects) == 1:
            return f"a {self.objects[0].phrase}"
        a, b = self.objects
        return f"a {a.phrase} {CANONICAL_REL[self.relation]} a {b.phrase}"

    def references(self) -> list[str]:
        """The canonical caption plus every paraphrase that applies (WORLD.md), no repeats."""
        if len(self.objects) == 1:
            a = self.objects[0].phrase
            refs = [f"a {a}", f"there is a {a}", f"the image shows a {a}", f"a {a} on a gray background"]
        else:
            a, b = (o.phrase for o in self.objects)
            rel, inv = CANONICAL_REL[self.relation], INVERSE_REL[self.relation]
            refs = [
                f"a {a} {rel} a {b}",
                f"a {b} {inv} a {a}",
                f"there is a {a} {rel} a {b}",
                f"a {a} is {rel} a {b}",
                f"a {b} is {inv} a {a}",
            ]
        return list(dict.fromkeys(refs))

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}


# ----------------------------------------------------------------------------- grammar

_OBJ = rf"({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_REL = "|".join(re.escape(r) for r in REL_WORDS)
_ONE = [re.compile(p.format(o=_OBJ)) for p in (
    r"a {o}", r"there is a {o}", r"the image shows a {o}", r"a {o} on a gray background")]
_TWO = [re.compile(p.format(o=_OBJ, r=_REL)) for p in (
    r"a {o} ({r}) a {o}", r"there is a {o} ({r}) a {o}", r"a {o} is ({r}) a {o}")]


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no leading or trailing space (WORLD.md's normalization)."""
    return " ".join(text.lower().split())


def parse(text: str) -> SceneSpec | None:
    """Parse a caption by the Shapes grammar; None when it does not parse."""
    text = normalize_text(text)
    for pattern in _ONE:
        m = pattern.fullmatch(text)
        if m:
            return SceneSpec.make((ObjectSpec(*m.groups()),))
    for pattern in _TWO:
        m = pattern.fullmatch(text)
        if m:
            g = m.groups()
            return SceneSpec.make((ObjectSpec(*g[0:3]), ObjectSpec(*g[4:7])), g[3])
    return None


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    size: str
    color: str
    shape: str
    cx: float  # centre, 64-pixel units, x right
    cy: float  # y down
    r: float  # half-extent
    rgb: tuple[int, int, int]  # jittered colour

    @property
    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.size, self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    seed: int
    split: str
    background: int
    objects: tuple[SceneObject, ...]

    @property
    def spec(self) -> SceneSpec:
        objs = [o.spec for o in self.objects]
        if len(objs) == 1:
            return SceneSpec((objs[0],))
        a, b = self.objects
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dx) >= abs(dy):  # horizontal: left object first
            return SceneSpec(tuple(objs) if dx > 0 else tuple(objs[::-1]), "left")
        return SceneSpec(tuple(objs) if dy > 0 else tuple(objs[::-1]), "above")

    def caption(self) -> str:
        return self.spec.canonical_caption()

    def references(self) -> list[str]:
        return self.spec.references()

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "split": self.split,
            "background": self.background,
            "objects": [{**asdict(o), "rgb": list(o.rgb)} for o in self.objects],
        }

    @staticmethod
    def from_dict(d: dict) -> Scene:
        objs = tuple(SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"])
        return Scene(int(d["seed"]), d["split"], int(d["background"]), objs)


def _draw_object(rng: np.random.Generator) -> SceneObject:
    size = SIZES[rng.integers(len(SIZES))]
    color = COLORS[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = float(rng.uniform(*RADIUS_RANGE[size]))
    jitter = rng.integers(-10, 11, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PALETTE[color], jitter))
    lo, hi = r + 1.0, BASE_SIZE - 1.0 - r  # whole box inside the canvas, 1 px margin
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return SceneObject(size, color, shape, cx, cy, r, rgb)


def _valid_pair(a: SceneObject, b: SceneObject) -> bool:
    if a.color == b.color and a.shape == b.shape:
        return False
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if np.hypot(dx, dy) < a.r + b.r + 3:
        return False
    horizontal = abs(dx) >= 1.5 * abs(dy)
    vertical = abs(dy) >= 1.5 * abs(dx)
    return (horizontal or vertical) and max(abs(dx), abs(dy)) >= 10


def _split_ok(objects: tuple[SceneObject, ...], split: str) -> bool:
    held = [o.spec.held_out for o in objects]
    return any(held) if split == "novel" else not any(held)


def sample_scene(seed: int, split: Split = "train") -> Scene:
    """Draw the scene of one integer seed (deterministic) under the split's constraint."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    rng = np.random.default_rng(seed)
    background = int(rng.integers(200, 246))
    count = 1 + int(rng.integers(2))
    while True:  # redraw objects (attributes and positions), keeping count and background
        objects = tuple(_draw_object(rng) for _ in range(count))
        if count == 2 and not _valid_pair(*objects):
            continue
        if _split_ok(objects, split):
            return Scene(seed, split, background, objects)


def scene_seed(split: Split, base_seed: int, index: int) -> int:
    """The seed of image `index` of a data set made with `--seed base_seed` (disjoint per split)."""
    if not 0 <= index < MAX_COUNT:
        raise ValueError(f"index {index} is outside 0..{MAX_COUNT - 1}")
    if base_seed < 0:
        raise ValueError(f"seed must be >= 0, got {base_seed}")
    return SPLIT_OFFSET[split] + base_seed * MAX_COUNT + index


# ----------------------------------------------------------------------------- renderer

SUPERSAMPLE = 4


def _coverage(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside-test of sample points (x, y) in 64-px units for one object's shape."""
    u, v, r = x - obj.cx, y - obj.cy, obj.r
    if obj.shape == "circle":
        return u * u + v * v <= r * r
    if obj.shape == "square":
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    if obj.shape == "diamond":
        return np.abs(u) / (0.75 * r) + np.abs(v) / r <= 1.0
    if obj.shape == "cross":
        bar = 0.35 * r
        inside = (np.abs(u) <= r) & (np.abs(v) <= r)
        return inside & ((np.abs(v) <= bar) | (np.abs(u) <= bar))
    if obj.shape == "triangle":
        # apex (0, -r), base corners (-r, 0.8r), (r, 0.8r): below the base line is out,
        # and each slanted edge |u| <= (v + r) / 1.8 (the half-width grows 1 per 1.8 down).
        return (v <= 0.8 * r) & (np.abs(u) * 1.8 <= v + r)
    raise ValueError(f"unknown shape {obj.shape!r}; valid: {SHAPES}")


def render(scene: Scene, size: int = BASE_SIZE) -> np.ndarray:
    """Render a scene as an (S, S, 3) uint8 array, anti-aliased by 4x4 supersampling."""
    if not 32 <= size <= 256:
        raise ValueError(f"size must be in 32..256, got {size}")
    scale = size / BASE_SIZE
    image = np.full((size, size, 3), float(scene.background), dtype=np.float32)
    for obj in scene.objects:
        # pixel window that holds the object's box
        x0 = max(int(np.floor((obj.cx - obj.r) * scale)) - 1, 0)
        x1 = min(int(np.ceil((obj.cx + obj.r) * scale)) + 1, size)
        y0 = max(int(np.floor((obj.cy - obj.r) * scale)) - 1, 0)
        y1 = min(int(np.ceil((obj.cy + obj.r) * scale)) + 1, size)
        # sample-point centres, converted to 64-px units
        sx = (np.arange(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE) + 0.5) / (SUPERSAMPLE * scale)
        sy = (np.arange(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE) + 0.5) / (SUPERSAMPLE * scale)
        inside = _coverage(obj, sx[None, :], sy[:, None]).astype(np.float32)
        h, w = y1 - y0, x1 - x0
        alpha = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        patch = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = patch * (1 - alpha) + np.asarray(obj.rgb, np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
