"""Chunks of rows side by side on a CPU: the same numbers as in turn, the caller's modes, and in turn
wherever a side-by-side run would escape what the caller set up (gradients, a FLOP counter)."""

import threading

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import xmodal
from xmodal.models.base import in_cpu_chunks
from xmodal.models.row_workers import in_turn, row_parts, run_chunks


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def seen(rows: slice) -> list:
    """What a chunk sees: its thread, its modes, its thread count."""
    return [(threading.current_thread().name, torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
             torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.get_num_threads())]


def test_chunks_side_by_side_give_the_numbers_chunks_in_turn_give(two_threads):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(16, 3, 3, padding=1)).eval()
    x = torch.randn(40, 3, 16, 16)
    with torch.inference_mode():
        side = in_cpu_chunks(net, x)
        with in_turn():
            turn = in_cpu_chunks(net, x)
    assert torch.equal(side, turn) and side.shape == (40, 3, 16, 16)
    assert torch.get_num_threads() == 2  # the workers' one thread each did not become the caller's


def test_workers_run_in_the_callers_modes_with_one_thread_each(two_threads):
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        parts = run_chunks(seen, [slice(i, i + 1) for i in range(4)])
    names = {p[0][0] for p in parts}
    assert all(name.startswith("xmodal-rows") for name in names)
    assert {p[0][1:] for p in parts} == {(True, False, True, torch.bfloat16, 1)}

    def chunks_again(rows: slice) -> tuple[str, list[str]]:
        return threading.current_thread().name, [p[0][0] for p in run_chunks(seen, [rows, rows])]

    with torch.no_grad():  # a chunk that chunks again runs its parts in turn, on its own thread
        nested = run_chunks(chunks_again, [slice(0, 1), slice(1, 2)])
    assert all(inner == [outer, outer] for outer, inner in nested)


@pytest.mark.parametrize("setting", ["gradients", "flop counter", "in turn", "one thread"])
def test_chunks_stay_on_the_callers_thread_where_workers_would_escape_its_setting(two_threads, setting):
    here = threading.current_thread().name
    rows = [slice(i, i + 1) for i in range(3)]
    if setting == "gradients":
        parts = run_chunks(seen, rows)
    elif setting == "flop counter":
        with torch.no_grad(), FlopCounterMode(display=False):
            parts = run_chunks(seen, rows)
    elif setting == "in turn":
        with torch.no_grad(), in_turn():
            parts = run_chunks(seen, rows)
    else:
        torch.set_num_threads(1)
        with torch.no_grad():
            parts = run_chunks(seen, rows)
    assert {p[0][0] for p in parts} == {here}


def _chunks_in_a_child(queue) -> None:
    with torch.no_grad():
        queue.put([p[0][0] for p in run_chunks(seen, [slice(0, 1), slice(1, 2)])])


def test_a_forked_child_starts_its_own_workers(two_threads):
    """A child forked after the workers started (a data loader's worker) has none of their threads:
    chunks there must not wait forever on a pool that no longer runs."""
    import multiprocessing

    with torch.no_grad():
        run_chunks(seen, [slice(0, 1), slice(1, 2)])  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_chunks_in_a_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on its parent's worker pool")
    assert child.exitcode == 0 and all(name.startswith("xmodal-rows") for name in queue.get(timeout=5))


def test_a_flop_counter_counts_every_chunk(two_threads):
    net = nn.Linear(8, 8).eval()
    x = torch.randn(64, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        in_cpu_chunks(net, x, 8)
    assert counter.get_total_flops() == 2 * 64 * 8 * 8


def test_row_parts_cover_the_rows_once(two_threads):
    with torch.no_grad():
        for count in (0, 1, 31, 32, 33, 256):
            parts = row_parts(count, "cpu")
            assert sum(len(range(count)[p]) for p in parts) == count
            assert len(parts) == (2 if count >= 32 else 1)


def test_a_generator_draws_the_same_pictures_side_by_side_as_in_turn(two_threads):
    pipe = xmodal.load("shapes-gan")
    prompts = ["a red circle above a blue square", "a small green triangle", "a yellow square on the left"] * 12
    side = pipe(prompts, seed=3)
    with in_turn():
        turn = pipe(prompts, seed=3)
    assert [im.tobytes() for im in side] == [im.tobytes() for im in turn]


def test_ordered_map_hands_results_in_order_without_waiting_for_a_slow_part():
    """A part that ends first starts the next one while a slow part still runs (no meeting after
    each batch), the results come in the items' order, and an endless stream is read `ahead` items
    at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from xmodal.data.parts import ordered_map

    later_started, taken = threading.Event(), []

    def work(item: int) -> int:
        if item == 0:  # finishes only once item 2, the next batch's first part, has started
            assert later_started.wait(timeout=10), "item 2 waited for item 0"
        if item == 2:
            later_started.set()
        return item * item

    def endless():
        n = 0
        while True:
            taken.append(n)
            yield n
            n += 1

    with ThreadPoolExecutor(2) as pool:
        results = ordered_map(pool, work, endless(), ahead=4)
        assert [next(results) for _ in range(6)] == [0, 1, 4, 9, 16, 25]
        assert len(taken) <= 6 + 4
        results.close()
