"""GAN against VAE against diffusion, on both data sets, in one table: quality, speed, training time.

    python benchmarks/generators.py [--shapes shapes-gan,shapes-vae,shapes-diffusion-fast]
        [--fashion fashion-gan,fashion-cvae] [--count 300] [--fashion-count 1000] [--markdown]
        [--grid DIR]   (also 16 seeds of four Shapes prompts per Shapes model: DIR/MODEL-seeds.png)

Shapes: fresh test and novel prompts (canonical and paraphrased), scene accuracy read back by
`shapes-captioner-transformer` and by the pixel judge, as `generator.py` measures it; images/s in
batches of 64. Fashion-MNIST: the class read back by `fashion-captioner` from canonical and
open-vocabulary prompts, FID against the real test images, diversity and images/s, as
`fashion.py generator` measures it (needs `xmodal data fashion-mnist data/fashion-mnist`).
Training time: the minutes the model's card states for its recipe. Prints JSON (with
--markdown, the table instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import fashion
import generator
import torch

import xmodal
from xmodal.metrics.scenes import judge_reader
from xmodal.models.base import GenerateOptions
from xmodal.models.folders import read_model_meta
from xmodal.models.hub import autocast_dtype
from xmodal.tasks import text_to_image

CAPTIONER = "shapes-captioner-transformer"
GRID_PROMPTS = ("a large red circle", "a small blue square above a large green triangle",
                "a large purple cross to the left of a small yellow diamond", "a small orange triangle")


def shapes_row(name: str, readers: dict, count: int, grid: str | None = None) -> dict:
    pipe = xmodal.load(name)
    options = pipe.options(GenerateOptions())
    row: dict = {"data": "shapes", "model": name, "registry": pipe.model.registry_name}
    for split in ("test", "novel"):
        measured = generator.evaluate(pipe, readers, split, count, options)
        for style in ("canonical", "paraphrase"):
            row[f"{split}_{style}_cycle"] = measured[style]["cycle"]["scene_accuracy"]
            row[f"{split}_{style}_judge"] = measured[style]["judge"]["scene_accuracy"]
    row["images_per_s"] = generator.speed(pipe, options, 64)
    row["bf16"] = autocast_dtype(pipe.model, pipe.precision) == torch.bfloat16  # its default precision here
    row["training_minutes"] = fashion.card_minutes(name)
    if grid:  # diversity at a fixed prompt: 16 seeds per row
        from xmodal.sheets import seed_grid

        seed_grid([(prompt, pipe([prompt], n=16, seed=0, options=options)) for prompt in GRID_PROMPTS],
                  Path(grid) / f"{name}-seeds.png")
    return row


def fashion_row(name: str, args) -> dict:
    measured = fashion.generator(argparse.Namespace(model=name, data=args.data, count=args.fashion_count, seed=0,
                                                    grid=None))
    return {"data": "fashion-mnist", "model": name, "registry": read_model_meta(name)["model"],
            "canonical_read_back": measured["canonical"]["cycle_class_accuracy"],
            "open_vocabulary_read_back": measured["novel"]["cycle_class_accuracy"], "fid": measured["canonical"]["generated_fid"],
            "diversity": measured["diversity"]["mean_ratio_to_real"], "images_per_s": measured["images_per_s_batched"],
            "training_minutes": fashion.card_minutes(name)}


def markdown(rows: list[dict]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    lines = ["| data | model | family | quality | images/s | training |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["data"] == "shapes":
            quality = (f"test {pct(r['test_canonical_cycle'])} / {pct(r['test_canonical_judge'])}, novel "
                       f"{pct(r['novel_canonical_cycle'])} / {pct(r['novel_canonical_judge'])}, paraphrased test "
                       f"{pct(r['test_paraphrase_cycle'])} / {pct(r['test_paraphrase_judge'])} (captioner / judge)")
        else:
            quality = (f"read back {pct(r['canonical_read_back'])} (open vocabulary "
                       f"{pct(r['open_vocabulary_read_back'])}), FID {r['fid']:.2f}, diversity {r['diversity']:.2f}")
        minutes = f"{r['training_minutes']:g} min" if r["training_minutes"] is not None else "-"
        speed = f"{r['images_per_s']:,.0f}" + (" (bf16)" if r.get("bf16") else "")
        lines.append(f"| {r['data']} | `{r['model']}` | {r['registry']} | {quality} | {speed} | {minutes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="shapes-gan,shapes-vae,shapes-diffusion-fast")
    parser.add_argument("--fashion", default="fashion-gan,fashion-cvae")
    parser.add_argument("--count", type=int, default=300, help="Shapes prompts per split")
    parser.add_argument("--fashion-count", type=int, default=1000, help="Fashion-MNIST test records drawn")
    parser.add_argument("--data", default="data/fashion-mnist", help="the prepared Fashion-MNIST folder")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--grid", help="a folder: write each Shapes model's 16-seed grid there")
    args = parser.parse_args()
    if args.fashion and not Path(args.data, "captions.jsonl").is_file():
        sys.exit(f"{args.data}: no prepared Fashion-MNIST; run `xmodal data fashion-mnist {args.data}` first "
                 "(or --fashion '')")
    readers = {"cycle": text_to_image.reader(xmodal.load(CAPTIONER)), "judge": judge_reader}
    if args.grid:
        Path(args.grid).mkdir(parents=True, exist_ok=True)
    rows = [shapes_row(name, readers, args.count, args.grid) for name in filter(None, args.shapes.split(","))]
    rows += [fashion_row(name, args) for name in filter(None, args.fashion.split(","))]
    print(markdown(rows) if args.markdown else json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
