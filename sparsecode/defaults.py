"""Sparsity knobs derived from the problem, for comparisons where the user set none."""
from __future__ import annotations

import torch

from .dictionary import Dictionary, as_dictionary

#: signals read to derive `lam` (a median over this many is stable to a few percent)
SAMPLE = 4096
#: the derived k never exceeds this (SAEs on LLMs use k of 16 to 64; OMP's cost grows with k^2)
MAX_K = 16
#: lam as a fraction of the median per-signal lam_max (see `default_knobs`)
LAM_FRACTION = 0.1


def default_k(d: int, n_atoms: int) -> int:
    """``min(16, d // 2, n_atoms)``, at least 1.

    Half the dimension keeps a greedy encoder well inside what it can solve (OMP needs k <= d;
    exact recovery of a k-sparse code needs roughly 2k measurements), and 16 is the usual scale
    of an SAE's L0 on LLM activations, where d is hundreds.
    """
    return max(1, min(MAX_K, d // 2, n_atoms))


def lam_max(x: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
    """Per signal, the smallest lasso penalty whose solution is all zeros: ``max_j |<x - bias, D_j>|``
    (the objective's gradient at z = 0 in the sparsecode convention, no 1/n scaling)."""
    atoms = dictionary.atoms_as(x.dtype, x.device)
    r = x if dictionary.bias is None else x - dictionary.bias.to(device=x.device, dtype=x.dtype)
    return (r @ atoms.T).abs().amax(dim=1)


def default_knobs(x, dictionary, codes=None) -> dict:
    """The `k` and `lam` a comparison uses where the user set neither: ``{"k": int, "lam": float}``.

    k is the true codes' mean number of non-zeros, rounded (when `codes` are given: the planted
    sparsity is the problem's own), else `default_k` of the dictionary's sizes. lam is ``0.1 *`` the median over (up to 4,096)
    signals of `lam_max`: the penalty at which each signal's lasso solution becomes zero is the
    natural scale of the problem (calibration searches below it too), so a fixed fraction of it
    gives the same moderate sparsity whatever the signals' norm, where a fixed number such as 0.1
    is dense on large-norm activations and all-zero on small ones.
    """
    dictionary = as_dictionary(dictionary)
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != dictionary.d:
        raise ValueError(f"x must be (n, d={dictionary.d}) to derive default knobs, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x has no signals to derive default knobs from")
    sample = x[:SAMPLE]
    if not sample.is_floating_point():
        sample = sample.double()
    lam = LAM_FRACTION * float(lam_max(sample, dictionary).median())
    if lam <= 0:
        raise ValueError("every signal is orthogonal to every atom (lam_max = 0): no lasso penalty can be derived; "
                         "set lam yourself")
    if codes is not None and len(codes):
        k = max(1, round(float((torch.as_tensor(codes) != 0).sum(1).double().mean())))
    else:
        k = default_k(dictionary.d, dictionary.n_atoms)
    return {"k": k, "lam": lam}
