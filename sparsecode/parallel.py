"""CPU parallelism that degrades gracefully on a busy machine: blocks of signals on worker threads.

Solvers that run many small torch operations per signal (greedy pursuits, iterative solvers on small
working sets) scale with cores through `run_blocks`, not through torch's intra-op thread pool.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_threads_lock = threading.Lock()
_threads_users = [0, 0]          # callers inside one_thread_per_op now, torch's thread count before them


@contextlib.contextmanager
def one_thread_per_op():
    """Run torch operations single-threaded while worker threads run blocks of signals in parallel.

    Why: torch's CPU operations use an OpenMP pool of one thread per core, and every operation ends
    at a barrier where all of them meet. A greedy pursuit runs many small operations (a few per step
    per block), so when another process takes a core, the thread descheduled there holds every barrier
    for a scheduler time slice and throughput collapses (measured: omp at 0.08x spams.omp with one
    core busy, 1.35x when quiet). With one thread per operation there are no barriers: each worker
    pulls the next block when it finishes its own, so a slow core slows only its own blocks.
    torch releases the GIL inside its operations, so the workers do run in parallel.
    """
    with _threads_lock:
        if _threads_users[0] == 0:
            _threads_users[1] = torch.get_num_threads()
            torch.set_num_threads(1)    # new threads take this count when they first run an operation
        _threads_users[0] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users[0] -= 1
            if _threads_users[0] == 0:
                torch.set_num_threads(_threads_users[1])


#: Worker threads kept for the process, by pool size: starting threads for every call cost more than
#: the blocks of a small call (FISTA's working sets at 16,384 atoms run blocks of 0.2 ms, and a fresh
#: pool's first thread took them all before the second had started).
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(size)
        if pool is None:
            pool = _pools[size] = ThreadPoolExecutor(size, "sparsecode-worker")
        return pool


def _after_fork() -> None:
    # A forked child has none of the parent's threads: pools that count them would never start a new
    # one, and a lock held by another thread at the fork would never be released.
    global _pools_lock, _threads_lock
    _pools.clear()
    _pools_lock, _threads_lock = threading.Lock(), threading.Lock()
    _threads_users[0] = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def run_blocks(n: int, block: int, workers: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(start, stop)`` for consecutive blocks of range(n), on `workers` threads when > 1.

    The calling thread and `workers` - 1 threads of a pool kept for the process take blocks as they
    finish the previous one, and run torch operations single-threaded meanwhile (see
    `one_thread_per_op`); blocks are shrunk to equal sizes, their number a multiple of the workers, so
    that every worker gets the same share. The first exception stops the handing out of blocks and
    propagates. With one worker the blocks run here, with torch's own threads.
    """
    if workers > 1 and n > 0:
        # as many blocks as a multiple of the workers, of equal size (never larger than asked): with
        # blocks of 1,323 for 4,096 signals on 2 workers, one worker had a block left for itself
        count = -(-n // max(1, block))
        count = -(-count // workers) * workers
        block = max(1, -(-n // count))
    spans = [(s, min(s + block, n)) for s in range(0, n, block)]
    if workers <= 1 or len(spans) == 1:
        for span in spans:
            work(*span)
        return
    queue = iter(spans)
    lock = threading.Lock()
    failed: list[BaseException] = []

    def drain() -> None:
        # the caller drains the queue too, so a call never needs a pool thread to finish
        while not failed:
            with lock:
                span = next(queue, None)
            if span is None:
                return
            try:
                work(*span)
            except BaseException as err:       # noqa: BLE001 - re-raised in the caller below
                failed.append(err)

    helpers = min(workers, len(spans)) - 1
    with one_thread_per_op():
        futures = [_pool(helpers).submit(drain) for _ in range(helpers)]
        drain()
        # the queue is empty now: a helper still waiting for a thread (all of them busy with another
        # call, or with the call around this one) has nothing left to do, so it is cancelled
        for future in futures:
            if not future.cancel():
                future.result()
    if failed:
        raise failed[0]


def cpu_workers(device, requested: int = 0) -> int:
    """Worker threads for blocks on `device`: `requested`, else torch's thread count; 1 off the CPU
    (a GPU runs one block at a time, each operation already parallel)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, requested or torch.get_num_threads())
