"""Damaged checkpoints: how many are detected, and does resume fall back to the previous one?

    python benchmarks/checkpoint_damage.py [--trials 100]

Trains a small real model (an autoencoder on Shapes) for 6 steps with a checkpoint every 2
(kept: steps 6, 4, 2), then, per trial, damages a copy of the newest checkpoint one way
(flip 1 byte, flip 300 bytes, zero a 4 KB block, truncate, append bytes) at a random place,
and resumes: detected = the damaged file was skipped; fell back = training resumed at step 4
with exactly checkpoint-1's weights. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from xmodal.data.collate import GenerationCollate
from xmodal.data.shapes import ShapesDataset
from xmodal.models.registry import create_model
from xmodal.training.checkpoints import load_checkpoint
from xmodal.training.loop import TrainConfig, Trainer


def trainer(out: Path) -> Trainer:
    torch.manual_seed(0)
    model = create_model("autoencoder", latent_channels=2, channels=(8, 8, 8))
    config = TrainConfig(out_dir=str(out), steps=6, batch_size=8, checkpoint_every=2, progress=False, device="cpu")
    return Trainer(model, ShapesDataset("train", 32, seed=1), config, collate_fn=GenerationCollate("first"))


def damage(data: bytes, how: str, rng: random.Random) -> bytes:
    data = bytearray(data)
    at = rng.randrange(len(data) - 4096)
    if how == "flip1":
        data[at] ^= 1 << rng.randrange(8)
    elif how == "flip300":
        data[at:at + 300] = bytes(b ^ 0xFF for b in data[at:at + 300])
    elif how == "zero4k":
        data[at:at + 4096] = bytes(4096)
    elif how == "truncate":
        data = data[:at]
    else:  # append
        data += bytes(rng.randrange(256) for _ in range(64))
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(0)
    kinds = ("flip1", "flip300", "zero4k", "truncate", "append")
    results = {k: {"trials": 0, "detected": 0, "fell_back": 0} for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        trainer(clean).train()
        previous = load_checkpoint(clean / "checkpoint-1.pt")["model"]
        for trial in range(args.trials):
            how = kinds[trial % len(kinds)]
            run = Path(tmp) / f"t{trial}"
            shutil.copytree(clean, run)
            newest = run / "checkpoint.pt"
            newest.write_bytes(damage(newest.read_bytes(), how, rng))
            resumed = trainer(run)
            with contextlib.redirect_stderr(io.StringIO()):
                resumed.resume()
            entry = results[how]
            entry["trials"] += 1
            entry["detected"] += (run / "checkpoint.pt.damaged").is_file()
            same = all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in previous.items())
            entry["fell_back"] += resumed.step == 4 and same
            shutil.rmtree(run)
    total = {k: sum(r[k] for r in results.values()) for k in ("trials", "detected", "fell_back")}
    print(json.dumps({"by_damage": results, **total, "detected_rate": total["detected"] / total["trials"],
                      "fell_back_rate": total["fell_back"] / total["trials"]}))


if __name__ == "__main__":
    main()
