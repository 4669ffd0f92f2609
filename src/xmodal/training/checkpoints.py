"""Checkpoints that survive crashes and damage: the last K kept, each with a SHA-256.

A run folder holds `checkpoint.pt` (newest), `checkpoint-1.pt`, `checkpoint-2.pt`, ... (older),
each beside `<name>.sha256` (its digest and step). A new checkpoint is written to a temporary
file, read back and verified before any older one is moved or deleted, so a crash at any
moment leaves at least one intact checkpoint. `latest_intact` checks the digests newest first
and falls back, saying why, past a damaged or truncated file; the damaged ones are set aside
as `*.damaged` so that later rotations never keep them in place of good ones.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same clear error
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def slots(folder: Path, keep: int) -> list[Path]:
    """The checkpoint files of a run, newest first."""
    return [folder / CHECKPOINT, *(folder / f"checkpoint-{i}.pt" for i in range(1, keep))]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _move(src: Path, dst: Path) -> None:
    if src.exists():
        os.replace(src, dst)
    if _sidecar(src).exists():
        os.replace(_sidecar(src), _sidecar(dst))


def save(state: dict, folder: Path, keep: int = 3) -> Path:
    """Write `state` as the newest checkpoint, keeping the `keep` newest."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    checksum = digest(tmp)
    if int(load_checkpoint(tmp)["step"]) != int(state["step"]) or digest(tmp) != checksum:  # read back
        raise OSError(f"{tmp}: the checkpoint just written does not read back; the older ones are kept")
    (folder / (CHECKPOINT + ".tmp.sha256")).write_text(f"{checksum} {state['step']}\n")
    names = slots(folder, keep)
    for older, newer in zip(reversed(names[1:]), reversed(names[:-1])):  # shift: oldest falls off
        _move(newer, older)
    os.replace(tmp, names[0])
    os.replace(folder / (CHECKPOINT + ".tmp.sha256"), _sidecar(names[0]))
    return names[0]


def check(path: Path) -> str | None:
    """None when the file matches its recorded digest, else why it does not."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return "no checksum recorded"
    expected = sidecar.read_text().split()[:1]
    if not expected or digest(path) != expected[0]:
        return "checksum mismatch (damaged or truncated)"
    return None


def latest_intact(folder: Path, keep: int, log: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint whose digest matches, loaded; None when the run has none at all.
    A checkpoint from before checksums (no .sha256 anywhere) is loaded with a warning."""
    present = [p for p in slots(folder, keep) if p.is_file()]
    if not present:
        return None
    legacy = not any(_sidecar(p).is_file() for p in present)
    problems = []
    for path in present:
        reason = None if legacy else check(path)
        if reason is None:
            try:
                state = load_checkpoint(path)
            except ValueError as e:
                reason = str(e)
            else:
                if legacy:
                    log(f"{path}: written before checkpoints had checksums; loaded unverified")
                if problems:
                    log(f"resuming from {path.name} (step {state['step']}): " + "; ".join(problems))
                return path, state
        problems.append(f"{path.name} is unusable: {reason}")
        _set_aside(path)
    raise ValueError(f"{folder}: no intact checkpoint: " + "; ".join(problems))


def _set_aside(path: Path) -> None:
    os.replace(path, path.with_name(path.name + ".damaged"))
    if _sidecar(path).exists():
        os.replace(_sidecar(path), _sidecar(path).with_name(_sidecar(path).name + ".damaged"))
