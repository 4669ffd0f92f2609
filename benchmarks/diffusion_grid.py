"""Diffusion quality against sampler steps and guidance scale (a small table), and speed.

    python benchmarks/diffusion_grid.py [--model shapes-diffusion] [--count 200] [--bf16]
        [--split test novel] [--steps 5 10 20] [--guidance 1 3 5]

Scene accuracy of one image per fresh prompt (canonical), read by each captioner (cycle) and
by the pixel judge, for each (steps, guidance) and split; images/s at batch 256 (the time to
generate the split's images, so it includes everything `xmodal generate` does).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import xmodal
from xmodal.data.shapes import ShapesDataset
from xmodal.metrics.scenes import judge_reader
from xmodal.models.base import GenerateOptions
from xmodal.tasks import text_to_image
from xmodal.tasks.records import prompts as record_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-diffusion")
    parser.add_argument("--captioner", nargs="+", default=["shapes-captioner", "shapes-captioner-transformer"])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--sampler", default="dpm")
    parser.add_argument("--split", nargs="+", default=["test"], choices=["test", "novel"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for generation")
    args = parser.parse_args()
    pipe = xmodal.load(args.model)
    readers = {f"cycle/{name}": text_to_image.reader(xmodal.load(name)) for name in args.captioner}
    readers["judge"] = judge_reader
    rows = []
    for split in args.split:
        records = ShapesDataset(split, args.count, seed=93).records
        for steps in args.steps:
            for guidance in args.guidance:
                options = pipe.options(GenerateOptions(steps=steps, guidance=guidance, sampler=args.sampler))
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    images = text_to_image.draw(pipe, record_prompts(records), seed=0, batch_size=256, options=options)
                rate = len(images) / (time.perf_counter() - start)
                scores = text_to_image.score(images, records, readers)
                rows.append({"split": split, "steps": steps, "guidance": guidance,
                             **{name: round(scores[f"{name}_scene_accuracy"], 4) for name in readers},
                             "images_per_s": round(rate, 1)})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"model": args.model, "captioner": args.captioner, "sampler": args.sampler, "count": args.count,
                      "bf16": args.bf16, "threads": torch.get_num_threads(), "grid": rows}))


if __name__ == "__main__":
    main()
