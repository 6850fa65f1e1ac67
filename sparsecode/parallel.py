"""Spreading independent blocks of signals over CPU worker threads, each running torch single-threaded.

Why not torch's own threads: every CPU operation of torch is split over an OpenMP pool of one thread
per core and ends at a barrier where they all meet. Iterative solvers run many small operations, so
when another process takes a core, the pool thread waiting for it holds every barrier for a whole
scheduler time slice: measured here on 2 cores with other work running, a (200 x 64) @ (64 x 64)
product took 1.2 ms with torch's 2 threads and 0.08 ms with one. Workers that each take the next
block when done, with one thread per operation, have no barriers: a slow core slows only its block.
torch releases the GIL inside its operations, so the workers do run in parallel.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_lock = threading.Lock()
_state = {"users": 0, "threads": 1}


@contextlib.contextmanager
def single_threaded_ops():
    """Within this block torch's CPU operations run on one thread (nested and concurrent uses count)."""
    with _lock:
        if _state["users"] == 0:
            _state["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _state["users"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["users"] -= 1
            if _state["users"] == 0:
                torch.set_num_threads(_state["threads"])


def cpu_workers(device, requested: int = 0) -> int:
    """Worker threads for blocks on `device`: `requested`, else torch's thread count; 1 off the CPU."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, requested or torch.get_num_threads())


def run_blocks(spans: list[tuple[int, int]], workers: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(start, stop)`` for every span, on `workers` threads when there is more than one of each."""
    if workers <= 1 or len(spans) <= 1:
        for span in spans:
            work(*span)
        return
    with single_threaded_ops(), ThreadPoolExecutor(min(workers, len(spans)),
                                                   thread_name_prefix="sparsecode-block") as pool:
        for future in [pool.submit(work, *span) for span in spans]:
            future.result()         # re-raises a worker's error here
