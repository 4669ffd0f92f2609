"""Text-to-image quality and speed on fresh Shapes prompts (WORLD.md's scene accuracy).

    python benchmarks/generator.py --model shapes-gan [--captioner NAME ...] [--count 500]
        [--steps 10 --guidance 3 --sampler dpm]   (diffusion models)

For `test` and `novel` scenes from seeds never used in training, one image per prompt,
with canonical prompts and with a paraphrase of each (the first non-canonical reference).
Each image is read by each of the project's captioners (the cycle measure: by default both the
LSTM `shapes-captioner` and `shapes-captioner-transformer`, on the same images) and by the
independent pixel judge. Speed: images per second in batches of 64 and 256.
For a model with a layout stage, also how often its drawn boxes alone are right
(`layout`: object count, each box's size class, and the relation of the two boxes).
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


def layout_accuracy(model, prompts: list[str], truths: list, seed: int = 5000) -> dict:
    """Fraction of drawn layouts with the right object count, sizes (r < 9.5 px is small) and relation."""
    from xmodal.models.layout import layout_generators

    with torch.no_grad():
        tokens, mask, _ = model.encode_text(prompts)
        boxes, present = model.layout.sample(model.layout.read(tokens, mask), layout_generators(range(seed, seed + len(prompts))))
    hits = {"count": 0, "size": 0, "relation": 0, "all": 0}
    for b, p, truth in zip(boxes.tolist(), present.tolist(), truths):
        n = sum(p)
        count = n == len(truth.objects)
        size = count and all(("small" if b[k][2] < 9.5 else "large") == o.size for k, o in enumerate(truth.objects))
        relation = True
        if count and n == 2:
            dx, dy = b[1][0] - b[0][0], b[1][1] - b[0][1]
            relation = (truth.relation == "left" and dx > 0 and abs(dx) >= abs(dy)) or \
                       (truth.relation == "above" and dy > 0 and abs(dy) > abs(dx))
        for key, ok in (("count", count), ("size", size), ("relation", count and relation),
                        ("all", count and size and relation)):
            hits[key] += bool(ok)
    return {k: round(v / len(prompts), 4) for k, v in hits.items()}


def evaluate(pipe, captioners: dict, split: str, count: int, options: dict) -> dict:
    data = ShapesDataset(split, count, seed=91)
    records = [data.item(i)[0] for i in range(count)]
    truths = [Scene.from_dict(r["scene"]).spec for r in records]
    out = {}
    if getattr(pipe.model, "layout", None) is not None:
        out["layout"] = {style: layout_accuracy(pipe.model, [r["captions"][pick] for r in records], truths)
                         for style, pick in (("canonical", 0), ("paraphrase", 1))}
    for style, pick in (("canonical", 0), ("paraphrase", 1)):
        prompts = [r["captions"][pick] for r in records]
        images = [np.asarray(im) for im in pipe(prompts, n=1, seed=5000, batch_size=128, **options)]
        out[style] = {f"cycle/{name}": _round(scene_accuracy(truths, captioner_reader(captioner)(images)))
                      for name, captioner in captioners.items()}
        out[style]["judge"] = _round(scene_accuracy(truths, judge_reader(images)))
    return out


def _round(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def speed(pipe, options: dict, batch: int) -> float:
    prompts = [r["captions"][0] for r in (ShapesDataset("test", batch, seed=92).item(i)[0] for i in range(batch))]
    pipe(prompts[:4], **options)  # warm up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        pipe(prompts, batch_size=batch, **options)
        best = max(best, batch / (time.perf_counter() - start))
    return round(best, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-gan")
    parser.add_argument("--captioner", nargs="+", default=["shapes-captioner", "shapes-captioner-transformer"],
                        help="the captioners that read the images back (cycle)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--sampler")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for generation")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()
    pipe, captioners = xmodal.load(args.model), {name: xmodal.load(name) for name in args.captioner}
    options = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("sampler", args.sampler)) if v is not None}
    result = {"model": args.model, "registry": pipe.model.registry_name, "parameters": pipe.model.num_parameters(),
              "text_encoder": pipe.model.config.text_encoder.get("kind"), "options": options, "bf16": args.bf16,
              "threads": torch.get_num_threads()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        if not args.no_quality:
            for split in ("test", "novel"):
                result[split] = evaluate(pipe, captioners, split, args.count, options)
        if not args.no_speed:
            result["images_per_s"] = {f"batch{b}": speed(pipe, options, b) for b in (64, 256)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
