"""End-to-end throughput of the command line's batch paths against the same work in process.

    python benchmarks/cli_batch.py [--images 5000] [--prompts 1000] [--batch-size 256]

`xmodal caption DIR` over DIR of `--images` fresh Shapes PNGs, and `xmodal generate
--prompts-file` over `--prompts` fresh Shapes prompts, each a new process timed from start to
exit (start-up, loading, reading and writing files included), with the default models and
runtime. Beside each, the in-process batched rate of the same model and runtime on the same
inputs (files already decoded), and the ratio: how much of the batched speed a user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from xmodal.cli import DEFAULT_CAPTIONER, DEFAULT_GENERATOR
from xmodal.data.shapes import ShapesDataset
from xmodal.tasks.records import prompts as record_prompts

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "xmodal", *argv], capture_output=True, text=True, env=ENV)
    if out.returncode != 0:
        raise SystemExit(f"xmodal {' '.join(argv)} failed: {out.stderr[-500:]}")
    return time.perf_counter() - start


def in_process_rate(fn, count: int) -> float:
    fn(8)  # warm up
    start = time.perf_counter()
    fn(count)
    return count / (time.perf_counter() - start)


def captions(folder: Path, count: int, batch: int) -> dict:
    data = ShapesDataset("test", count, seed=93)
    for i in range(count):
        Image.fromarray(data.item(i)[1]).save(folder / f"{i:05d}.png")
    seconds = timed(["caption", str(folder), "--batch-size", str(batch), "--json"])
    from xmodal.runtime import OnnxCaptioner, find_export

    export = find_export(DEFAULT_CAPTIONER, None, require=False)
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    if export is not None:
        runtime, pipe = "onnx", OnnxCaptioner(export)
    else:
        import xmodal

        runtime, pipe = "torch", xmodal.load(DEFAULT_CAPTIONER)
    rate = in_process_rate(lambda n: pipe(images[:n], batch_size=batch), count)
    return {"model": DEFAULT_CAPTIONER, "runtime": runtime, "images": count, "cli_seconds": round(seconds, 2),
            "cli_per_s": round(count / seconds, 1), "in_process_per_s": round(rate, 1),
            "ratio": round(count / seconds / rate, 3)}


def generations(folder: Path, count: int, batch: int) -> dict:
    from xmodal.runtime import OnnxGenerator, find_generator_export

    prompts = record_prompts(ShapesDataset("test", count, seed=94).records)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    seconds = timed(["generate", "--prompts-file", str(folder / "prompts.txt"), "-o", str(folder / "out"),
                     "--batch-size", str(batch)])
    written = len(list((folder / "out").glob("*.png")))
    export = find_generator_export(DEFAULT_GENERATOR, False, require=False)
    if export is not None:
        runtime, pipe = "onnx", OnnxGenerator(export)
    else:
        import xmodal

        runtime, pipe = "torch", xmodal.load(DEFAULT_GENERATOR)
    rate = in_process_rate(lambda n: pipe(prompts[:n], batch_size=batch), count)
    return {"model": DEFAULT_GENERATOR, "runtime": runtime, "prompts": count, "written": written,
            "cli_seconds": round(seconds, 2),
            "cli_per_s": round(count / seconds, 1), "in_process_per_s": round(rate, 1),
            "ratio": round(count / seconds / rate, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c").mkdir()
        (Path(tmp) / "g").mkdir()
        result = {"caption_dir": captions(Path(tmp) / "c", args.images, args.batch_size),
                  "generate_prompts_file": generations(Path(tmp) / "g", args.prompts, min(args.batch_size, 64))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
