"""Time a bundled model's training recipe end to end: its configs in order, each `xmodal train`.

    python benchmarks/recipe.py [--recipe shapes-diffusion] [--root runs/recipe]   (--root must not exist)

Every path under `runs/` in the configs (out_dir, init_from, autoencoder_path, teacher) is moved under
--root, so the stages chain onto each other and nothing already trained is touched or reused.
Prints one JSON line per stage (wall seconds, the stage's last eval metrics) and a summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import tomllib

RECIPES = {
    "shapes-diffusion": ["configs/shapes-autoencoder.toml", "configs/shapes-decoder.toml",
                         "configs/shapes-diffusion.toml"],
    "shapes-gan": ["configs/shapes-gan.toml", "configs/shapes-gan-subpixel.toml"],
}
PATH_KEYS = {"train": ["out_dir"], "model": ["init_from", "autoencoder_path", "teacher"]}


def moved_paths(config: dict, root: Path) -> list[str]:
    """`--section.key=path` overrides putting each `runs/...` path of `config` under `root`."""
    overrides = []
    for section, keys in PATH_KEYS.items():
        for key in keys:
            value = config.get(section, {}).get(key)
            if isinstance(value, str) and value.startswith("runs/"):
                overrides.append(f"--{section}.{key}={root / value.removeprefix('runs/')}")
    return overrides


def last_eval(metrics: Path) -> dict:
    evals = {}
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        row = json.loads(line)
        evals.update({k: v for k, v in row.items() if k.startswith("eval/")})
    return evals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="shapes-diffusion", choices=sorted(RECIPES))
    parser.add_argument("--root", default="runs/recipe", help="where the stages' runs go")
    args = parser.parse_args()
    root = Path(args.root)
    if root.exists():  # the configs resume from checkpoints there, and the time would not be the recipe's
        sys.exit(f"{root} already exists: give a new --root (or delete it) to time the recipe from scratch")
    stages, total = [], 0.0
    for path in RECIPES[args.recipe]:
        config = tomllib.loads(Path(path).read_text())
        overrides = moved_paths(config, root)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "xmodal", "train", path, *overrides])  # this interpreter's xmodal
        seconds = time.perf_counter() - start
        total += seconds
        out_dir = root / config["train"]["out_dir"].removeprefix("runs/")
        stages.append({"config": path, "seconds": round(seconds, 1), "returncode": done.returncode,
                       "steps": config["train"]["steps"], "eval": last_eval(out_dir / "metrics.jsonl")})
        print(json.dumps(stages[-1]), flush=True)
        if done.returncode:
            sys.exit(f"{path} failed (exit {done.returncode}); stages so far: {json.dumps(stages)}")
    print(json.dumps({"recipe": args.recipe, "root": str(root), "minutes": round(total / 60, 1), "stages": stages}))


if __name__ == "__main__":
    main()
