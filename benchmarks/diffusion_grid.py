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

import numpy as np
import torch

import xmodal
from xmodal.data.shapes import ShapesDataset
from xmodal.metrics.scenes import captioner_reader, judge_reader, scene_accuracy
from xmodal.worlds.shapes import Scene


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
    pipe, captioners = xmodal.load(args.model), {name: xmodal.load(name) for name in args.captioner}
    rows = []
    for split in args.split:
        data = ShapesDataset(split, args.count, seed=93)
        records = [data.item(i)[0] for i in range(args.count)]
        prompts = [r["captions"][0] for r in records]
        truths = [Scene.from_dict(r["scene"]).spec for r in records]
        for steps in args.steps:
            for guidance in args.guidance:
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    images = [np.asarray(im) for im in pipe(prompts, seed=0, batch_size=256, steps=steps,
                                                               guidance=guidance, sampler=args.sampler)]
                rate = len(images) / (time.perf_counter() - start)
                cycle = {f"cycle/{name}": round(scene_accuracy(truths, captioner_reader(c)(images))["scene_accuracy"], 4)
                         for name, c in captioners.items()}
                judge = scene_accuracy(truths, judge_reader(images))["scene_accuracy"]
                rows.append({"split": split, "steps": steps, "guidance": guidance, **cycle,
                             "judge": round(judge, 4), "images_per_s": round(rate, 1)})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"model": args.model, "captioner": args.captioner, "sampler": args.sampler, "count": args.count,
                      "bf16": args.bf16, "threads": torch.get_num_threads(), "grid": rows}))


if __name__ == "__main__":
    main()
