"""Object boxes from records: the targets a layout stage trains on.

A record's objects live at a configurable place (`[data] boxes`, default `"scene.objects"`,
where Shapes records keep them): a list of dicts with centre `cx`, `cy` and half-extent `r`
in 64-pixel units, plus any attributes a labelled layout names (`color`, `shape`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_BOXES = "scene.objects"


def record_objects(record: dict, where: str = DEFAULT_BOXES) -> list[dict] | None:
    """The objects of a record at a dotted path (`"scene.objects"`), or None when it has none."""
    value = record
    for key in where.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value or None


def has_boxes(records: Sequence[dict], where: str = DEFAULT_BOXES) -> bool:
    return bool(records) and all(record_objects(r, where) for r in records)


def layout_targets(records: Sequence[dict], slots: int, labels: dict[str, list[str]] | None = None,
                   where: str = DEFAULT_BOXES) -> tuple:
    """True boxes of records with object annotations, in reading order -> (boxes (B, K, 3), present (B, K)),
    and with `labels` also the objects' label indices (B, K, len(labels)) (absent slots: 0)."""
    labels = labels or {}
    boxes, present = torch.zeros(len(records), slots, 3), torch.zeros(len(records), slots, dtype=torch.bool)
    label_ids = torch.zeros(len(records), slots, len(labels), dtype=torch.long)
    for i, record in enumerate(records):
        objects = record_objects(record, where)
        if not objects:
            raise ValueError(f"this generator has a layout stage, which trains on object boxes "
                             f"(record[{where!r}] with cx, cy, r); this data set's records have none")
        if len(objects) > slots:
            raise ValueError(f"a record has {len(objects)} objects; the layout stage has {slots} slots")
        for k, o in enumerate(reading_order(objects)):
            boxes[i, k] = torch.tensor([o["cx"], o["cy"], o["r"]], dtype=torch.float32)
            present[i, k] = True
            for j, (key, values) in enumerate(labels.items()):
                if o.get(key) not in values:
                    raise ValueError(f"an object's {key} is {o.get(key)!r}, not one of the layout's labels {values}")
                label_ids[i, k, j] = values.index(o[key])
    return (boxes, present, label_ids) if labels else (boxes, present)


def reading_order(objects: Sequence[dict]) -> list[dict]:
    """Objects as a caption names them: two objects left-to-right if they are further apart
    horizontally than vertically, else top-to-bottom (the Shapes world's canonical order)."""
    if len(objects) != 2:
        return sorted(objects, key=lambda o: (o["cx"], o["cy"]))
    a, b = objects
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    first_is_a = dx > 0 if abs(dx) >= abs(dy) else dy > 0
    return [a, b] if first_is_a else [b, a]
