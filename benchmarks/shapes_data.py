"""Shapes data: images written per second, and agreement of the independent judge with the records.

    python benchmarks/shapes_data.py [--count 1000] [--seed 1] [--size 64]

Runs `xmodal data shapes` into a temporary folder, then reads every PNG back with
`xmodal.worlds.judge.read_scene` and checks each caption parses to its recorded scene.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.data.prepared import read_records
from xmodal.data.shapes import write_shapes
from xmodal.worlds.judge import read_scene
from xmodal.worlds.shapes import Scene, parse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    result = {"size": args.size}
    for split in ("test", "novel"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / split
            stats = write_shapes(out, split, args.count, args.seed, args.size, progress=False)
            records = read_records(out)
            start = time.perf_counter()
            judged = [read_scene(np.asarray(Image.open(out / r["image"]))) for r in records]
            judge_s = time.perf_counter() - start
            truth = [Scene.from_dict(r["scene"]).spec for r in records]
            result[split] = {
                "count": len(records),
                "images_per_s": round(stats["images_per_s"], 1),
                "captions_parse_to_scene": sum(parse(r["captions"][0]) == t for r, t in zip(records, truth)) / len(records),
                "all_references_parse": all(parse(c) == t for r, t in zip(records, truth) for c in r["captions"]),
                "judge_agreement": sum(j == t for j, t in zip(judged, truth)) / len(records),
                "judge_images_per_s": round(len(records) / judge_s, 1),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
