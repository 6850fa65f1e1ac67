"""Small tensor operations shared by the framework and the encoder plug-ins."""
from __future__ import annotations

import warnings

import torch


def unit_rows(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`rows` (n, d) each scaled to unit L2 norm; a row of norm below `eps` is divided by `eps`."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations of each row (n, n_atoms), then ReLU; the rest are 0."""
    values, idx = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, torch.relu(values))


def sparse_rows_product(values: torch.Tensor, columns: torch.Tensor, matrix: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_m values[i, m] * matrix[columns[i, m]]`` for every row i: (n, m) values at (n, m) row
    indices of `matrix` (n_rows, width), giving (n, width); with `out`, added to it in place.

    One sparse (CSR) by dense product. It reads each needed row of `matrix` from cache, where
    gathering the rows first writes and re-reads an (n, m, width) copy: decoding 1,024 codes of 32
    atoms each at d 256 took 1.6 ms against 79 ms on the 2-core EPYC.
    """
    n, m = columns.shape
    crow = torch.arange(0, n * m + 1, m, device=columns.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # "sparse CSR support is in beta state"
        sparse = torch.sparse_csr_tensor(crow, columns.reshape(-1), values.reshape(-1),
                                         size=(n, matrix.shape[0]), check_invariants=False)
        if out is None:
            return sparse @ matrix
        return out.addmm_(sparse, matrix)


PRECISIONS = ("auto", "bfloat16", "full")


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (faster than float32, not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())   # AVX512-BF16 or AMX
        except (AttributeError, RuntimeError):
            return False
    return False


def low_precision(wanted: str, dtype: torch.dtype, device) -> torch.dtype | None:
    """The dtype of an encoder's products with all atoms when its `precision` option is `wanted`:
    bfloat16 for 'bfloat16', and for 'auto' with float32 input where the device multiplies bfloat16
    natively; None (the input's own dtype) otherwise."""
    if wanted == "bfloat16" or (wanted == "auto" and dtype == torch.float32 and bf16_is_native(device)):
        return torch.bfloat16
    return None
