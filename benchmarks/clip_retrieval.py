"""Dual-encoder retrieval on fresh Shapes pairs: R@1 both ways among 100 candidates.

    python benchmarks/clip_retrieval.py [--model shapes-clip] [--pools 5]

For `test` and `novel`, `--pools` disjoint pools of 100 (image, canonical caption) pairs
from base seed 95 (never used in training); recall@1 averaged over the pools.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from xmodal.data.shapes import ShapesDataset
from xmodal.metrics.retrieval import recall_at_k
from xmodal.models.hub import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--pools", type=int, default=5)
    args = parser.parse_args()
    model = load_model(args.model)
    result = {"model": args.model, "pool": 100, "pools": args.pools}
    for split in ("test", "novel"):
        data = ShapesDataset(split, 100 * args.pools, seed=95, cache=True)
        scores = []
        start = time.perf_counter()
        for p in range(args.pools):
            idx = range(p * 100, p * 100 + 100)
            images = torch.stack([data[i][0] for i in idx])
            texts = [data[i][1][0] for i in idx]
            with torch.no_grad():
                scores.append(recall_at_k(model.encode_image(images) @ model.encode_text(texts).t(), 1))
        result[split] = {k: round(sum(s[k] for s in scores) / len(scores), 4) for k in scores[0]}
        result[split]["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
