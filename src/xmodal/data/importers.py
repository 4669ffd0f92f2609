"""Importers: COCO captions JSON, Karpathy split JSON, Flickr `.token`, and a folder + JSONL/CSV.

Each converts its source into the prepared format (`xmodal.data.prepared`). The rules
for bad input are the same everywhere and are written into `import_report.json`:

- an image that is missing or unreadable: the image is skipped (with all its captions);
- an empty or non-text caption: the caption is dropped; an image left with none is skipped;
- a duplicate image id (COCO `images[].id`, Karpathy filename): the first entry is kept;
- a duplicate caption id (COCO `annotations[].id`, Flickr `file#k`): the first is kept;
- a caption for an image the source does not list: dropped;
- a malformed line (JSONL/CSV/.token): skipped;
- a line that is not UTF-8 text: skipped, with its line number and what it reads as in cp1252;
- an image name that leaves the image folder (absolute, `..`, or a symlink pointing out, unless
  `--follow-symlinks`): skipped, and the file is never opened.
Nothing is lost silently: every skip is counted, with the first examples, in the report.
Nothing outside OUT is written, no source file is changed, OUT must be new or empty unless
`--overwrite`, and an import with no record left exits non-zero and writes nothing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from xmodal.data.images import check_image
from xmodal.data.prepared import ImportReport, RecordWriter, staged_folder

LinkMode = Literal["copy", "symlink"]


class ImportFormatError(ValueError):
    """The source file itself cannot be read as the named format."""


@dataclass
class SourceItem:
    path: Path  # the image file in the source
    name: str  # its path relative to the source image folder (kept under images/)
    captions: list = field(default_factory=list)
    split: str = "train"
    extra: dict = field(default_factory=dict)


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportFormatError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImportFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ImportFormatError(f"{path}: expected a JSON object ({what})")
    return data


class NothingImportedError(ValueError):
    """An import whose every record was skipped: nothing is written."""


def safe_name(name: str) -> str | None:
    """`name` as a relative POSIX path inside the image folder, or None when it would leave it
    (absolute, a drive, or a `..` part)."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        return None
    parts = [p for p in parts if p not in ("", ".")]
    return "/".join(parts) or None


def _source(item: SourceItem, root: Path, follow_symlinks: bool) -> tuple[Path | None, str]:
    """The item's file inside `root` (resolved), or (None, the reason it is refused)."""
    name = safe_name(item.name)
    if name is None:
        return None, "path outside the image folder"
    path = root / name
    if not follow_symlinks and not path.resolve().is_relative_to(root.resolve()):
        return None, "symlink leaving the image folder"
    return path, ""


def write_items(items: Iterable[SourceItem], out: str | Path, report: ImportReport, mode: LinkMode = "copy",
                total: int | None = None, images: str | Path | None = None, overwrite: bool = False,
                follow_symlinks: bool = False, sources: tuple[Path, ...] = ()) -> ImportReport:
    """Check, copy (or link) and record each item; the shared half of every importer.

    Every image must resolve inside `images` (the source image folder): absolute names, `..`
    escapes and (unless `follow_symlinks`) symlinks that leave it are refused and counted.
    Nothing outside OUT is written and no source file is touched: the data set is written to a
    temporary folder that becomes OUT when complete (see `staged_folder`). Raises
    NothingImportedError (after counting why) when no record is left."""
    if mode not in ("copy", "symlink"):
        raise ValueError(f"mode {mode!r} is not one of ('copy', 'symlink')")
    items = list(items)
    root = Path(images) if images is not None else Path(os.path.commonpath([str(i.path.parent) for i in items] or ["."]))
    with staged_folder(out, overwrite, keep_out=(root, *sources)) as folder, RecordWriter(folder) as writer:
        for item in tqdm(items, total=total, desc=f"import {report.source}", unit="img", leave=False):
            record = _import_item(item, root, folder, mode, follow_symlinks, report)
            if record is not None:
                writer.write(record)
        report.written = writer.count
        if writer.count == 0:
            raise NothingImportedError(f"no image could be imported ({len(items)} in the source); nothing written\n"
                                       + report.summary())
        report.save(folder)
    return report


def _import_item(item: SourceItem, root: Path, folder: Path, mode: LinkMode, follow_symlinks: bool,
                 report: ImportReport) -> dict | None:
    """One item's record, its image copied or linked into `folder`; None (counted) when skipped."""
    captions = []
    for c in item.captions:
        if isinstance(c, str) and c.strip():
            captions.append(" ".join(c.split()))
        else:
            report.add("empty caption", item.name, "caption dropped")
    if not captions:
        report.add("image without captions", item.name, "image skipped")
        return None
    path, refused = _source(item, root, follow_symlinks)
    if path is None:
        report.add(refused, item.name, "image skipped (nothing read)")
        return None
    problem = check_image(path)
    if problem is not None:
        report.add("missing image" if "no such file" in problem else "unreadable image", item.name, "image skipped")
        return None
    name = safe_name(item.name)
    target = folder / "images" / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            pass  # another record of the same image (the same name is the same source file)
        elif mode == "symlink":
            os.symlink(path.resolve(), target)
        else:
            shutil.copyfile(path, target)
    except OSError as e:
        report.add("unwritable image name", f"{item.name}: {e.strerror}", "image skipped")
        return None
    return {"image": f"images/{name}", "captions": captions, "split": item.split, **item.extra}


# ----------------------------------------------------------------------------- COCO


def coco_items(annotations: str | Path, images: str | Path, report: ImportReport, split: str) -> list[SourceItem]:
    data = _load_json(Path(annotations), "COCO captions")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ImportFormatError(f"{annotations}: COCO captions JSON needs 'images' and 'annotations' lists")
    items: dict = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            report.add("malformed image entry", str(entry)[:80], "entry skipped")
            continue
        if entry["id"] in items:
            report.add("duplicate image id", str(entry["id"]), "first entry kept")
            continue
        items[entry["id"]] = SourceItem(Path(images) / entry["file_name"], entry["file_name"], [], split,
                                        {"id": entry["id"], "source": "coco"})
    seen_ann = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "image_id" not in ann:
            report.add("malformed annotation", str(ann)[:80], "annotation skipped")
            continue
        if "id" in ann:
            if ann["id"] in seen_ann:
                report.add("duplicate annotation id", str(ann["id"]), "first annotation kept")
                continue
            seen_ann.add(ann["id"])
        if ann["image_id"] not in items:
            report.add("caption for unknown image", str(ann["image_id"]), "caption dropped")
            continue
        items[ann["image_id"]].captions.append(ann.get("caption"))
    return list(items.values())


# ----------------------------------------------------------------------------- Karpathy


def karpathy_items(json_file: str | Path, images: str | Path, report: ImportReport) -> list[SourceItem]:
    data = _load_json(Path(json_file), "Karpathy split")
    if not isinstance(data.get("images"), list):
        raise ImportFormatError(f"{json_file}: Karpathy split JSON needs an 'images' list")
    items: dict = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            report.add("malformed image entry", str(entry)[:80], "entry skipped")
            continue
        name = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        if name in items:
            report.add("duplicate image id", name, "first entry kept")
            continue
        split = entry.get("split", "train")
        split = "train" if split == "restval" else split  # Karpathy's restval is training data
        captions = []
        for s in entry.get("sentences", []):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(s["tokens"])
            captions.append(raw)
        extra = {"source": "karpathy"}
        for key in ("cocoid", "imgid"):
            if key in entry:
                extra[key] = entry[key]
        items[name] = SourceItem(Path(images) / name, name, captions, split, extra)
    return list(items.values())


# ----------------------------------------------------------------------------- Flickr .token


def flickr_items(token_file: str | Path, images: str | Path, report: ImportReport, split: str) -> list[SourceItem]:
    path = Path(token_file)
    if not path.is_file():
        raise ImportFormatError(f"{path}: no such file")
    items: dict = {}
    seen = set()
    for line_no, line in text_lines(path, report):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_sign, k = key.partition("#")
        if not sep or not hash_sign or not name:
            report.add("malformed line", f"line {line_no}", "line skipped")
            continue
        if key in seen:
            report.add("duplicate caption id", key, "first caption kept")
            continue
        seen.add(key)
        item = items.setdefault(name, SourceItem(Path(images) / name, name, [], split, {"source": "flickr"}))
        item.captions.append(caption)
    return list(items.values())


# ----------------------------------------------------------------------------- folder + JSONL/CSV

_IMAGE_KEYS = ("image", "file", "file_name", "filename", "image_name", "path")
_CAPTION_KEYS = ("captions", "caption", "text", "comment")


def text_lines(path: Path, report: ImportReport) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is skipped and counted with
    its number and how it reads as cp1252 (the usual culprit), never silently altered."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                guess = raw.decode("cp1252", errors="replace").strip()[:60]
                report.add("undecodable text", f"line {line_no}: {guess!r} if cp1252", "line skipped (not UTF-8)")


def _rows(captions_file: Path, report: ImportReport) -> Iterator[dict]:
    suffix = captions_file.suffix.lower()
    if suffix == ".jsonl":
        for line_no, line in text_lines(captions_file, report):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                report.add("malformed line", f"line {line_no}", "line skipped")
                continue
            yield row
    elif suffix in (".csv", ".tsv"):
        lines = [line for _, line in text_lines(captions_file, report)]
        sample = "".join(lines[:50])
        delimiter = "\t" if suffix == ".tsv" else ("|" if sample.count("|") > sample.count(",") else ",")
        reader = csv.DictReader(lines, delimiter=delimiter, skipinitialspace=True)
        if reader.fieldnames:
            reader.fieldnames = [h.strip() for h in reader.fieldnames]
        yield from reader
    else:
        raise ImportFormatError(f"{captions_file}: captions must be a .jsonl, .csv or .tsv file")


def folder_items(captions_file: str | Path, images: str | Path, report: ImportReport) -> list[SourceItem]:
    """Rows naming the same image are merged (their captions joined); a CSV usually has one row per caption."""
    captions_file = Path(captions_file)
    if not captions_file.is_file():
        raise ImportFormatError(f"{captions_file}: no such file")
    items: dict = {}
    for row_no, row in enumerate(_rows(captions_file, report), start=1):
        image_key = next((k for k in _IMAGE_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        caption_key = next((k for k in _CAPTION_KEYS if k in row), None)
        if image_key is None or caption_key is None:
            report.add("malformed line", f"row {row_no}: needs one of {_IMAGE_KEYS} and one of {_CAPTION_KEYS}",
                       "line skipped")
            continue
        name = row[image_key].strip()
        value = row[caption_key]
        captions = value if isinstance(value, list) else [value]
        if name in items:
            report.add("repeated image", name, "captions merged into the first row")
            items[name].captions.extend(captions)
            continue
        split = row.get("split") if isinstance(row.get("split"), str) and row.get("split") else "train"
        items[name] = SourceItem(Path(images) / name, name, list(captions), split, {"source": "folder"})
    return list(items.values())
