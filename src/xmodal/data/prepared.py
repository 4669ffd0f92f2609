"""The one prepared data-set format, its writer, and a torch Dataset that reads it.

A prepared data set is a folder::

    images/              the pictures
    captions.jsonl       one line per image:
                         {"image": "images/x.png", "captions": [...], "split": "train", ...}
    import_report.json   what an importer skipped or merged, and why (importers only)

Every source (Shapes, COCO, Karpathy, Flickr, a folder) is converted into it once
("prepare once, then a Dataset that only reads").
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from xmodal.data.images import load_image

CAPTIONS_FILE = "captions.jsonl"


class DataFormatError(ValueError):
    """A prepared data set that does not follow the format; the message names file and line."""


def read_records(folder: str | Path, split: str | None = None) -> list[dict]:
    """The records of a prepared data set, optionally only one split."""
    folder = Path(folder)
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        raise DataFormatError(f"{folder}: not a prepared data set (no {CAPTIONS_FILE}); "
                              "make one with `xmodal data shapes|coco|karpathy|flickr|folder`")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
                    or not isinstance(record.get("captions"), list) or not record["captions"]:
                raise DataFormatError(f"{path}:{line_no}: a record needs 'image' (str) and 'captions' (non-empty list)")
            if split is None or record.get("split") == split:
                records.append(record)
    if split is not None and not records:
        raise DataFormatError(f"{path}: no records with split {split!r}")
    return records


@contextmanager
def staged_folder(out: str | Path, overwrite: bool = False, keep_out: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A temporary folder beside `out` that becomes `out` only when the block succeeds: a failed
    or interrupted write leaves no half data set. `out` must be new or empty unless `overwrite`
    (then the old folder is replaced only after the new one is complete); `keep_out` are source
    paths that `out` must not contain or be (an import never replaces its own sources)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: not empty; give a new folder, or --overwrite to replace it")
        for source in keep_out:
            if source.resolve().is_relative_to(out.resolve()):
                raise ValueError(f"{out}: holds the source {source}; --overwrite would delete it")
    _remove_stale_partials(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)


def _remove_stale_partials(out: Path) -> None:
    """Delete what a killed import left beside `out` (`.OUT.partial-PID` of a process that is gone)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive (another user's), or not a PID at all: left alone


class RecordWriter:
    """Writes `captions.jsonl` line by line (so an interrupted import keeps what it wrote)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        self._file = (self.folder / CAPTIONS_FILE).open("w", encoding="utf-8")
        self.count = 0

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ImportReport:
    """Problems met while importing: per kind, a count and the first examples."""

    source: str
    written: int = 0
    problems: dict[str, dict] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, kind: str, example: str, rule: str) -> None:
        entry = self.problems.setdefault(kind, {"count": 0, "rule": rule, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append(example)

    def summary(self) -> str:
        lines = [f"{self.source}: wrote {self.written} images"]
        for kind, entry in self.problems.items():
            lines.append(f"  {kind}: {entry['count']} ({entry['rule']}); e.g. {', '.join(entry['examples'][:3])}")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> None:
        data = {"source": self.source, "written": self.written, "problems": self.problems}
        (Path(folder) / "import_report.json").write_text(json.dumps(data, indent=2))


class CaptionDataset(Dataset):
    """Reads a prepared data set: item = (image tensor, captions, record).

    `transform` maps a PIL image to a tensor (see `xmodal.data.images.make_transform`).
    """

    def __init__(self, folder: str | Path, split: str | None = None,
                 transform: Callable | None = None, records: list[dict] | None = None, cache: bool = False):
        self.folder = Path(folder)
        self.records = records if records is not None else read_records(self.folder, split)
        if transform is None:
            from xmodal.data.images import make_transform
            transform = make_transform("shapes64")
        self.transform = transform
        # cache: each image decoded once and kept as pixels (a small data set read for many epochs:
        # opening and decoding Fashion-MNIST's PNGs was a tenth of its captioner's training step)
        self._pixels: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> Path:
        """Item `index` as stored: its image file."""
        return self.folder / self.records[index]["image"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str], dict]:
        record = self.records[index]
        if self._pixels is None:
            return self.transform(load_image(self.folder / record["image"])), record["captions"], record
        pixels = self._pixels.get(index)
        if pixels is None:
            pixels = self._pixels[index] = np.asarray(load_image(self.folder / record["image"]))
        return self.transform(Image.fromarray(pixels)), record["captions"], record
