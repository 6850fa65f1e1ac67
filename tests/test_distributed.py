"""torch.distributed on the CPU: two gloo processes started by the test."""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from sparsecode import distributed, metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, world_size: int = 2, *args):
    """Run fn(rank, *args) in `world_size` processes set up as torchrun would."""
    port = _free_port()
    mp.start_processes(_entry, args=(fn, world_size, port, args), nprocs=world_size, join=True, start_method="spawn")


def _entry(rank, fn, world_size, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPARSECODE_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    group = distributed.setup("cpu")
    try:
        fn(group, *args)
    finally:
        distributed.teardown()


def test_parts_cover_every_item_once():
    for n in (0, 1, 5, 7, 100):
        for world in (1, 2, 3, 8):
            parts = [distributed.Group(r, world).part(n) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_without_a_launcher_the_group_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = distributed.setup()
    assert (group.rank, group.world_size, group.main) == (0, 1, True)
    t = torch.tensor([1.5, 2.0])
    assert group.sum(t) is t and group.gather("a") == ["a"] and group.max(3.0) == 3.0


def test_a_world_size_without_the_rest_of_the_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="RANK is set but|is not: start the job with torchrun"):
        distributed.setup("cpu")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 6, generator=g, dtype=torch.float64) * 3 + 1
    codes = torch.randn(103, 9, generator=g, dtype=torch.float64) * (torch.rand(103, 9, generator=g) < 0.3)
    x_hat = x + 0.1 * torch.randn(103, 6, generator=g, dtype=torch.float64)
    return x, x_hat, codes


def _reduce_case(group, out_dir):
    x, x_hat, codes = _data()
    acc = metrics.MetricAccumulator(9)
    batches = list(range(0, 103, 10))
    for i, start in enumerate(batches):
        if group.mine(i):
            sl = slice(start, start + 10)
            acc.update(x[sl], x_hat[sl], codes[sl], objective=(x[sl] ** 2).sum(1))
    (total,) = distributed.reduce_accumulators(group, [acc])
    summed = group.sum(torch.tensor([float(group.rank + 1)]))
    with open(os.path.join(out_dir, f"rank{group.rank}.json"), "w") as f:
        json.dump({"result": total.result(), "sum": float(summed), "max": group.max(float(group.rank))}, f)


def test_two_processes_reduce_metrics_to_the_one_process_numbers(tmp_path):
    _launch(_reduce_case, 2, str(tmp_path))
    x, x_hat, codes = _data()
    one = metrics.MetricAccumulator(9)
    one.update(x, x_hat, codes, objective=(x ** 2).sum(1))
    expected = one.result()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sum"] == 3.0 and got["max"] == 1.0
        assert got["result"].keys() == expected.keys()
        for key, value in expected.items():
            assert got["result"][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def _failing_case(group):
    if group.rank == 1:
        raise ValueError("rank 1 failed on purpose")
    group.barrier()                 # rank 0 waits for a rank that is gone


def test_a_failing_rank_stops_the_job_instead_of_hanging():
    # rank 0 waits in a collective for rank 1, which raised: the job ends with an error (rank 1's, or
    # rank 0's lost connection to it, whichever the launcher sees first), well before the timeout
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as err:
        _launch(_failing_case, 2)
    assert time.monotonic() - start < 55
    assert "rank 1 failed on purpose" in str(err.value) or "Connection" in str(err.value)
