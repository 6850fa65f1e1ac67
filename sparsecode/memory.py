"""Memory budgets: how much working memory a computation may take, and chunk sizes derived from it.

Every solver that holds per-signal state sizes its chunks from a budget instead of a constant, so
the same code runs a 1,024-atom toy and a 1M-atom SAE decoder. The budget is a user option
(`memory="4GB"`); by default it is a safe share of the device's free memory.
"""
from __future__ import annotations

import os
import re

import torch

#: Share of the device's free memory a computation takes when the user sets no budget.
DEFAULT_FRACTION = 0.5

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(value) -> int | None:
    """Bytes in `value`: an int (bytes) or a string such as "4GB", "512MiB", "1.5g"; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"memory must be a size such as '4GB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        size = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"memory must be a size such as '4GB', '512MiB' or a number of bytes, got {value!r}")
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise TypeError(f"memory must be a size such as '4GB' or a number of bytes, got {type(value).__name__}")
    if not size > 0 or size == float("inf"):
        raise ValueError(f"memory must be a positive size, got {value!r}")
    return int(size)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def free_memory(device) -> int:
    """Bytes the device can still hand out: CUDA's free memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2 ** 30   # no way to ask (e.g. some non-Linux hosts): assume a small machine


def memory_budget(memory=None, device="cpu") -> int:
    """The working-memory budget in bytes: `memory` as given, else a safe share of what is free."""
    budget = parse_memory(memory)
    if budget is None:
        budget = int(DEFAULT_FRACTION * free_memory(device))
    return budget


def rows_within(budget: int, bytes_per_row: float, fixed: float = 0, *, what: str = "signal",
                at_most: int | None = None) -> int:
    """How many rows (signals) fit in `budget` bytes when each costs `bytes_per_row` on top of `fixed`.

    Raises a ValueError naming the budget when not even one row fits, so a user who set a budget too
    small learns which number to raise instead of meeting an out-of-memory error deep in a solver.
    """
    rows = int((budget - fixed) // max(bytes_per_row, 1))
    if rows < 1:
        raise ValueError(f"memory budget {format_bytes(budget)} is too small: one {what} needs "
                         f"{format_bytes(fixed + bytes_per_row)}; raise memory (e.g. memory='"
                         f"{max(1, int((fixed + bytes_per_row) * 2 / 1e9 + 0.999))}GB')")
    return rows if at_most is None else max(1, min(rows, at_most))


def fits(budget: int, nbytes: float) -> bool:
    """Whether an allocation of `nbytes` fits in `budget` (used to choose Gram-based variants)."""
    return nbytes <= budget
