"""`xmodal index` / `xmodal search`: text -> images and image -> captions with a dual encoder
(`AlignmentPipeline`), answered from an embedding index built once.

The index of a collection (a prepared data set, or any folder of images) for one model lives
beside the data: `DATA/.xmodal-index/<model key>.npz` holds the unit image embeddings (N, E),
the embeddings of the collection's distinct captions, and a manifest: every image's path, size
and modification time, the captions, and the model's identity (its folder and a fingerprint of
its weights). `load_index` refreshes it when anything changed: images that are new or changed
are embedded again, removed ones dropped, and a different model (or retrained weights) builds a
new one. The index is written atomically (temporary file, then rename); a corrupt or foreign
file is rebuilt, never trusted; a folder that cannot be written keeps the index in memory with a
warning. A query is then one text (or image) embedding and one matrix product.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmodal.data.files import expand_images
from xmodal.data.images import load_image
from xmodal.data.prepared import CAPTIONS_FILE, read_records

INDEX_FOLDER = ".xmodal-index"
FORMAT = 2


@dataclass
class Index:
    """Embeddings of a collection's images and captions under one model."""

    model: str  # the model's folder
    model_fingerprint: str
    paths: list[str]  # image paths relative to the collection folder
    stats: list[tuple[int, int]]  # (size, mtime_ns) of each image when embedded
    image_embeddings: np.ndarray  # (N, E) float32, unit rows
    captions: list[str]  # distinct captions (prepared data sets; empty for a plain folder)
    caption_images: list[int]  # for each caption, the first image (index into `paths`) that has it
    caption_embeddings: np.ndarray  # (C, E)
    titles: list[str]  # each image's first caption ("" in a plain folder), shown with its hits


def _model_identity(model: str) -> tuple[Path, str]:
    """The model's folder and a fingerprint of its config and weights (size, mtime)."""
    from xmodal.models.hub import resolve_model_dir

    folder = resolve_model_dir(model).resolve()
    digest = hashlib.sha1(str(folder).encode())
    for name in sorted(os.listdir(folder)):
        stat = (folder / name).stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return folder, digest.hexdigest()[:16]


def index_path(data: Path, model_folder: Path) -> Path:
    """Where the index of `data` under that model is kept: named by the model folder's name and a
    short hash of its full path (two models of one name never share a file)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_folder.name)[:60]
    return data / INDEX_FOLDER / f"{safe}-{hashlib.sha1(str(model_folder).encode()).hexdigest()[:8]}.npz"


def collection(data: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """(image paths relative to `data`, in order; distinct captions; each image's captions)."""
    if (data / CAPTIONS_FILE).is_file():
        records = read_records(data)
        seen: dict[str, list[str]] = {}
        for r in records:  # an image listed twice keeps every caption once
            caps = seen.setdefault(r["image"], [])
            caps += [c for c in r["captions"] if c not in caps]
        paths = list(seen)
        captions = list(dict.fromkeys(c for caps in seen.values() for c in caps))
        return paths, captions, [seen[p] for p in paths]
    files = expand_images([data])
    paths = [p.relative_to(data).as_posix() for p in files if INDEX_FOLDER not in p.parts]
    return paths, [], [[] for _ in paths]


def _stat(data: Path, relative: str) -> tuple[int, int]:
    try:
        stat = (data / relative).stat()
    except OSError:
        return (-1, -1)
    return stat.st_size, stat.st_mtime_ns


def _read(path: Path) -> Index | None:
    """The stored index, or None when it is missing, corrupt or of another format."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            manifest = json.loads(bytes(stored["manifest"]).decode("utf-8"))
            if manifest.get("format") != FORMAT:
                return None
            index = Index(manifest["model"], manifest["model_fingerprint"], manifest["paths"],
                          [tuple(s) for s in manifest["stats"]], stored["images"].astype(np.float32),
                          manifest["captions"], manifest["caption_images"], stored["captions"].astype(np.float32),
                          manifest["titles"])
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as e:  # a damaged file of any kind is rebuilt, not trusted
        warnings.warn(f"{path}: unreadable index ({type(e).__name__}); building it again", stacklevel=3)
        return None
    n, c = len(index.paths), len(index.captions)
    if index.image_embeddings.shape[0] != n or len(index.stats) != n or index.caption_embeddings.shape[0] != c \
            or len(index.titles) != n \
            or len(index.caption_images) != c:
        warnings.warn(f"{path}: inconsistent index; building it again", stacklevel=3)
        return None
    return index


def _write(index: Index, path: Path) -> None:
    manifest = {"format": FORMAT, "model": index.model, "model_fingerprint": index.model_fingerprint,
                "paths": index.paths, "stats": index.stats, "captions": index.captions,
                "caption_images": index.caption_images, "titles": index.titles}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        with open(partial, "wb") as f:
            np.savez(f, images=index.image_embeddings.astype(np.float16), captions=index.caption_embeddings.astype(np.float16),
                     manifest=np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8))
        os.replace(partial, path)
    except OSError as e:
        warnings.warn(f"{path}: cannot store the index ({e.strerror}); it is kept in memory for this call", stacklevel=3)


def load_index(model: str, data: str | Path, pipe=None, batch_size: int = 256, log=None) -> tuple[Index, object]:
    """The up-to-date index of `data` under `model` (built or refreshed as needed), and the
    model's pipeline (`pipe`, or loaded here)."""
    from xmodal.pipelines import load_pipeline

    data = Path(data)
    if not data.is_dir():
        what = "not a folder" if data.exists() else "no such folder"
        raise ValueError(f"{data}: {what} (give a prepared data set or a folder of images)")
    folder, fingerprint = _model_identity(model)
    path = index_path(data, folder)
    paths, captions, image_captions = collection(data)
    if not paths:
        raise ValueError(f"{data}: no images to index")
    stats = [_stat(data, p) for p in paths]
    old = _read(path)
    if old is not None and (old.model != str(folder) or old.model_fingerprint != fingerprint):
        old = None  # another model, or the same one retrained: nothing can be reused
    if old is not None and old.paths == paths and old.stats == stats and old.captions == captions:
        return old, pipe
    pipe = pipe or load_pipeline(model, "image-text-alignment")
    dim = pipe.model.config.embed_dim
    reuse = {p: i for i, p in enumerate(old.paths)} if old is not None else {}
    images = np.zeros((len(paths), dim), np.float32)
    fresh = []
    for i, (p, s) in enumerate(zip(paths, stats)):
        if p in reuse and old.stats[reuse[p]] == s:
            images[i] = old.image_embeddings[reuse[p]]
        else:
            fresh.append(i)
    readable = np.ones(len(paths), bool)
    for start in range(0, len(fresh), batch_size):
        loaded, rows = [], []
        for i in fresh[start:start + batch_size]:
            try:
                loaded.append(load_image(data / paths[i]))
                rows.append(i)
            except Exception as e:  # noqa: BLE001  (an unreadable image is left out and named)
                readable[i] = False
                print(f"index: {paths[i]} left out ({e})", file=sys.stderr)
        if loaded:
            images[rows] = pipe.embed_images(loaded).float().cpu().numpy()
        if log:
            log(f"index: embedded {min(start + batch_size, len(fresh))}/{len(fresh)} images")
    caption_embeddings = _caption_embeddings(captions, old, pipe)
    keep = np.flatnonzero(readable)
    row = {int(i): r for r, i in enumerate(keep)}
    first: dict[str, int] = {}  # a caption's first readable image
    for i in keep:
        for c in image_captions[i]:
            first.setdefault(c, row[int(i)])
    kept = [i for i, c in enumerate(captions) if c in first]
    index = Index(str(folder), fingerprint, [paths[i] for i in keep], [stats[i] for i in keep], images[keep],
                  [captions[i] for i in kept], [first[captions[i]] for i in kept], caption_embeddings[kept],
                  [image_captions[i][0] if image_captions[i] else "" for i in keep])
    _write(index, path)
    return index, pipe


def _caption_embeddings(captions: list[str], old: Index | None, pipe) -> np.ndarray:
    """Each caption's embedding: from the old index where it has it, else embedded now."""
    rows = {c: i for i, c in enumerate(old.captions)} if old is not None else {}
    out = np.zeros((len(captions), pipe.model.config.embed_dim), np.float32)
    new = [i for i, c in enumerate(captions) if c not in rows]
    for i, c in enumerate(captions):
        if c in rows:
            out[i] = old.caption_embeddings[rows[c]]
    if new:
        out[new] = pipe.embed_texts([captions[i] for i in new]).float().cpu().numpy()
    return out


def _rank(scores: np.ndarray, top: int) -> np.ndarray:
    top = min(top, len(scores))
    best = np.argpartition(-scores, top - 1)[:top]
    return best[np.argsort(-scores[best], kind="stable")]


def _check_query(text: str | None, image: str | Path | None, top: int) -> None:
    if (text is None) == (image is None):
        raise ValueError("give exactly one of text or image")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")


def open_index(model: str, data: str | Path) -> tuple[Index, object]:
    """The up-to-date index and the model's pipeline, loaded once for any number of queries."""
    from xmodal.pipelines import load_pipeline

    index, pipe = load_index(model, data)
    return index, pipe or load_pipeline(model, "image-text-alignment")


def query(index: Index, pipe, data: Path, text: str | None = None, image: str | Path | None = None,
          top: int = 5) -> list[dict]:
    """The `top` best matches: `{"image", "score"}` (and the image's first caption in a data set)
    for a text query; `{"caption", "image",
    "score"}` for an image query (the caption, and a drawing of the collection that has it)."""
    _check_query(text, image, top)
    if text is not None:
        if not text.strip():
            raise ValueError("empty text query")
        vector = pipe.embed_texts([text])[0].float().cpu().numpy()
        scores = index.image_embeddings @ vector
        return [{"image": str(data / index.paths[i]), "score": round(float(scores[i]), 4),
                 **({"caption": index.titles[i]} if index.titles[i] else {})} for i in _rank(scores, top)]
    if not index.captions:
        raise ValueError(f"{data}: an image query ranks a data set's captions, and this folder has none "
                         f"(no {CAPTIONS_FILE}; make one with `xmodal data ...`)")
    vector = pipe.embed_images([load_image(image)])[0].float().cpu().numpy()
    scores = index.caption_embeddings @ vector
    return [{"caption": index.captions[i], "image": str(data / index.paths[index.caption_images[i]]),
             "score": round(float(scores[i]), 4)} for i in _rank(scores, top)]


def search(model: str, folder: str | Path, text: str | None = None, image: str | Path | None = None,
           top: int = 5) -> list[dict]:
    """One query through the index (built or refreshed first when needed)."""
    _check_query(text, image, top)  # before anything is loaded
    index, pipe = open_index(model, folder)
    return query(index, pipe, Path(folder), text=text, image=image, top=top)


def read_queries(path: str | Path) -> list[dict]:
    """`--queries-file`: one JSON object per line, {"text": ...} or {"image": ...} (and an optional
    "id"); a bad line becomes {"error": ...} for that line, never the end of the run."""
    queries = []
    if not Path(path).is_file():
        raise ValueError(f"--queries-file {path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                queries.append({"line": line_no, "error": f"invalid JSON ({e.msg})"})
                continue
            if not isinstance(item, dict) or sum(k in item for k in ("text", "image")) != 1 \
                    or not all(isinstance(item.get(k, ""), str) for k in ("text", "image")):
                queries.append({"line": line_no, "error": 'expected {"text": "..."} or {"image": "path"}'})
                continue
            queries.append({"line": line_no, **item})
    return queries
