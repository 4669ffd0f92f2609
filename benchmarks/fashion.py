"""Fashion-MNIST in both directions: the captioner, the generators, and training from shards.

    xmodal data fashion-mnist data/fashion-mnist          # once (Debian's dataset-fashion-mnist)
    python benchmarks/fashion.py captioner [--model fashion-captioner] [--bf16]
    python benchmarks/fashion.py generator [--model fashion-generator (= fashion-gan)] [--count 1000]
    python benchmarks/fashion.py compare [--models fashion-cvae,fashion-gan]   # one row per generator
    python benchmarks/fashion.py shards [--steps 150]     # steps/s from shards against a folder

captioner: the class the caption names on all 10,000 test images (greedy), per class, and
captions/s batched (256) with the median latency of one image (greedy too).
generator: one image per test record, drawn from its canonical caption and from the
open-vocabulary prompts of its class (`xmodal evaluate generator --prompts novel`), class read
back by `fashion-captioner`; FID / KID in that captioner's feature space against the real test
images, next to real training images (the floor) and each class's mean image (the prototype
reference, what collapse looks like); images/s batched (128); diversity: how different 16 seeds
of one prompt are, against 16 real photos of the class (1 = as varied, 0 = collapsed).
compare: the generator measures for several models, with the training time from each card.
shards: the captioner recipe's steps/s reading the training set from a folder and from
WebDataset shards (written to a temporary folder), same steps, same threads.
Everything goes through the tasks' `measure` (via `xmodal.evaluation`), as `xmodal evaluate` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import xmodal
from xmodal import evaluation
from xmodal.data.prepared import read_records
from xmodal.models.hub import resolve_model_dir

REPO = Path(__file__).resolve().parents[1]


def best_rate(pipe, inputs: list, batch_size: int, repeats: int = 3, **options) -> float:
    """Items per second through `pipe` in batches, the best of `repeats` runs after a warm-up."""
    pipe(inputs[:8], **options)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(inputs, batch_size=batch_size, **options)
        rates.append(len(inputs) / (time.perf_counter() - start))
    return round(max(rates), 1)


def captioner(args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        metrics = evaluation.evaluate_captioner(args.model, args.data, out, split="test", limit=0, beam=1,
                                                meteor=False)
    pipe = xmodal.load(args.model)
    records = read_records(args.data, "test")[:1024]
    images = [Image.open(Path(args.data) / r["image"]).convert("RGB") for r in records]
    rate = best_rate(pipe, images, 256, method="greedy")  # decoded as the accuracy above is
    latencies = []
    for image in images[:50]:
        start = time.perf_counter()
        pipe([image], method="greedy")
        latencies.append(time.perf_counter() - start)
    keep = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and k != "seconds"}
    return {"model": args.model, "test_images": metrics["images"], **keep, "captions_per_s_batched": rate,
            "single_image_ms_median": round(1000 * statistics.median(latencies), 2), "threads": torch.get_num_threads()}


def generator(args) -> dict:
    result: dict = {"model": args.model, "count": args.count, "threads": torch.get_num_threads()}
    for prompts in ("canonical", "novel"):
        with tempfile.TemporaryDirectory() as out:
            metrics = evaluation.evaluate_generator(args.model, args.data, out, split="test", limit=args.count,
                                                    seed=args.seed, prompts=prompts)
        result[prompts] = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and k != "seconds"}
    pipe = xmodal.load(args.model)
    prompts = ["a pair of trousers", "a dress", "an ankle boot", "a bag"] * 32
    result["images_per_s_batched"] = best_rate(pipe, prompts, 128)
    result["diversity"] = diversity(pipe, args)
    return result


def diversity(pipe, args, seeds: int = 16) -> dict:
    """At each class's canonical prompt, the mean pixel distance (L1, pixels in [0, 1]) between
    pictures of different seeds, over the same for 16 real test pictures of that class: 1 is as
    varied as real photos, 0 is one picture for every seed. With --grid, the 16-seed grid."""
    import numpy as np

    from xmodal.data.fashion import CLASSES, TEMPLATES

    records = read_records(args.data, "test")
    ratios, rows = {}, []

    def spread(images) -> float:
        x = np.stack([np.asarray(im.convert("L"), np.float32) / 255 for im in images])
        return float(np.mean([np.abs(x[i] - x[j]).mean() for i in range(len(x)) for j in range(i + 1, len(x))]))

    for cls in CLASSES:
        prompt = TEMPLATES[cls][0]
        drawn = pipe([prompt], n=seeds, seed=0)
        real = [Image.open(Path(args.data) / r["image"]) for r in records if r["class"] == cls][:seeds]
        ratios[cls] = round(spread(drawn) / spread(real), 3)
        rows.append((prompt, drawn))
    if args.grid:
        from xmodal.sheets import seed_grid

        seed_grid(rows, args.grid)
    return {"mean_ratio_to_real": round(float(np.mean(list(ratios.values()))), 3), "per_class": ratios}


def card_minutes(name: str) -> float | None:
    """The first "N minutes" on the model's card: its recipe's training time as measured when trained."""
    import re

    card = resolve_model_dir(name) / "README.md"
    found = re.search(r"([0-9.]+)\s+minutes", card.read_text() if card.is_file() else "")
    return float(found.group(1)) if found else None


def compare(args) -> dict:
    """The generators side by side: one `generator` row each, with the training time on its card."""
    rows = []
    for name in args.models.split(","):
        args.model = name
        rows.append({**generator(args), "training_minutes": card_minutes(name)})
    return {"generators": rows}


def shards(args) -> dict:
    from xmodal.data.fashion import import_fashion_mnist
    from xmodal.training.recipes import run_training

    config = REPO / "configs" / "fashion-captioner.toml"
    common = [f"--train.steps={args.steps}", "--train.eval_every=0", "--train.checkpoint_every=0",
              "--train.progress=false", "--data.eval_count=0", "--data.cache_images=false"]  # both read every file
    out: dict = {"steps": args.steps, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        written = import_fashion_mnist(Path(tmp) / "shards", args.source, "train", "webdataset", 5000, progress=False)
        sources = {"folder": [f"--data.path={args.data}"],
                   "shards": [f"--data.path={written['shards']['train']}"]}
        for name, data in sources.items():
            summary = run_training(config, [*common, *data, f"--train.out_dir={Path(tmp) / name}"])
            out[f"{name}_steps_per_s"] = summary["steps_per_s"]
    out["shards_over_folder"] = round(out["shards_steps_per_s"] / out["folder_steps_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["captioner", "generator", "compare", "shards"])
    parser.add_argument("--model")
    parser.add_argument("--data", default="data/fashion-mnist", help="the prepared Fashion-MNIST folder")
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="idx files (shards)")
    parser.add_argument("--count", type=int, default=1000, help="generator: test records drawn")
    parser.add_argument("--models", default="fashion-cvae,fashion-gan", help="compare: generators, comma-separated")
    parser.add_argument("--grid", help="generator: write the 16-seed grid per class to this PNG")
    parser.add_argument("--steps", type=int, default=150, help="shards: training steps per source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as xmodal evaluate --bf16)")
    args = parser.parse_args()
    if not Path(args.data, "captions.jsonl").is_file():
        sys.exit(f"{args.data}: no prepared Fashion-MNIST; run `xmodal data fashion-mnist {args.data}` first")
    args.model = args.model or {"captioner": "fashion-captioner", "generator": "fashion-generator"}.get(args.what)
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=args.bf16):
        result = {"captioner": captioner, "generator": generator, "compare": compare, "shards": shards}[args.what](args)
    print(json.dumps({**result, "bf16": args.bf16}))


if __name__ == "__main__":
    main()
