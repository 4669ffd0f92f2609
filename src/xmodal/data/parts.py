"""A batch's rows cut in even parts, and the process-wide thread pools that run parts side by
side (`xmodal.models.row_workers` for PyTorch, `xmodal.runtime.Parts` for onnxruntime). Nothing
here imports torch."""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def even_parts(count: int, parts: int, least: int = 1) -> list[slice]:
    """range(count) as at most `parts` consecutive slices of `least` rows or more (one slice when
    it holds fewer), in order; [slice(0, 0)] for no rows."""
    parts = max(1, min(parts, count // max(least, 1)))
    size = -(-count // parts)
    return [slice(start, start + size) for start in range(0, count, size)] if count else [slice(0, 0)]


def worker_pool(name: str, workers: int, start: Callable[[ThreadPoolExecutor, int], None] | None = None
                ) -> ThreadPoolExecutor:
    """The process's pool of `workers` threads named `name`, made on first use; `start(pool,
    workers)` runs once then, before anyone else may use it."""
    with _lock:
        pool = _pools.get((name, workers))
        if pool is None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
            if start is not None:
                start(pool, workers)
            _pools[(name, workers)] = pool
        return pool


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """fn(item) for each item on `pool`, the results in the items' order, at most `ahead` items
    taken before their result is handed on: a part that ends first starts the next at once
    instead of waiting for its batch's slowest part (a batch cut in parts meets after every
    batch), and an endless stream of items costs `ahead` items of memory."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _forget_pools() -> None:
    """In a forked child (a data loader's worker): none of the parent's threads are there, and the
    lock may have been held by one of them, so the child makes its own pools."""
    global _lock
    _pools.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)
