"""Planted sparse-coding problems with known dictionary and codes (the paper-c generator)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ._validation import check_int_range, check_positive
from .dictionary import Dictionary
from .ops import unit_rows


@dataclass
class SparseData:
    """Signals with their true codes and dictionary: ``x = codes @ dictionary.atoms + noise``."""

    x: torch.Tensor            # (n, d)
    codes: torch.Tensor        # (n, n_atoms)
    dictionary: Dictionary
    k: int
    noise: float               # standard deviation of the added Gaussian noise
    seed: int

    @property
    def n_samples(self) -> int:
        return self.x.shape[0]

    def split(self, n_first: int) -> tuple["SparseData", "SparseData"]:
        """The first `n_first` samples and the rest (for train / test)."""
        check_int_range("n_first", n_first, 1, self.n_samples - 1)
        part = lambda sl: SparseData(self.x[sl], self.codes[sl], self.dictionary, self.k, self.noise, self.seed)
        return part(slice(None, n_first)), part(slice(n_first, None))


def random_dictionary(n_atoms: int, d: int, *, seed: int = 0, coherence: float = 0.0,
                      dtype=torch.float32) -> Dictionary:
    """Atoms drawn from a standard normal and scaled to unit norm.

    ``coherence = rho > 0`` mixes a direction shared by all atoms into each one,
    ``sqrt(1 - rho) g_i + sqrt(rho) c``, so atoms correlate with each other by about rho.
    """
    if not 0 <= coherence < 1:
        raise ValueError(f"coherence must be in [0, 1), got {coherence}")
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=gen, dtype=torch.float64)
    if coherence:
        shared = torch.randn(d, generator=gen, dtype=torch.float64)
        atoms = (1 - coherence) ** 0.5 * atoms / d ** 0.5 + coherence ** 0.5 * shared / shared.norm()
    return Dictionary(unit_rows(atoms).to(dtype))


def make_sparse_data(n_samples: int = 1024, d: int = 8, n_atoms: int = 16, k: int = 3, *,
                     noise: float = 0.0, snr_db: float | None = None, firing: str = "uniform",
                     power_law: float = 1.0, positive: bool = True, coherence: float = 0.0,
                     dictionary: Dictionary | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> SparseData:
    """Draw a planted sparse-coding problem (defaults: paper c's N=16 atoms in M=8 dimensions, K=3).

    Each code has exactly `k` non-zeros. With ``firing="uniform"`` their positions are uniform
    without replacement (paper c); with ``"power-law"`` atom i is drawn with weight
    ``(i + 1) ** -power_law`` (atom 0 the most frequent), as SAE features fire. Values are
    ``|N(0, 1)|`` (``positive=True``, paper c) or ``N(0, 1)``. Signals are ``codes @ atoms``, plus
    Gaussian noise of standard deviation `noise`, or of the level that gives `snr_db` (signal
    power over noise power, in dB, over the whole set). `coherence` correlates the atoms (see
    `random_dictionary`). A given `dictionary` plants the codes in it instead (its bias, if any, is
    added to every signal, so the codes decode to x with it).

    Returns
    -------
    SparseData with x (n_samples, d), codes (n_samples, n_atoms) and the Dictionary.
    """
    check_int_range("n_samples", n_samples, 1)
    check_int_range("d", d, 1)
    check_int_range("n_atoms", n_atoms, 1)
    check_int_range("k", k, 1, n_atoms, why=f" (n_atoms={n_atoms})")
    check_positive("noise", noise)
    check_positive("power_law", power_law)
    if snr_db is not None and (isinstance(snr_db, bool) or not isinstance(snr_db, numbers.Real)
                               or not math.isfinite(snr_db)):
        raise ValueError(f"snr_db must be a finite number of decibels, got {snr_db!r}")
    if snr_db is not None and noise:
        raise ValueError(f"give either noise={noise} or snr_db={snr_db}, not both")
    if firing not in ("uniform", "power-law"):
        raise ValueError(f"firing must be 'uniform' or 'power-law', got {firing!r}")
    if dictionary is None:
        dictionary = random_dictionary(n_atoms, d, seed=seed, coherence=coherence, dtype=dtype)
    elif (dictionary.n_atoms, dictionary.d) != (n_atoms, d):
        raise ValueError(f"dictionary is ({dictionary.n_atoms}, {dictionary.d}) but n_atoms={n_atoms}, d={d}")
    gen = torch.Generator().manual_seed(seed + 1)
    if firing == "uniform":
        support = torch.rand(n_samples, n_atoms, generator=gen).argsort(dim=1)[:, :k]
    else:
        weights = torch.arange(1, n_atoms + 1, dtype=torch.float64) ** -power_law
        support = torch.multinomial(weights.expand(n_samples, n_atoms), k, replacement=False, generator=gen)
    values = torch.randn(n_samples, k, generator=gen, dtype=torch.float64)
    if positive:
        values = values.abs()
    codes = torch.zeros(n_samples, n_atoms, dtype=torch.float64).scatter_(1, support, values)
    x = codes @ dictionary.atoms.to(torch.float64)
    if dictionary.bias is not None:        # a given decoder with a bias (an SAE's) decodes to codes @ atoms + bias
        x = x + dictionary.bias.to(torch.float64)
    if snr_db is not None:
        noise = float(((x ** 2).mean() / 10 ** (snr_db / 10)).sqrt())
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return SparseData(x.to(dtype), codes.to(dtype), dictionary, k, float(noise), seed)
