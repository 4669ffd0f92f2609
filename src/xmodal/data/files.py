"""Finding image files: what a command line or a search folder means by "these images"."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to their image files (recursively, sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
        else:
            out.append(p)
    return out


def read_batches(paths: list[Path], batch_size: int, prepare=None):
    """(readable paths, their PIL images, [(path, ImageLoadError)]) per batch of `paths`, the next
    batch decoded on a thread while the caller works on this one (a model call releases the GIL;
    reading and preprocessing PNGs was a fifth of `xmodal caption DIR`). With `prepare`, the
    images are `prepare(image)` instead. An unreadable file is reported, not raised."""
    from concurrent.futures import ThreadPoolExecutor

    from xmodal.data.images import ImageLoadError, load_image

    def read(start: int):
        good, images, errors = [], [], []
        for path in map(Path, paths[start:start + batch_size]):
            try:
                image = load_image(path)
                images.append(image if prepare is None else prepare(image))
                good.append(path)
            except ImageLoadError as e:
                errors.append((path, e))
        return good, images, errors

    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
        ahead = pool.submit(read, 0) if paths else None
        for start in starts:
            batch = ahead.result()
            if start + batch_size < len(paths):
                ahead = pool.submit(read, start + batch_size)
            yield batch
