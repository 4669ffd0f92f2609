"""End-to-end throughput of the command line's batch paths against the same work in process.

    python benchmarks/cli_batch.py [--images 5000] [--prompts 1000] [--batch-size 256] [--repeats 3]
                                   [--cli-batch-size N]

`xmodal caption DIR` over DIR of `--images` fresh Shapes PNGs, and `xmodal generate
--prompts-file` over `--prompts` fresh Shapes prompts, each a new process timed from start to
exit (start-up, loading, reading and writing files included), with the default models and
runtime, and the command line's own default batch size unless `--cli-batch-size` names one (as a
user runs it). Around each, the in-process batched rate of the same model and runtime on the same
inputs (files already decoded; `--batch-size` captions, at most 64 prompts, a batch), just before
and just after it, and the ratio to their mean: how much of the batched speed a user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def trials(cli: list[str], in_process, count: int, repeats: int, before=None) -> dict:
    """The command line between two in-process runs, `repeats` times (this machine's speed drifts
    by tens of percent within minutes, so each ratio compares the command line with the mean of
    its two neighbours, the run just before and the run just after it): each run's numbers, and
    the median ratio."""
    runs = []
    rate_before = in_process_rate(in_process, count)
    for _ in range(repeats):
        if before is not None:
            before()
        seconds = timed(cli)
        rate_after = in_process_rate(in_process, count)
        rate = (rate_before + rate_after) / 2
        runs.append({"cli_seconds": round(seconds, 2), "cli_per_s": round(count / seconds, 1),
                     "in_process_per_s": [round(rate_before, 1), round(rate_after, 1)],
                     "ratio": round(count / seconds / rate, 3)})
        rate_before = rate_after
    return {"runs": runs, "ratio_median": statistics.median(r["ratio"] for r in runs)}


def cli_batch(size: int | None) -> list[str]:
    return [] if size is None else ["--batch-size", str(size)]


def captions(folder: Path, count: int, batch: int, repeats: int, cli_size: int | None) -> dict:
    from xmodal.runtime import OnnxCaptioner, find_export

    data = ShapesDataset("test", count, seed=93)
    for i in range(count):
        Image.fromarray(data.item(i)[1]).save(folder / f"{i:05d}.png")
    export = find_export(DEFAULT_CAPTIONER, None, require=False)
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    if export is not None:
        runtime, pipe = "onnx", OnnxCaptioner(export)
    else:
        import xmodal

        runtime, pipe = "torch", xmodal.load(DEFAULT_CAPTIONER)
    measured = trials(["caption", str(folder), *cli_batch(cli_size), "--json"],
                      lambda n: pipe(images[:n], batch_size=batch), count, repeats)
    return {"model": DEFAULT_CAPTIONER, "runtime": runtime, "images": count, "cli_batch_size": cli_size or "default",
            "in_process_batch_size": batch, **measured}


def generations(folder: Path, count: int, batch: int, repeats: int, cli_size: int | None) -> dict:
    from xmodal.runtime import OnnxGenerator, find_generator_export

    prompts = record_prompts(ShapesDataset("test", count, seed=94).records)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    export = find_generator_export(DEFAULT_GENERATOR, False, require=False)
    if export is not None:
        runtime, pipe = "onnx", OnnxGenerator(export)
    else:
        import xmodal

        runtime, pipe = "torch", xmodal.load(DEFAULT_GENERATOR)
    out = folder / "out"
    measured = trials(["generate", "--prompts-file", str(folder / "prompts.txt"), "-o", str(out), *cli_batch(cli_size)],
                      lambda n: pipe(prompts[:n], batch_size=batch), count, repeats,
                      before=lambda: shutil.rmtree(out, ignore_errors=True))
    return {"model": DEFAULT_GENERATOR, "runtime": runtime, "prompts": count, "cli_batch_size": cli_size or "default",
            "in_process_batch_size": batch,
            "written": len(list(out.glob("*.png"))), **measured}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="command line / in process pairs per path")
    parser.add_argument("--cli-batch-size", type=int, help="the command line's --batch-size (default: its own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c").mkdir()
        (Path(tmp) / "g").mkdir()
        result = {"caption_dir": captions(Path(tmp) / "c", args.images, args.batch_size, args.repeats,
                                          args.cli_batch_size),
                  "generate_prompts_file": generations(Path(tmp) / "g", args.prompts, min(args.batch_size, 64),
                                                       args.repeats, args.cli_batch_size)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
