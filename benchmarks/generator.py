"""Text-to-image quality and speed on fresh Shapes prompts (WORLD.md's scene accuracy).

    python benchmarks/generator.py [--model shapes-diffusion] [--captioner NAME ...] [--count 500]
        [--prompt-seed 91 --image-seed 5000]   (other seeds: a validation set to choose settings on)
        [--steps 10 --guidance 3 --sampler dpm]   (diffusion models)
        [--runtime onnx]   (one-pass generators: onnxruntime, with the model's export or one made here)

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
import tempfile
import time

import torch
from utilization import utilization

import xmodal
from xmodal.data.shapes import ShapesDataset
from xmodal.metrics.scenes import judge_reader
from xmodal.models.base import GenerateOptions
from xmodal.models.hub import PRECISIONS, autocast_dtype
from xmodal.tasks import text_to_image
from xmodal.tasks.records import prompts as record_prompts
from xmodal.tasks.records import scene_specs

STYLES = (("canonical", 0), ("paraphrase", 1))  # which reference of each record is the prompt


def evaluate(pipe, readers: dict, split: str, count: int, options: GenerateOptions, drawer=None,
             prompt_seed: int = 91, image_seed: int = 5000) -> dict:
    """Scene accuracy of each reader on `count` fresh prompts of `split`, canonical and paraphrased,
    pictures drawn by `drawer` (default: the pipeline; the layout's boxes are checked for it alone).
    Other seeds than the defaults give a validation set, to choose a setting on before measuring."""
    records = ShapesDataset(split, count, seed=prompt_seed).records
    out = {}
    if drawer is None:
        layouts = {style: text_to_image.layout_accuracy(pipe.model, record_prompts(records, pick), scene_specs(records))
                   for style, pick in STYLES}
        if layouts["canonical"] is not None:
            out["layout"] = {style: _round(v) for style, v in layouts.items()}
    for style, pick in STYLES:
        metrics = text_to_image.measure(drawer or pipe, records, readers, pick=pick, seed=image_seed, batch_size=128,
                                        options=options)
        out[style] = {name: _round({k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(name + "_")})
                      for name in readers}
    return out


def _round(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def speed(pipe, options: GenerateOptions, batch: int) -> float:
    prompts = record_prompts(ShapesDataset("test", batch, seed=92).records)
    pipe(prompts[:4], options=options)  # warm up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        pipe(prompts, batch_size=batch, options=options)
        best = max(best, batch / (time.perf_counter() - start))
    return round(best, 1)


def speed_report(pipe, options: GenerateOptions, drawer=None, bf16: bool = False) -> dict:
    """Images per second in batches of 64 and 256 (drawn by `drawer`, default the pipeline), and
    how near the machine's peak batch 64 runs (FLOPs counted on the PyTorch model: the same work)."""
    rates = {f"batch{b}": speed(drawer or pipe, options, b) for b in (64, 256)}
    prompts = record_prompts(ShapesDataset("test", 64, seed=92).records)
    used = utilization(lambda: pipe(prompts, batch_size=64, options=options), 64, rates["batch64"], pipe.model,
                       bf16, ops=drawer is None)
    return {"images_per_s": rates, "utilization": used, **(decoder_share(pipe, rates["batch64"]) if drawer is None else {})}


def onnx_drawer(name: str, folder: str):
    """The ONNX runtime for a model: its own export where it has one of its weights, else one made in `folder`."""
    from xmodal.export import export_onnx
    from xmodal.runtime import OnnxGenerator, find_generator_export

    export = find_generator_export(name, False, require=False)
    if export is None:
        export_onnx(name, folder)
        export = folder
    return OnnxGenerator(export)


def decoder_share(pipe, per_s: float) -> dict:
    """A latent model's autoencoder decoder: milliseconds per image, and its share of the time per image."""
    from xmodal.models.base import in_cpu_chunks
    from xmodal.models.diffusion import LatentDiffusion

    model = pipe.model
    if not isinstance(model, LatentDiffusion):
        return {}
    latents = torch.randn(64, model.autoencoder.config.latent_channels, 16, 16)
    with torch.inference_mode():
        in_cpu_chunks(model.autoencoder.decode, latents)
        start = time.perf_counter()
        for _ in range(3):
            in_cpu_chunks(model.autoencoder.decode, latents)
    ms = (time.perf_counter() - start) / 3 / 64 * 1000
    return {"decoder_ms_per_image": round(ms, 2), "decoder_share": round(ms * per_s / 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-diffusion-fast")
    parser.add_argument("--captioner", nargs="+", default=["shapes-captioner", "shapes-captioner-transformer"],
                        help="the captioners that read the images back (cycle)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--prompt-seed", type=int, default=91, help="the prompts' seed (another one: a validation set)")
    parser.add_argument("--image-seed", type=int, default=5000, help="the first image's seed")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--sampler")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the generator's: auto (its default dtype where this CPU computes it natively), float32, bfloat16")
    parser.add_argument("--bf16", action="store_true", help="the same as --precision bfloat16")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    args = parser.parse_args()
    pipe = xmodal.load(args.model)
    pipe.precision = "bfloat16" if args.bf16 else args.precision
    bf16 = args.runtime == "torch" and autocast_dtype(pipe.model, pipe.precision) == torch.bfloat16
    scratch = tempfile.TemporaryDirectory()
    drawer = onnx_drawer(args.model, scratch.name) if args.runtime == "onnx" else None
    readers = {f"cycle/{name}": text_to_image.reader(xmodal.load(name)) for name in args.captioner}
    readers["judge"] = judge_reader
    options = pipe.options(GenerateOptions(steps=args.steps, guidance=args.guidance, sampler=args.sampler))
    result = {"model": args.model, "registry": pipe.model.registry_name, "parameters": pipe.model.num_parameters(),
              "text_encoder": pipe.model.config.text_encoder.kind, "options": options.given(), "bf16": bf16,
              "threads": torch.get_num_threads(), "runtime": args.runtime}
    if not args.no_quality:
        for split in ("test", "novel"):
            result[split] = evaluate(pipe, readers, split, args.count, options, drawer, args.prompt_seed, args.image_seed)
    if not args.no_speed:
        result.update(speed_report(pipe, options, drawer, bf16))
    scratch.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
