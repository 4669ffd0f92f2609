"""WebDataset shards: the prepared format as tar files, for data that outgrows memory or a
disk's patience with many small files.

A shard is a plain POSIX tar holding, per record, `KEY.png` (the image as stored) and
`KEY.json` (the record: captions, split and every other field; its `"image"` is `KEY.png`),
the layout the `webdataset` library reads. `write_shards` writes them; `ShardDataset` streams
them: only the records' metadata (captions) is kept in memory, the pictures are read one shard
at a time.

**When to use which.** A prepared folder (`images/` + `captions.jsonl`) is simplest, allows
random access and is right for up to a few hundred thousand images on a local disk. Shards are
for larger sets, network or slow disks, and many data-parallel workers: reads are sequential,
one file per few thousand images, and each DDP rank reads its own shards.

**Order and exact resume.** Training reads the stream of epoch `e` as: the shards in the order
of a permutation drawn from `(seed, e)` (with DDP, rank r takes every world-th of them), each
shard's records in a permutation drawn from `(seed, e, shard)`. Batch `s` of an epoch is items
`s*B .. (s+1)*B - 1` of that stream, and its random augmentations draw from an RNG seeded by the
step, so the batch of a step is a function of the step, with or without a DataLoader worker: a
resumed run skips to its step (whole shards by their counts, without reading their pictures) and
reads exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from xmodal.data.images import load_image


class ShardError(ValueError):
    """A shard pattern or file that cannot be read; the message names it."""


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard_pattern(path: str) -> bool:
    return str(path).endswith(".tar") or bool(_BRACES.search(str(path)))


def expand_pattern(pattern: str) -> list[Path]:
    """`data/fashion-{000000..000013}.tar` -> the 14 paths (zero-padded like the pattern); every
    file must exist."""
    match = _BRACES.search(pattern)
    if match is None:
        paths = [Path(pattern)]
    else:
        first, last = match.group(1), match.group(2)
        if int(last) < int(first):
            raise ShardError(f"{pattern}: empty range {{{first}..{last}}}")
        width = len(first)
        paths = [Path(pattern[: match.start()] + str(i).zfill(width) + pattern[match.end():])
                 for i in range(int(first), int(last) + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ShardError(f"{pattern}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return paths


def write_shards(records: Iterable[tuple[dict, bytes]], folder: Path, prefix: str, shard_size: int) -> list[str]:
    """Write (record, PNG bytes) pairs into `folder/PREFIX-000000.tar`, ... with `shard_size`
    records each; returns the shard file names. A record's key is its image name's stem."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    records, names = iter(records), []
    while chunk := list(itertools.islice(records, shard_size)):
        names.append(f"{prefix}-{len(names):06d}.tar")
        with tarfile.open(folder / names[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for record, png in chunk:
                key = Path(record["image"]).stem
                meta = json.dumps({**record, "image": f"{key}.png"}, ensure_ascii=False).encode()
                for name, data in ((f"{key}.png", png), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no clock in the bytes
                    tar.addfile(info, io.BytesIO(data))
    return names


def _members(path: Path, with_images: bool) -> Iterator[tuple[dict, bytes | None]]:
    """(record, PNG bytes or None) of one shard, in stored order."""
    try:
        with tarfile.open(path, "r:") as tar:
            pending: dict[str, dict] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "json":
                    record = json.loads(tar.extractfile(member).read())
                    pending.setdefault(key, {})["record"] = record
                elif ext == "png":
                    pending.setdefault(key, {})["png"] = tar.extractfile(member).read() if with_images else b""
                else:
                    continue
                entry = pending[key]
                if "record" in entry and "png" in entry:
                    del pending[key]
                    yield entry["record"], entry["png"] if with_images else None
            if pending:
                key = next(iter(pending))
                raise ShardError(f"{path}: record {key!r} lacks its {'json' if 'png' in pending[key] else 'png'}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: unreadable shard ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: a record is not valid JSON ({e})") from None


class ShardDataset(IterableDataset):
    """Streams a shard pattern: items (image tensor, captions, record), like `CaptionDataset`.

    `records` holds every record's metadata (so a vocabulary can be built from the captions);
    pictures are read a shard at a time. `batches(...)` gives the training stream (module doc).
    """

    def __init__(self, pattern: str, split: str | None = None, transform: Callable | None = None):
        self.pattern, self.split = pattern, split
        self.paths = expand_pattern(pattern)
        if transform is None:
            from xmodal.data.images import make_transform
            transform = make_transform("shapes64")
        self.transform = transform
        self.records: list[dict] = []
        self.counts: list[int] = []  # records of `split` per shard
        for path in self.paths:
            kept = [r for r, _ in _members(path, with_images=False) if split is None or r.get("split") == split]
            self.records += kept
            self.counts.append(len(kept))
        if not self.records:
            raise ShardError(f"{pattern}: no records{f' with split {split!r}' if split else ''}")

    def __len__(self) -> int:
        return len(self.records)

    def _item(self, record: dict, png: bytes):
        image = self.transform(load_image(io.BytesIO(png), name=f"{self.pattern}:{record['image']}"))
        return image, record["captions"], record

    def _shard_items(self, index: int) -> list[tuple[dict, bytes]]:
        return [(r, png) for r, png in _members(self.paths[index], with_images=True)
                if self.split is None or r.get("split") == self.split]

    def _stored(self) -> Iterator[tuple[dict, bytes]]:
        for i in range(len(self.paths)):
            yield from self._shard_items(i)

    def __iter__(self):
        """Every item once, in stored order (evaluation, export)."""
        return (self._item(record, png) for record, png in self._stored())

    def take(self, count: int) -> list[tuple[dict, Image.Image]]:
        """The first `count` (record, PIL image) pairs in stored order, read into memory."""
        return [(record, load_image(io.BytesIO(png), name=f"{self.pattern}:{record['image']}"))
                for record, png in itertools.islice(self._stored(), count)]

    # ------------------------------------------------------------------ training stream

    def _decode(self, pairs: list, seed: int, step: int, rank: int) -> list:
        """The items of one batch; random augmentations draw from an RNG seeded by (seed, step,
        rank), so they are the same in a resumed run and in a DataLoader worker."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1_000_003 + step) * 64 + rank)
            return [self._item(record, png) for record, png in pairs]

    def _epoch_shards(self, seed: int, epoch: int, rank: int, world: int) -> list[int]:
        order = torch.randperm(len(self.paths), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return order.tolist()[rank::world]

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        """Batches per epoch: the fewest any rank can fill in any epoch (each rank reads its own
        shards, drawn anew every epoch, so at least the len(paths) // world smallest ones)."""
        if len(self.paths) < world:
            raise ShardError(f"{self.pattern}: {len(self.paths)} shard(s) for {world} processes; "
                             "each process needs at least one (write smaller shards)")
        per_rank = batch_size // world
        fewest = sum(sorted(self.counts)[: len(self.paths) // world])
        if fewest < per_rank:
            raise ShardError(f"{self.pattern}: {fewest} records for a process, fewer than one batch of {per_rank}")
        return fewest // per_rank

    def batches(self, batch_size: int, seed: int, start: int, total: int, rank: int = 0,
                world: int = 1) -> Iterator[list]:
        """The item lists of steps start..total-1 for this rank (`batch_size` is the global batch)."""
        per_epoch = self.steps_per_epoch(batch_size, world)
        per_rank = batch_size // world
        step = start
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            stop = min(total, (epoch + 1) * per_epoch)  # this epoch's last step + 1
            skip, batch = offset * per_rank, []
            for shard in self._epoch_shards(seed, epoch, rank, world):
                if skip >= self.counts[shard]:
                    skip -= self.counts[shard]  # a resumed run passes whole shards without reading them
                    continue
                items = self._shard_items(shard)
                order = torch.randperm(len(items), generator=torch.Generator().manual_seed(
                    (seed * 1_000_003 + epoch) * 1_000_033 + shard)).tolist()
                for j in order[skip:]:
                    batch.append(items[j])
                    if len(batch) == per_rank:
                        yield self._decode(batch, seed, step, rank)
                        batch, step = [], step + 1
                        if step == stop:
                            break
                skip = 0
                if step == stop:
                    break
            step = stop  # the epoch's remainder (less than a batch) is dropped


class StepBatches(IterableDataset):
    """The training stream of a `ShardDataset` as a DataLoader source: one item list per step."""

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int, start: int, total: int,
                 rank: int = 0, world: int = 1):
        self.args = dataset, batch_size, seed, start, total, rank, world

    def __iter__(self):
        dataset, *rest = self.args
        return dataset.batches(*rest)
