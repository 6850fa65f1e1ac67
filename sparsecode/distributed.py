"""Several processes on one job, with torch.distributed.

The long commands run unchanged under ``torchrun --nproc-per-node N --no-python sparsecode ...``
(and so under the SLURM and Kubernetes launchers that start torchrun or set the same variables):
`setup` reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), joins the process group (NCCL where each rank has a GPU, gloo
otherwise) and puts each rank on its own device. Without a launcher, everything here acts as a
group of one process, so library code calls it unconditionally.

Work is divided by a fixed rule (`Group.part`, `Group.mine`) and results are combined from sums and
counts (`Group.sum`, `Group.gather`), never by averaging averages, so N processes give one
process's numbers up to float rounding.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

#: How long a collective waits for the other ranks before the job fails (seconds; the environment
#: variable SPARSECODE_DIST_TIMEOUT overrides it). A rank that dies makes the others fail after at
#: most this long instead of hanging; torchrun also stops the job when one rank exits with an error.
TIMEOUT_S = 600


@dataclass(frozen=True)
class Group:
    """This process's place among the job's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is the rank that writes shared files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def part(self, n: int, rank: int | None = None) -> range:
        """The contiguous share of `n` items that `rank` (default: this one) takes: the first
        ``n % world_size`` ranks take one more."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))

    def mine(self, index: int) -> bool:
        """Whether item `index` of a stream dealt round-robin belongs to this rank."""
        return index % self.world_size == self.rank

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over all ranks (float64 on the host for gloo)."""
        if not self.distributed:
            return values
        t = _collective_tensor(values)
        torch.distributed.all_reduce(t)
        return t.to(values.device, values.dtype)

    def max(self, value: float) -> float:
        """The largest `value` over all ranks."""
        if not self.distributed:
            return value
        t = _collective_tensor(torch.tensor([value], dtype=torch.float64))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: Any) -> list:
        """Every rank's `obj` (picklable, built by this program), in rank order."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def worst(self, count: int, errors: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows of each of `rows` (indexed like `errors`, this rank's items) at the `count` largest
        `errors` of all ranks, largest first, identical on every rank.

        Each rank offers its own `count` worst, and every rank takes the worst of all offers: the
        whole set's worst, ranked as one process ranks them. Alone, `errors.topk` picks them."""
        offer = errors.topk(min(count, errors.shape[0])).indices
        if not self.distributed:
            return tuple(r[offer] for r in rows)
        offers = self.gather(tuple(t[offer].cpu() for t in (errors, *rows)))
        merged = [torch.cat([o[i] for o in offers]).to(errors.device) for i in range(len(rows) + 1)]
        top = merged[0].topk(min(count, merged[0].shape[0])).indices
        return tuple(m[top] for m in merged[1:])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def _collective_tensor(values: torch.Tensor) -> torch.Tensor:
    # gloo reduces host tensors; NCCL needs them on this rank's GPU
    if torch.distributed.get_backend() == "nccl":
        return values.detach().to(f"cuda:{torch.cuda.current_device()}", torch.float64).clone()
    return values.detach().to("cpu", torch.float64).clone()


def launched() -> bool:
    """Whether a launcher started this process as one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def current() -> Group:
    """The group this process belongs to: the initialised process group, or a group of one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Group(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())))
    return Group()


def setup(device: str | torch.device | None = None) -> Group:
    """Join the launcher's process group (once) and return this process's `Group`.

    Backend: NCCL when CUDA is available and `device` is not the CPU, gloo otherwise. With NCCL each
    rank takes the GPU ``LOCAL_RANK``. Without a launcher this returns a group of one."""
    if not launched():
        return Group()
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed, which a torchrun launch needs")
    if not torch.distributed.is_initialized():
        for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE is set but {name} is not: start the job with torchrun")
        cpu = device is not None and torch.device(device).type == "cpu"
        backend = "nccl" if torch.cuda.is_available() and not cpu else "gloo"
        if backend == "nccl":
            local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
            if local >= gpus:
                raise ValueError(f"local rank {local} needs GPU {local}, but this node has {gpus}: start at most "
                                 f"{gpus} processes per node (torchrun --nproc-per-node), or run on the CPU "
                                 "(--device cpu)")
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=float(os.environ.get("SPARSECODE_DIST_TIMEOUT", TIMEOUT_S)))
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
        log.info("rank %d of %d (%s)", torch.distributed.get_rank(), torch.distributed.get_world_size(), backend)
    return current()


def rank_device(device: str | torch.device | None) -> torch.device | None:
    """`device` for this rank: a bare "cuda" becomes the rank's own GPU (``cuda:LOCAL_RANK``)."""
    if device is None or not launched():
        return None if device is None else torch.device(device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def reduce_accumulators(group: Group, accumulators: Sequence) -> list:
    """Merge each rank's `metrics.MetricAccumulator`s position by position, in rank order, so every
    rank holds the whole set's accumulators (identical on all ranks)."""
    if not group.distributed:
        return list(accumulators)
    parts = group.gather([_portable(acc) for acc in accumulators])
    merged = []
    for i in range(len(accumulators)):
        total = parts[0][i]
        for other in parts[1:]:
            total.merge(other[i])
        merged.append(total)
    return merged


def _portable(acc):
    # on the host, so that gloo can carry it whatever device the rank computed on
    acc.fired = acc.fired.cpu()
    if acc.mean is not None:
        acc.mean, acc.m2 = acc.mean.cpu().double(), acc.m2.cpu().double()
    return acc
