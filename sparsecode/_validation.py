"""Checks done once at the public boundary; everything behind it trusts its inputs."""
from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(value, name: str, *, ndim: int = 2, dtype=None, device=None) -> torch.Tensor:
    """Convert `value` (torch or numpy) to a floating tensor and check its shape and values.

    numpy input becomes a tensor on the CPU (or `device`) without a copy where possible; integer
    input is promoted to float32. NaN and Inf are rejected, naming the array and the first bad row.
    """
    if isinstance(value, np.ndarray):
        if value.dtype == object or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if not value.is_floating_point():
        if value.is_complex():
            raise TypeError(f"{name} must be real, got dtype {value.dtype}")
        value = value.to(torch.float32)
    if dtype is not None or device is not None:
        value = value.to(device=device, dtype=dtype)
    if value.ndim != ndim:
        shape = "(n, d)" if ndim == 2 else f"{ndim}-D"
        raise ValueError(f"{name} must be {shape}, got shape {tuple(value.shape)}")
    if any(s == 0 for s in value.shape):
        raise ValueError(f"{name} is empty: shape {tuple(value.shape)}")
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = (~finite).reshape(value.shape[0], -1).any(dim=1).nonzero()[0, 0].item() if ndim > 1 else None
        where = f" (first at row {bad})" if bad is not None else ""
        raise ValueError(f"{name} contains NaN or Inf{where}")
    return value


def check_positive(name: str, value: float, *, allow_zero: bool = True) -> None:
    if value is None:
        return
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_int_range(name: str, value: int, low: int, high: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {span}{why}, got {value}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto" picks cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here")
    return device


def describe_device(device: str | torch.device | None) -> str:
    """The device `resolve_device` picks, in words for result files and titles: the GPU's name, or
    the CPU and torch's thread count."""
    where = resolve_device(device)
    if where.type == "cuda":
        return torch.cuda.get_device_name(where)
    return f"CPU, {torch.get_num_threads()} threads"
