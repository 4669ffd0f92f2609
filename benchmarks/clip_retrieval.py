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
from xmodal.tasks.records import scene_specs


def pools(split: str, count: int, distinct: bool):
    """(data set, scene of each item, `count` pools of 100 indices into the data set)."""
    data = ShapesDataset(split, 100 * count * (3 if distinct else 1), seed=95)
    keys = scene_specs(data.records)
    if not distinct:
        return data, keys, [list(range(p * 100, p * 100 + 100)) for p in range(count)]
    out, pool, seen = [], [], set()
    for i, key in enumerate(keys):
        if key not in seen:
            pool.append(i)
            seen.add(key)
        if len(pool) == 100:
            out.append(pool)
            pool, seen = [], set()
            if len(out) == count:
                break
    return data, keys, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--pools", type=int, default=5)
    args = parser.parse_args()
    pipe = xmodal.load(args.model)
    result = {"model": args.model, "pool": 100, "pools": args.pools}
    for split in ("test", "novel"):
        for kind in ("distinct", "random"):
            data, keys, groups = pools(split, args.pools, kind == "distinct")
            scores, ceilings = [], []
            start = time.perf_counter()
            for idx in groups:
                records = [data.item(i)[0] for i in idx]
                scores.append(alignment.measure(pipe, records, [data.image(i) for i in idx]))
                ceilings.append(sum(1 / sum(keys[j] == keys[i] for j in idx) for i in idx) / len(idx))
            entry = {k: round(sum(s[k] for s in scores) / len(scores), 4) for k in scores[0]}
            entry["ceiling"] = round(sum(ceilings) / len(ceilings), 4)
            entry["seconds"] = round(time.perf_counter() - start, 2)
            result[f"{split}_{kind}"] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
