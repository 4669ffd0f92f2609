"""Fashion-MNIST (Xiao et al. 2017, https://arxiv.org/abs/1708.07747): 70,000 real product
photos, 28x28 grayscale, 10 classes, from the original idx files (Debian's
`dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist).

- `read_idx(path)`: an idx file (gzip or not) as a numpy array; a wrong magic number, a
  header that disagrees with the file's length, or a truncated gzip is a clear error.
- Captions: a few natural templates per class (the first is canonical), and `class_of(caption)`,
  which reads the class a caption names (its garment word), for measuring captioners and
  generators alike.
- `import_fashion_mnist(source, out, split)`: the prepared format (`xmodal.data.prepared`),
  PNGs kept at 28x28 grayscale, each record with `"label"` and `"class"`. Splits: `train` = the
  first 55,000 training images, `val` = the last 5,000, `test` = the 10,000 t10k images.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TRAIN_COUNT = 55_000  # the first 55,000 training images; the last 5,000 are `val`
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLITS = ("train", "val", "test", "all")

# Caption templates per class; the first is canonical (what a captioner is trained to say). The
# last three of each are synonyms and descriptions: with a pretrained text encoder they give each
# class a wider patch of sentence space, so unseen words land nearer their class. They were
# chosen with the validation prompts below (VAL_NOVEL_PROMPTS: nearest training caption in
# MiniLM space right for 45% of them with the first three templates, 60% with all six); the
# test prompts (NOVEL_PROMPTS) were not used to choose them.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "t-shirt/top": ("a t-shirt", "a photo of a t-shirt", "a short-sleeved t-shirt",
                    "a casual t-shirt", "a vest", "a sleeveless vest"),
    "trouser": ("a pair of trousers", "trousers", "a photo of trousers", "pants", "a pair of pants", "long trousers"),
    "pullover": ("a pullover", "a photo of a pullover", "a long-sleeved pullover",
                 "a sweater", "a knitted sweater", "a wool sweater"),
    "dress": ("a dress", "a photo of a dress", "a woman's dress", "a long dress", "a maxi dress", "a short dress"),
    "coat": ("a coat", "a photo of a coat", "a warm coat", "an overcoat", "a raincoat", "a winter coat"),
    "sandal": ("a sandal", "a photo of a sandal", "an open sandal", "sandals", "a strappy sandal", "open-toed shoes"),
    "shirt": ("a shirt", "a photo of a shirt", "a buttoned shirt",
              "a collared shirt", "a long-sleeved shirt", "a checked shirt"),
    "sneaker": ("a sneaker", "a photo of a sneaker", "a low sneaker", "sneakers", "a sports shoe", "athletic shoes"),
    "bag": ("a bag", "a photo of a bag", "a bag with a handle", "a shoulder bag", "a shopping bag", "a satchel"),
    "ankle boot": ("an ankle boot", "a photo of an ankle boot", "a short ankle boot", "a boot", "boots", "a heeled boot"),
}

# Validation prompts for choosing templates: garment words in no training caption and none of
# NOVEL_PROMPTS's, with the class they mean.
VAL_NOVEL_PROMPTS: dict[str, str] = {
    "slacks": "trouser", "a pair of chinos": "trouser", "a purse": "bag", "a tote": "bag",
    "a sweatshirt": "pullover", "a cardigan": "pullover", "plimsolls": "sneaker", "kicks": "sneaker",
    "a button-down": "shirt", "a polo": "shirt", "a parka": "coat", "an anorak": "coat", "a gown": "dress",
    "a sundress": "dress", "a tee": "t-shirt/top", "a singlet": "t-shirt/top", "slides": "sandal",
    "an espadrille": "sandal", "chukkas": "ankle boot", "a wellington": "ankle boot",
}

# Prompts whose garment words appear in no training caption (open vocabulary through a
# pretrained text encoder), with the class they mean. Fixed before any model was measured.
NOVEL_PROMPTS: dict[str, str] = {
    "a pair of jeans": "trouser", "a handbag": "bag", "a jumper": "pullover", "trainers": "sneaker",
    "a blouse": "shirt", "a leather jacket": "coat", "a summer frock": "dress",
    "a tank top": "t-shirt/top", "flip-flops": "sandal", "booties": "ankle boot",
}

# The words that name each class in a caption, matched on its words as `tokenize` splits them
# ("a t-shirt" -> "a t shirt"); first match wins, longer phrases first.
_CLASS_WORDS = [("ankle boot", "ankle boot"), ("t shirt", "t-shirt/top"), ("tshirt", "t-shirt/top"),
                ("vest", "t-shirt/top"), ("trousers", "trouser"), ("trouser", "trouser"), ("pants", "trouser"),
                ("pullover", "pullover"), ("sweater", "pullover"), ("dress", "dress"), ("overcoat", "coat"),
                ("raincoat", "coat"), ("coat", "coat"), ("open toed shoe", "sandal"), ("sandal", "sandal"),
                ("shirt", "shirt"), ("sneaker", "sneaker"), ("sports shoe", "sneaker"), ("athletic shoe", "sneaker"),
                ("bag", "bag"), ("satchel", "bag"), ("boot", "ankle boot")]
_CLASS_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w, _ in _CLASS_WORDS) + r")s?\b")


class IdxFormatError(ValueError):
    """An idx file that cannot be read; the message names the file and the problem."""


def class_of(caption: str) -> str | None:
    """The class a caption names by its garment word ("a pair of trousers" -> "trouser"), or None."""
    from xmodal.data.text import tokenize

    match = _CLASS_RE.search(" ".join(tokenize(caption)))
    if match is None:
        return None
    word = match.group(1)
    return next(cls for w, cls in _CLASS_WORDS if w == word)


def captions_for(label: int) -> list[str]:
    return list(TEMPLATES[CLASSES[label]])


def _find(source: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (source / name).is_file():
            return source / name
    raise IdxFormatError(f"{source}: no {stem} or {stem}.gz (the Fashion-MNIST idx files; "
                         "apt-get install dataset-fashion-mnist, or --source DIR)")


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzip or not) as a uint8 array of its stated shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise IdxFormatError(f"{path}: no such file") from None
    except (EOFError, OSError, zlib.error) as e:
        raise IdxFormatError(f"{path}: corrupt or truncated gzip ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise IdxFormatError(f"{path}: not an idx file of unsigned bytes (magic {raw[:4].hex() or 'missing'}, "
                             "expected 0000 08 followed by 01..04 dimensions)")
    dims = raw[3]
    if len(raw) < 4 + 4 * dims:
        raise IdxFormatError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    expected = math.prod(shape)  # Python ints: a corrupt header cannot overflow
    body = len(raw) - 4 - 4 * dims
    if body != expected:
        raise IdxFormatError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds {body} "
                             f"bytes ({'truncated' if body < expected else 'trailing data'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(source: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of the `train` or `test` files in `source`."""
    source = Path(source)
    images_stem, labels_stem = FILES[part]
    images, labels = read_idx(_find(source, images_stem)), read_idx(_find(source, labels_stem))
    if images.ndim != 3 or labels.ndim != 1:
        raise IdxFormatError(f"{source}/{images_stem}: expected images (N, H, W) and labels (N,), "
                             f"got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise IdxFormatError(f"{source}: {len(images)} {part} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise IdxFormatError(f"{source}/{labels_stem}: label {int(labels.max())} is not one of 0..{len(CLASSES) - 1}")
    return images, labels


def split_items(source: str | Path, split: str):
    """(split name, index in its file, image, label) for every image of `split`, in order. Every
    file the split needs is read and checked before the first item is given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    parts = {part: load_split(source, part) for part in ("train", "test")
             if split == "all" or (part == "test") == (split == "test")}
    if "train" in parts:
        images, labels = parts["train"]
        cut = min(TRAIN_COUNT, len(images))
        for name, indices in (("train", range(cut)), ("val", range(cut, len(images)))):
            if split in (name, "all"):
                for i in indices:
                    yield name, i, images[i], int(labels[i])
    if "test" in parts:
        images, labels = parts["test"]
        for i in range(len(images)):
            yield "test", i, images[i], int(labels[i])


def fashion_record(split: str, index: int, label: int, image_name: str) -> dict:
    return {"image": image_name, "captions": captions_for(label), "split": split, "label": label,
            "class": CLASSES[label], "index": index}


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def import_fashion_mnist(out: str | Path, source: str | Path = DEFAULT_SOURCE, split: str = "all",
                         fmt: str = "folder", shard_size: int = 5000, overwrite: bool = False,
                         progress: bool = True) -> dict:
    """Write `split` of Fashion-MNIST into `out`: a prepared folder (`fmt="folder"`), or WebDataset
    shards `out/SPLIT-000000.tar`, ... of `shard_size` records (`fmt="webdataset"`). Returns counts
    per split and, for shards, each split's shard pattern."""
    import itertools
    import time

    from tqdm import tqdm

    from xmodal.data.prepared import RecordWriter, staged_folder
    from xmodal.data.shards import write_shards

    if fmt not in ("folder", "webdataset"):
        raise ValueError(f"format {fmt!r} is not one of ('folder', 'webdataset')")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    source = Path(source)
    start = time.perf_counter()
    counts: dict[str, int] = {}
    stream = split_items(source, split)
    first = next(stream, None)  # every file read and checked before anything is written

    def items():
        for name, index, pixels, label in tqdm(itertools.chain([first] if first else [], stream),
                                               desc=f"fashion-mnist {split}", unit="img", disable=not progress,
                                               mininterval=1.0):
            counts[name] = counts.get(name, 0) + 1
            yield fashion_record(name, index, label, f"images/{name}-{index:05d}.png"), pixels

    result: dict = {}
    with staged_folder(out, overwrite, keep_out=(source,)) as folder:
        if fmt == "folder":
            with RecordWriter(folder) as writer:
                for record, pixels in items():
                    (folder / record["image"]).write_bytes(_png(pixels))
                    writer.write(record)
        else:
            by_split: dict[str, list] = {}
            for record, pixels in items():  # grouped so that each split has shards of its own
                by_split.setdefault(record["split"], []).append((record, _png(pixels)))
            result["shards"] = {}
            for name, pairs in by_split.items():
                shards = write_shards(pairs, folder, name, shard_size)
                last = len(shards) - 1
                result["shards"][name] = f"{Path(out) / name}-{{000000..{last:06d}}}.tar"
    seconds = time.perf_counter() - start
    return {"out": str(out), "format": fmt, "counts": counts, **result, "seconds": round(seconds, 2)}
