"""Start-up cost of the command line: wall time and peak memory of one caption and one image.

    python benchmarks/startup.py [--repeats 5]

Runs `xmodal caption one.png` (the default: the bundled ONNX export, no torch; and with
`--runtime torch`) and `xmodal generate "..." -n 1` (the default generator: its bundled ONNX
export, and with `--runtime torch`; and its teacher `shapes-diffusion`) as a new user would (a fresh process each time), and `python -c "import torch"`
for scale.
Reports the median wall seconds and the largest peak resident memory (MB) over the repeats,
and which heavy packages the caption path imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "transformers", "diffusers", "pycocoevalcap", "torchmetrics", "fastapi", "matplotlib")


# Runs a command line in this interpreter and prints its own peak memory when it exits.
WRAP = ("import atexit, resource, runpy, sys; "
        "atexit.register(lambda: print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
        "sys.argv = sys.argv[1:]; ")


def run(argv: list[str], repeats: int) -> dict:
    """argv: ["-m", module, args...] or ["-c", code]; wall seconds and peak RSS of each fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if argv[0] == "-m":
        code = WRAP + f"runpy.run_module({argv[1]!r}, run_name='__main__')"
        command = [sys.executable, "-c", code, argv[1], *argv[2:]]
    else:
        command = [sys.executable, "-c", WRAP + argv[1]]
    walls, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        walls.append(time.perf_counter() - start)
        line = [x for x in out.stderr.splitlines() if x.startswith("MAXRSS")]
        if out.returncode != 0 or not line:
            raise SystemExit(f"{' '.join(argv)} failed: {out.stderr[-500:]}")
        peaks.append(int(line[-1].split()[1]) / 1024)  # KB on Linux
    return {"wall_s_median": round(statistics.median(walls), 3), "wall_s_min": round(min(walls), 3),
            "peak_rss_mb": round(max(peaks), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.png"
        # drawn in another process: this one stays small, since a child's peak memory counts its
        # parent's at the fork (Linux ru_maxrss), and a parent holding torch would be every child's floor
        subprocess.run([sys.executable, "-c", "from PIL import Image; from xmodal.data.shapes import ShapesDataset; "
                        f"Image.fromarray(ShapesDataset('test', 1, seed=5).image(0)).save({str(one)!r})"], check=True)
        probe = (f"import sys; from xmodal.cli import main; main(['caption', {str(one)!r}]); "
                 f"print('IMPORTED', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
        imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [x for x in imported.stderr.splitlines() if x.startswith("IMPORTED")]
        result = {
            "import_torch": run(["-c", "import torch"], args.repeats),
            # the first run of each command is measured too (the model files are in the page cache after it)
            "caption_one_png": run(["-m", "xmodal", "caption", str(one)], args.repeats),
            "caption_one_png_runtime_torch": run(["-m", "xmodal", "caption", str(one), "--runtime", "torch"],
                                                 args.repeats),
            "generate_one": run(["-m", "xmodal", "generate", "a small red circle", "-n", "1", "--out", tmp],
                                args.repeats),
            "generate_one_runtime_torch": run(["-m", "xmodal", "generate", "a small red circle", "-n", "1", "--out", tmp,
                                               "--runtime", "torch"], args.repeats),
            "generate_one_teacher": run(["-m", "xmodal", "generate", "a small red circle", "-n", "1", "--out", tmp,
                                         "--model", "shapes-diffusion"], args.repeats),
            "caption_path_imports": line[0].split(" ", 1)[1] if line else imported.stderr[-300:],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
