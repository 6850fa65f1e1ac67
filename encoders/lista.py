"""LISTA (Gregor & LeCun 2010): T unrolled ISTA steps with learned matrices and thresholds."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsecode_encoders.iterative import FISTA, soft_threshold
from sparsecode._validation import as_tensor
from sparsecode.training import TrainableEncoder, TrainConfig, optimise


@dataclass(frozen=True)
class LISTAConfig(TrainConfig):
    lam: float = 0.1
    """Lasso penalty: initial thresholds, and the problem whose solution is the target."""
    unroll: int = 5
    """Unrolled steps T."""
    tied: bool = False
    """Tie the matrices to the dictionary (learn only a step size and thresholds per step)."""
    positive: bool = False
    """Non-negative codes."""
    target: str = "lasso"
    """'lasso': match FISTA's lasso solution of each training signal; 'codes': match given true codes."""

    def validate(self) -> None:
        super().validate()
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.target not in ("lasso", "codes"):
            raise ValueError(f"target must be 'lasso' or 'codes', got {self.target!r}")


class _Unrolled(nn.Module):
    """z_(t+1) = soft(W x + S z_t, theta_t) (untied), or soft(z_t - g_t (z_t G - x D^T), theta_t) (tied)."""

    def __init__(self, d_in: int, atoms: torch.Tensor, lipschitz: float, cfg: LISTAConfig):
        super().__init__()
        n_atoms = atoms.shape[0]
        step = 1.0 / lipschitz
        self.tied, self.positive = cfg.tied, cfg.positive
        self.theta = nn.Parameter(torch.full((cfg.unroll, n_atoms), cfg.lam * step, dtype=atoms.dtype))
        if cfg.tied:
            self.register_buffer("atoms", atoms.detach().clone())
            self.register_buffer("gram", atoms.detach() @ atoms.detach().T)
            self.gamma = nn.Parameter(torch.full((cfg.unroll,), step, dtype=atoms.dtype))
        else:
            self.W = nn.Parameter(step * atoms.detach().clone())
            self.S = nn.Parameter(torch.eye(n_atoms, dtype=atoms.dtype) - step * (atoms.detach() @ atoms.detach().T))

    def forward(self, x):
        if self.tied:
            b = x @ self.atoms.T
            z = torch.zeros_like(b)
            for t in range(self.theta.shape[0]):
                z = soft_threshold(z - self.gamma[t] * (z @ self.gram - b), self.theta[t], self.positive)
            return z
        b = x @ self.W.T
        z = soft_threshold(b, self.theta[0], self.positive)
        for t in range(1, self.theta.shape[0]):
            z = soft_threshold(b + z @ self.S.T, self.theta[t], self.positive)
        return z


class LISTA(TrainableEncoder):
    """Learned ISTA, trained on signals to reproduce the lasso solution (or the true codes)."""

    name = "lista"
    family = "unrolled"
    knob = "lam"
    Config = LISTAConfig
    #: it unrolls a given dictionary's ISTA: it cannot learn one
    learns_dictionary = False

    @classmethod
    def budget_params(cls, budget: int) -> dict:
        return {"unroll": budget}

    def _fit(self, x, y=None, codes=None) -> None:
        """Train on x (n, d) against the frozen dictionary (`fit(dictionary, x, codes=...)`). With
        target='codes', `codes` (n, n_atoms) are the targets; with 'lasso', FISTA's solutions at `lam` are."""
        if y is not None:
            raise ValueError("lista learns codes of x itself; it has no separate target signals y")
        if not isinstance(x, torch.Tensor) and hasattr(x, "head"):
            # its targets are the lasso solutions of all its signals, so it holds them in memory
            x = x.head(x.n_tokens)
        x, _ = self.training_tensors(x, None, self.dictionary.d)
        if self.config.target == "codes":
            if codes is None:
                raise ValueError("target='codes' needs fit(dictionary, x, codes=true_codes)")
            target = as_tensor(codes, "codes", device=x.device, dtype=x.dtype)
            if target.shape != (x.shape[0], self.dictionary.n_atoms):
                raise ValueError(f"codes must be ({x.shape[0]}, {self.dictionary.n_atoms}), got {tuple(target.shape)}")
        else:
            solver = FISTA(lam=self.config.lam, positive=self.config.positive, tol=1e-7)
            target = solver.fit(self.dictionary).encode(x)
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        self.net = self._seeded_build(x, self.dictionary.n_atoms, atoms)
        self.d_in = x.shape[1]
        self.net.train()
        self.losses = optimise(list(self.net.parameters()),
                               lambda idx: ((self.net(x[idx]) - target[idx]) ** 2).sum(1).mean(),
                               x.shape[0], self.config, what="train lista", device=x.device)
        self.net.eval()

    def learn(self, x, n_atoms, y=None):
        raise ValueError("lista learns to infer codes for a given dictionary; learn one first "
                         "(e.g. method='sparse-coding') and fit lista to it")

    def _build(self, d_in, n_atoms, x, atoms):
        if atoms is None:
            raise ValueError("lista needs the dictionary it unrolls")
        return _Unrolled(d_in, atoms, self.dictionary.lipschitz, self.config)

    def _codes(self, x):
        return self.net(x)

    def flops_per_signal(self, encoded=None) -> float:
        n, d, t = self.dictionary.n_atoms, self.dictionary.d, self.config.unroll
        return 2 * d * n + (t - 1) * (2 * n * n + 3 * n) + 3 * n
