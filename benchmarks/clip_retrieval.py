"""Dual-encoder retrieval on fresh Shapes pairs: R@1 both ways among 100 candidates.

    python benchmarks/clip_retrieval.py [--model shapes-clip] [--pools 5]

For `test` and `novel`, `--pools` disjoint pools of 100 (image, canonical caption) pairs
from base seed 95 (never used in training); recall@1 averaged over the pools.

Two kinds of pool. `distinct`: 100 pairs of 100 different scenes (a fresh scene that repeats
one already in the pool is skipped), so exactly one candidate is right. `random`: 100
consecutive fresh pairs as they come; Shapes has few one-object scenes (at most 60), so a
random pool repeats some scenes and a query then has several equally right candidates of
which only its own pair counts: `ceiling` is the best recall@1 any model can reach there
(the mean over queries of 1 / copies of its scene).
"""

from __future__ import annotations

import argparse
import json
import time

import xmodal
from xmodal.data.shapes import ShapesDataset
from xmodal.tasks import alignment
from xmodal.tasks.data import stored_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--pools", type=int, default=5)
    args = parser.parse_args()
    pipe = xmodal.load(args.model)
    result = {"model": args.model, "pool": 100, "pools": args.pools}
    for split in ("test", "novel"):
        for kind in ("distinct", "random"):
            data = ShapesDataset(split, 100 * args.pools * (3 if kind == "distinct" else 1), seed=95, cache=True)
            start = time.perf_counter()
            entry = alignment.measure_pools(pipe, data.records, stored_images(data), 100, args.pools, kind == "distinct")
            entry = {k: round(v, 4) for k, v in entry.items() if k != "pools"}
            entry["seconds"] = round(time.perf_counter() - start, 2)
            result[f"{split}_{kind}"] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
