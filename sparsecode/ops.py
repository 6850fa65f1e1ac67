"""Small tensor operations shared by the framework and the encoder plug-ins."""
from __future__ import annotations

import torch


def unit_rows(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`rows` (n, d) each scaled to unit L2 norm; a row of norm below `eps` is divided by `eps`."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations of each row (n, n_atoms), then ReLU; the rest are 0."""
    values, idx = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, torch.relu(values))
