"""Captioner quality and speed on fresh Shapes images (WORLD.md's measures).

    python benchmarks/captioner.py [--model shapes-captioner-transformer] [--count 1000] [--beam N] [--bf16]

Quality: exact match, BLEU-4 and CIDEr-D on `test` and `novel` scenes drawn from seeds
never used in training (base seed 77; training uses the `train` split's seed range).
Speed: captions per second for batches of 256, and the median latency of one image,
both with the beam size given (default: the model's own decoding) and greedy, on whatever
threads torch has here; with the FLOPs per caption, the fraction of this machine's peak
that makes and the ops that take the time (benchmarks/utilization.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from utilization import utilization

import xmodal
from xmodal.data.shapes import ShapesDataset
from xmodal.tasks import captioning
from xmodal.tasks.data import stored_images
from xmodal.tasks.records import scene_specs
from xmodal.worlds.shapes import parse


def quality(pipe, split: str, count: int, beam: int) -> dict:
    data = ShapesDataset(split, count, seed=77, cache=True)
    records = data.records
    metrics = captioning.measure(pipe, records, stored_images(data), beam=beam, batch_size=256)
    captions = metrics["captions"]
    wrong = [(c, r["captions"][0]) for c, r, s in zip(captions, records, scene_specs(records)) if parse(c) != s][:5]
    return {**{k: round(metrics[k], 4) for k in ("exact_match", "bleu4", "cider_d", "rouge_l")}, "examples_wrong": wrong}


def speed(pipe, beam: int, batch: int = 256, repeats: int = 3) -> dict:
    data = ShapesDataset("test", batch, seed=78, cache=True)
    images = [data.item(i)[1] for i in range(batch)]
    options = {"method": "beam" if beam > 1 else "greedy", "beam_size": beam}
    pipe(images[:8], **options)  # warm up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(images, batch_size=batch, **options)
        rates.append(batch / (time.perf_counter() - start))
    latencies = []
    for i in range(30):
        start = time.perf_counter()
        pipe([images[i]], **options)
        latencies.append(time.perf_counter() - start)
    return {"captions_per_s_batched": round(max(rates), 1), "single_image_ms_median": round(1000 * statistics.median(latencies), 2),
            "utilization": utilization(lambda: pipe(images, batch_size=batch, **options), batch, max(rates), pipe.model,
                                       torch.is_autocast_enabled("cpu"))}


def onnx_report(pipe, name: str, count: int) -> dict | None:
    """The model's ONNX export (MODEL/onnx, greedy), as `xmodal caption` runs it by default: exact
    match, agreement with PyTorch's greedy captions of the same images, and speed."""
    from PIL import Image

    from xmodal.runtime import OnnxCaptioner, find_export

    export = find_export(name, 1, require=False)
    if export is None:
        return None
    runtime = OnnxCaptioner(export)
    out = {}
    for split in ("test", "novel"):
        data = ShapesDataset(split, count, seed=77, cache=True)
        images = [Image.fromarray(data.item(i)[1]) for i in range(count)]
        captions = runtime(images, batch_size=256)
        reference = pipe(images, batch_size=256, method="greedy")
        out[split] = {"exact_match": round(captioning.score(captions, data.records)["exact_match"], 4),
                      "same_as_torch": round(sum(a == b for a, b in zip(captions, reference)) / count, 4)}
    images = images[:256]
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        runtime(images, batch_size=256)
        rates.append(len(images) / (time.perf_counter() - start))
    latencies = []
    for im in images[:30]:
        start = time.perf_counter()
        runtime([im])
        latencies.append(time.perf_counter() - start)
    return {**out, "captions_per_s_batched": round(max(rates), 1),
            "single_image_ms_median": round(1000 * statistics.median(latencies), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-captioner-transformer")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--beam", type=int, help="beam size (default: the model's decoding)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as xmodal evaluate --bf16)")
    args = parser.parse_args()
    pipe = xmodal.load(args.model)
    args.beam = args.beam or pipe.options.beam_size
    result = {"model": args.model, "registry": pipe.model.registry_name, "parameters": pipe.model.num_parameters(),
              "threads": torch.get_num_threads(), "beam": args.beam, "bf16": args.bf16}
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=args.bf16):
        for split in ("test", "novel"):
            result[split] = quality(pipe, split, args.count, args.beam)
        result["speed_beam"] = speed(pipe, args.beam)
        result["speed_greedy"] = speed(pipe, 1)
    result["onnx"] = onnx_report(pipe, args.model, args.count)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
