"""This machine's arithmetic peak, as the speed benchmarks compare against it.

    python benchmarks/peak.py [--seconds 2]

GFLOP/s of a 1024^3 matmul and of a 3x3 convolution (64 channels, 32 px, batch 32,
channels-last), in fp32 and in bf16, on every thread torch has (`threads` in the JSON).
"""

from __future__ import annotations

import argparse
import json

import torch
from utilization import peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    result = {"threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for kind in ("matmul", "conv"):
            result[f"{kind}_{name}_gflops"] = round(peak(kind, dtype, args.seconds), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
