"""How near this machine's limit a speed benchmark runs: FLOPs per item, the peak, the top ops.

Used by the speed benchmarks (captioner.py, generator.py, fashion.py): `utilization(fn, items,
per_s, bf16)` gives the matmul/conv FLOPs per item (torch.utils.flop_counter.FlopCounterMode:
matrix products and convolutions, which is where the arithmetic is; element-wise work and
softmax are not counted), the GFLOP/s that makes at the measured speed, the fraction of this
machine's peak (benchmarks/peak.py, measured here in a few seconds) and the ops that take the
time (torch.profiler, self CPU time).
"""

from __future__ import annotations

import functools
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def _rate(fn, flops: float, seconds: float = 1.0) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - start) / 1e9


@functools.cache
def peak(kind: str = "matmul", dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """GFLOP/s of a large matmul (1024^3) or a ResNet-like 3x3 convolution (64 channels, 32 px,
    batch 32, channels-last) on every thread torch has, in `dtype`."""
    with torch.inference_mode():
        if kind == "matmul":
            a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
            return _rate(lambda: a @ b, 2 * 1024 ** 3, seconds)
        x = torch.randn(32, 64, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, 64, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flops = 2 * 32 * 64 * 32 * 32 * 64 * 9
        return _rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), flops, seconds)


def flops_per_item(fn, items: int, model: torch.nn.Module) -> float:
    """Matmul and convolution FLOPs of one call of `fn` (that handles `items` items with `model`),
    per item. The counter's module hooks fail on weights that require grad under no_grad, so the
    model's weights are frozen while it counts."""
    wanted = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for p in wanted:
            p.requires_grad_(True)
    return counter.get_total_flops() / items


def top_ops(fn, n: int = 5) -> list[dict]:
    """The `n` ops with the most self CPU time in one call of `fn`, with their share (its chunks
    run in turn on this thread, with all its threads: the profiler records this thread's ops)."""
    from torch.profiler import ProfilerActivity, profile

    from xmodal.models.row_workers import in_turn

    with torch.inference_mode(), in_turn(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "ms": round(e.self_cpu_time_total / 1000, 1), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in events[:n]]


def utilization(fn, items: int, per_s: float, model: torch.nn.Module, bf16: bool = False, ops: bool = True) -> dict:
    """FLOPs per item of `fn` (one call: `items` items with `model`), achieved GFLOP/s at `per_s`
    items per second, its fraction of the matmul and conv peaks in the dtype used, and the top ops
    (with `ops`: leave them out where `per_s` was measured on another runtime than `fn`'s)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    flops = flops_per_item(fn, items, model)
    achieved = flops * per_s / 1e9
    peaks = {kind: round(peak(kind, dtype), 1) for kind in ("matmul", "conv")}
    return {"mflops_per_item": round(flops / 1e6, 2), "achieved_gflops": round(achieved, 1),
            "peak_gflops": peaks, "fraction_of_matmul_peak": round(achieved / peaks["matmul"], 3),
            "fraction_of_conv_peak": round(achieved / peaks["conv"], 3), **({"top_ops": top_ops(fn)} if ops else {})}
