"""The `[data]` section of a training config, shared by every task: where the training and
evaluation records come from, and how the records are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xmodal.data.boxes import DEFAULT_BOXES
from xmodal.training.config import ConfigError


@dataclass
class DataConfig:
    kind: Literal["shapes", "prepared"] = "shapes"
    path: str = ""  # prepared: the data-set folder
    split: str = "train"
    eval_split: str = "val"  # prepared: records used for evaluation during training (if present)
    count: int = 20_000  # shapes: training scenes, rendered once into memory
    seed: int = 0  # shapes: base seed (image i has seed offset(split) + seed * 10^6 + i)
    size: int = 64  # shapes: image side
    eval_count: int = 300  # evaluation images (shapes: fresh `test` scenes; prepared: first of eval_split)
    captions: Literal["first", "random"] = "first"  # which reference to train on per image
    min_freq: int = 1  # vocabulary: words seen fewer times become <unk>
    max_len: int = 20  # words per training caption (longer are cut)
    boxes: str = DEFAULT_BOXES  # where a record keeps its objects' boxes (a layout stage trains on them)


@dataclass
class TrainData:
    """The loaded data of a run: the config, the training set and the evaluation set (or None).
    Both data sets give items (image tensor, captions, record), and offer `records` and
    `image(i)` (the image as stored: pixels or a file)."""

    config: DataConfig
    train: object
    evaluation: object | None
    work_dir: Path | None = None  # the run folder: a text encoder pretrained here checkpoints inside it

    def captions(self, choice: str | None = None) -> list[str]:
        """Every training caption (`"first"`: only each image's first)."""
        choice = choice or self.config.captions
        return [c for r in self.train.records for c in (r["captions"][:1] if choice == "first" else r["captions"])]


def load_data(data: DataConfig, preset: str) -> TrainData:
    """Training and evaluation sets; `preset` is the image preprocessing of the model being trained
    (`xmodal.data.images.make_transform`), used for prepared data sets."""
    from xmodal.data.prepared import CaptionDataset, read_records
    from xmodal.data.shapes import ShapesDataset

    if data.kind == "shapes":
        train = ShapesDataset("train", data.count, data.seed, data.size, cache=True, progress=True)
        evaluation = ShapesDataset("test", data.eval_count, data.seed + 1000, data.size, cache=True)
        return TrainData(data, train, evaluation)
    if data.kind == "prepared":
        if not data.path:
            raise ConfigError("[data]: kind = 'prepared' needs path = '<prepared data-set folder>'")
        from xmodal.data.images import make_transform

        transform = make_transform(preset)
        train = CaptionDataset(data.path, data.split, transform)
        records = [r for r in read_records(data.path) if r.get("split") == data.eval_split][: data.eval_count]
        evaluation = CaptionDataset(data.path, transform=transform, records=records) if records else None
        return TrainData(data, train, evaluation)
    raise ConfigError(f"[data]: kind {data.kind!r} is not one of ('shapes', 'prepared')")


def stored_images(dataset) -> list:
    """Every image of a data set as stored (pixels or files), for a pipeline to read."""
    return [dataset.image(i) for i in range(len(dataset))]
