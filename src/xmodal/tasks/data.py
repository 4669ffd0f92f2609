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
    path: str = ""  # prepared: the data-set folder, or a WebDataset shard pattern (data/train-{000000..000010}.tar)
    eval_path: str = ""  # prepared: where evaluation records come from ("" = path; a folder or a shard pattern)
    split: str = "train"
    eval_split: str = "val"  # prepared: records used for evaluation during training (if present)
    count: int = 20_000  # shapes: training scenes, rendered once into memory
    seed: int = 0  # shapes: base seed (image i has seed offset(split) + seed * 10^6 + i)
    size: int = 64  # shapes: image side
    eval_count: int = 300  # evaluation images (shapes: fresh `test` scenes; prepared: first of eval_split)
    captions: Literal["first", "random"] = "first"  # which reference to train on per image
    min_freq: int = 1  # vocabulary: words seen fewer times become <unk>
    max_len: int = 20  # words per training caption (longer are cut)
    train_preset: str = ""  # preprocessing of training images ("" = the model's; e.g. "gray32-train", "shapes64-train" augment)
    cache_images: bool = False  # prepared folder: decode each training image once and keep its pixels in memory
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
    from xmodal.data.prepared import CaptionDataset
    from xmodal.data.shapes import ShapesDataset

    if data.kind == "shapes":
        from xmodal.data.images import make_transform

        train = ShapesDataset("train", data.count, data.seed, data.size, cache=True, progress=True,
                              transform=make_transform(data.train_preset) if data.train_preset else None)
        evaluation = ShapesDataset("test", data.eval_count, data.seed + 1000, data.size, cache=True)
        return TrainData(data, train, evaluation)
    if data.kind == "prepared":
        if not data.path:
            raise ConfigError("[data]: kind = 'prepared' needs path = '<prepared data-set folder>'")
        from xmodal.data.images import make_transform
        from xmodal.data.shards import ShardDataset, is_shard_pattern

        transform = make_transform(preset)
        train_transform = make_transform(data.train_preset) if data.train_preset else transform
        if is_shard_pattern(data.path):
            if data.cache_images:
                raise ConfigError("[data]: cache_images keeps a prepared folder's images in memory; shards "
                                  "stream (drop cache_images, or train from the folder)")
            train = ShardDataset(data.path, data.split, train_transform)
        else:
            train = CaptionDataset(data.path, data.split, train_transform, cache=data.cache_images)
        return TrainData(data, train, _evaluation_set(data, transform))
    raise ConfigError(f"[data]: kind {data.kind!r} is not one of ('shapes', 'prepared')")


def _evaluation_set(data: DataConfig, transform):
    """The first `eval_count` records of `eval_split` (from `eval_path`, else `path`), or None."""
    from xmodal.data.prepared import CaptionDataset, read_records
    from xmodal.data.shards import ShardDataset, ShardError, is_shard_pattern

    source = data.eval_path or data.path
    if is_shard_pattern(source):
        try:
            pairs = ShardDataset(source, data.eval_split, transform).take(data.eval_count)
        except ShardError:
            return None  # no records of eval_split there
        return InMemoryImages([r for r, _ in pairs], [img for _, img in pairs], transform)
    records = [r for r in read_records(source) if r.get("split") == data.eval_split][: data.eval_count]
    return CaptionDataset(source, transform=transform, records=records) if records else None


class InMemoryImages:
    """Records with their PIL images in memory (an evaluation set read from shards)."""

    def __init__(self, records: list[dict], images: list, transform):
        self.records, self.images, self.transform = records, images, transform

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int):
        return self.images[index]

    def __getitem__(self, index: int):
        record = self.records[index]
        return self.transform(self.images[index]), record["captions"], record


def stored_images(dataset) -> list:
    """Every image of a data set as stored (pixels or files), for a pipeline to read."""
    return [dataset.image(i) for i in range(len(dataset))]
