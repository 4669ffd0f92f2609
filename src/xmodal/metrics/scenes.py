"""Shapes scene accuracy (WORLD.md): does a picture show exactly what its prompt says?

The reader is either the independent pixel judge (`xmodal.worlds.judge.read_scene`) or a
captioner whose text is parsed by the grammar (the cycle measure). A picture counts only
when the object count, every object's size, colour and shape, and the relation all match.
Per-attribute rates: `count` over all pictures; `color`, `shape`, `size` over the objects
of pictures whose count matched (objects paired in the order that agrees best);
`relation` over two-object pictures whose count matched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xmodal.worlds.judge import read_scene
from xmodal.worlds.shapes import SceneSpec

ATTRIBUTES = ("size", "color", "shape")


def compare(truth: SceneSpec, read: SceneSpec | None) -> dict[str, list[bool]]:
    """Per-attribute hits of one picture (lists, since a picture may hold two objects)."""
    hits: dict[str, list[bool]] = {"count": [read is not None and len(read.objects) == len(truth.objects)]}
    if not hits["count"][0]:
        return hits
    pairs = list(zip(truth.objects, read.objects))
    if len(truth.objects) == 2:
        swapped = list(zip(truth.objects, read.objects[::-1]))
        score = lambda ps: sum(getattr(a, k) == getattr(b, k) for a, b in ps for k in ATTRIBUTES)  # noqa: E731
        in_order = score(pairs) >= score(swapped)
        pairs = pairs if in_order else swapped
        hits["relation"] = [in_order and truth.relation == read.relation]
    for k in ATTRIBUTES:
        hits[k] = [getattr(a, k) == getattr(b, k) for a, b in pairs]
    return hits


def scene_accuracy(truths: Sequence[SceneSpec], reads: Sequence[SceneSpec | None]) -> dict[str, float]:
    if len(truths) != len(reads):
        raise ValueError(f"{len(truths)} scenes but {len(reads)} readings")
    if not truths:
        raise ValueError("no scenes to score")
    totals: dict[str, list[bool]] = {}
    for t, r in zip(truths, reads):
        for k, v in compare(t, r).items():
            totals.setdefault(k, []).extend(v)
    result = {"scene_accuracy": sum(t == r for t, r in zip(truths, reads)) / len(truths)}
    result.update({k: sum(v) / len(v) for k, v in totals.items() if v})
    return result


def judge_reader(images: Sequence[np.ndarray]) -> list[SceneSpec | None]:
    return [read_scene(np.asarray(im)) for im in images]
