"""Chunks of rows computed side by side on a CPU, one core each.

A small CPU runs a narrow conv net's call on a few pictures badly with all its cores: each
layer is split across the threads, which meet after every layer, and the layers of 8-32 small
pictures are too short for that to pay (shapes-gan's generator spent 285-520 ms on 256
pictures with two threads per layer, 140-245 ms with two chunks at a time, one thread each:
the same numbers). `run_chunks` hands the chunks to as many worker
threads as PyTorch has intra-op threads here, each set to one thread of its own, and puts the
results back in order. PyTorch's kernels leave Python's lock while they work.

Each worker runs its chunk in the caller's grad, inference and autocast modes (they belong to a
thread). A caller with gradients on, inside a dispatch mode (`FlopCounterMode`, which counts
its own thread only) or `in_turn()` (a profiler's), tracing, or on one thread, runs the chunks
in turn as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from xmodal.data.parts import even_parts, worker_pool

T = TypeVar("T")


class _Flag(threading.local):
    active = False  # True in a worker thread (a chunk that chunks again runs its parts in turn) or `in_turn`


_worker = _Flag()


def _start(barrier: threading.Barrier) -> None:
    torch.set_num_threads(1)
    torch.get_num_threads()  # this thread's own setting is made now, before the caller's count is put back
    _worker.active = True
    barrier.wait()  # every worker starts on a thread of its own


def _start_all(pool: ThreadPoolExecutor, workers: int) -> None:
    """Each of the pool's `workers` threads set to one intra-op thread; the caller's count put back."""
    threads = torch.get_num_threads()
    barrier = threading.Barrier(workers)
    try:
        for started in [pool.submit(_start, barrier) for _ in range(workers)]:
            started.result()
    finally:
        torch.set_num_threads(threads)  # set_num_threads(1) above also changed the process default


@contextlib.contextmanager
def in_turn() -> Iterator[None]:
    """Chunks run one after another on this thread (each with all of PyTorch's threads) inside:
    what a profiler that records this thread only should see."""
    before, _worker.active = _worker.active, True
    try:
        yield
    finally:
        _worker.active = before


def side_by_side() -> int:
    """How many chunks this thread would run at a time (1: in turn)."""
    if (_worker.active or torch.is_grad_enabled() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export() or _get_current_dispatch_mode() is not None):
        return 1
    return torch.get_num_threads()


def run_chunks(fn: Callable[[slice], T], rows: Sequence[slice]) -> list[T]:
    """[fn(r) for r in rows], computed on worker threads side by side where `side_by_side()` allows."""
    workers = min(side_by_side(), len(rows))
    if workers < 2:
        return [fn(r) for r in rows]
    inference, autocast = torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu")

    def run(r: slice) -> T:
        with torch.inference_mode(inference), torch.no_grad(), torch.autocast("cpu", dtype, enabled=autocast):
            return fn(r)

    return list(worker_pool("xmodal-rows", workers, _start_all).map(run, rows))


def row_parts(count: int, device, least: int = 16) -> list[slice]:
    """`count` rows as one slice per worker that `run_chunks` would use on `device` (a CPU), each
    of `least` rows or more; one slice elsewhere."""
    return even_parts(count, side_by_side() if torch.device(device).type == "cpu" else 1, least)
