"""Shapes data sets: write one to disk in the prepared format, or render on the fly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from xmodal.data.prepared import RecordWriter, staged_folder
from xmodal.worlds.shapes import SPLITS, Split, render, sample_scene, scene_seed


def shapes_record(index: int, split: Split, base_seed: int, size: int) -> tuple[dict, np.ndarray]:
    record, scene = _record(index, split, base_seed, size)
    return record, render(scene, size)


def _record(index: int, split: Split, base_seed: int, size: int) -> tuple[dict, object]:
    seed = scene_seed(split, base_seed, index)
    scene = sample_scene(seed, split)
    record = {
        "image": f"images/{index:07d}.png",
        "captions": scene.references(),  # canonical caption first
        "split": split,
        "seed": seed,
        "scene": {**scene.to_dict(), "spec": scene.spec.to_dict(), "size": size},
    }
    return record, scene


def write_shapes(out: str | Path, split: Split, count: int, seed: int = 0, size: int = 64,
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Write `count` Shapes images and their captions into a new (or empty, or with `overwrite`
    replaced) folder; returns {'count', 'seconds', 'images_per_s'}."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    start = time.perf_counter()
    with staged_folder(out, overwrite) as folder, RecordWriter(folder) as writer:
        for i in tqdm(range(count), desc=f"shapes {split}", unit="img", disable=not progress):
            record, pixels = shapes_record(i, split, seed, size)
            Image.fromarray(pixels).save(folder / record["image"], compress_level=1)
            writer.write(record)
    seconds = time.perf_counter() - start
    return {"count": count, "seconds": seconds, "images_per_s": count / seconds}


class ShapesDataset(Dataset):
    """Shapes scenes rendered on demand (no disk): item = (image (3, S, S) in [-1, 1], captions, record)."""

    def __init__(self, split: Split = "train", count: int = 10_000, seed: int = 0, size: int = 64,
                 cache: bool = False, progress: bool = False, transform=None):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        self.split, self.count, self.seed, self.size = split, count, seed, size
        self.transform = transform  # (S, S, 3) uint8 pixels -> (3, S, S) tensor, e.g. an augmentation; None: as stored
        self._pixels: np.ndarray | None = None
        self._records: list[dict] | None = None
        if cache:  # render once into memory (count * S * S * 3 bytes), then every epoch only reads
            self._pixels = np.empty((count, size, size, 3), np.uint8)
            self._records = []
            for i in tqdm(range(count), desc=f"render shapes {split}", unit="img", disable=not progress):
                record, self._pixels[i] = shapes_record(i, split, seed, size)
                self._records.append(record)

    def __len__(self) -> int:
        return self.count

    @property
    def records(self) -> list[dict]:
        """Every item's record (scene, captions), without rendering when not cached."""
        if self._records is not None:
            return self._records
        return [_record(i, self.split, self.seed, self.size)[0] for i in range(self.count)]

    def image(self, index: int) -> np.ndarray:
        """Item `index` as stored: (S, S, 3) uint8 pixels."""
        return self.item(index)[1]

    def item(self, index: int) -> tuple[dict, np.ndarray]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self._pixels is not None:
            return self._records[index], self._pixels[index]
        return shapes_record(index, self.split, self.seed, self.size)

    def __getitem__(self, index: int):
        record, pixels = self.item(index)
        if self.transform is not None:
            return self.transform(pixels), record["captions"], record
        # exactly what the `shapes64` preset computes from a stored image, (x * (1/255) - 0.5) / 0.5, so
        # a model reads the same numbers from this data set as from files or pipelines
        image = (torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() * (1 / 255) - 0.5) / 0.5
        return image, record["captions"], record
