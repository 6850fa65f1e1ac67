"""LISTA (Gregor & LeCun 2010): T unrolled ISTA steps with learned matrices and thresholds."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsecode_encoders.iterative import FISTA, soft_threshold
from sparsecode._validation import as_tensor
from sparsecode.checkpoint import data_checksum
from sparsecode.training import TrainableEncoder, TrainConfig, optimise


@dataclass(frozen=True)
class UnrolledConfig(TrainConfig):
    lam: float = 0.1
    """Lasso penalty: initial thresholds, and the problem whose solution is the target."""
    unroll: int = 5
    """Unrolled steps T."""
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


@dataclass(frozen=True)
class LISTAConfig(UnrolledConfig):
    tied: bool = False
    """Tie the matrices to the dictionary (learn only a step size and thresholds per step)."""


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
            self.S = nn.Parameter(torch.eye(n_atoms, dtype=atoms.dtype, device=atoms.device) - step * (atoms.detach() @ atoms.detach().T))

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
            raise ValueError(f"{self.name} learns codes of x itself; it has no separate target signals y")
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
                               x.shape[0], self.config, what=f"train {self.name}", device=x.device,
                               identity={"data": data_checksum(x), "dictionary": data_checksum(atoms)})
        self.net.eval()

    def learn(self, x, n_atoms, y=None):
        raise ValueError(f"{self.name} learns to infer codes for a given dictionary; learn one first "
                         f"(e.g. method='sparse-coding') and fit {self.name} to it")

    def _build(self, d_in, n_atoms, x, atoms):
        if atoms is None:
            raise ValueError(f"{self.name} needs the dictionary it unrolls")
        return _Unrolled(d_in, atoms, self.dictionary.lipschitz, self.config)

    def _codes(self, x):
        return self.net(x)

    def flops_per_signal(self, encoded=None) -> float:
        n, d, t = self.dictionary.n_atoms, self.dictionary.d, self.config.unroll
        return 2 * d * n + (t - 1) * (2 * n * n + 3 * n) + 3 * n


def analytic_weight(atoms: torch.Tensor) -> torch.Tensor:
    """ALISTA's analytic weight (Liu, Chen, Wang & Yin 2019): W (n_atoms, d) minimising the mutual
    coherence ``sum_(i != j) (w_i . d_j)^2`` subject to ``w_i . d_i = 1``.

    The problem separates by rows: minimise ``w^T M w`` (M = D^T D, since the term j = i is fixed at 1)
    subject to ``d_i . w = 1``, whose solution is ``w_i = M^+ d_i / (d_i^T M^+ d_i)``. Computed in float64
    from the d x d matrix M (no n_atoms^2 values).
    """
    a = atoms.detach().double()
    p = a @ torch.linalg.pinv(a.T @ a, hermitian=True)
    scale = (p * a).sum(1, keepdim=True)
    if bool((scale <= 0).any()):
        raise ValueError("alista needs non-zero atoms: atom "
                         f"{int((scale <= 0).flatten().nonzero()[0])} is zero")
    return (p / scale).to(atoms.dtype)


def _spectral_norm(atoms: torch.Tensor, weight: torch.Tensor, steps: int = 100) -> float:
    """Largest singular value of W D^T (n_atoms x n_atoms), by power iteration on products with W and D."""
    v = torch.ones(atoms.shape[0], dtype=torch.float64, device=atoms.device)
    a, w = atoms.double(), weight.double()
    for _ in range(steps):
        v = ((v @ w) @ a.T) @ a @ w.T           # v (W D^T)^T (W D^T), written from the rows
        v = v / v.norm().clamp_min(1e-300)
    return float(((v @ w) @ a.T).norm())


class _Analytic(nn.Module):
    """z_(t+1) = soft(z_t - gamma_t (z_t D - x) W^T, theta_t), W analytic and fixed; gamma_t, theta_t learned."""

    def __init__(self, atoms: torch.Tensor, cfg: UnrolledConfig):
        super().__init__()
        self.positive = cfg.positive
        weight = analytic_weight(atoms)
        self.register_buffer("atoms", atoms.detach().clone())
        self.register_buffer("weight", weight)
        step = 1.0 / _spectral_norm(atoms, weight)
        self.gamma = nn.Parameter(torch.full((cfg.unroll,), step, dtype=atoms.dtype))
        self.theta = nn.Parameter(torch.full((cfg.unroll,), cfg.lam * step, dtype=atoms.dtype))

    def forward(self, x):
        z = soft_threshold(self.gamma[0] * (x @ self.weight.T), self.theta[0], self.positive)
        for t in range(1, self.theta.shape[0]):
            z = soft_threshold(z - self.gamma[t] * ((z @ self.atoms - x) @ self.weight.T), self.theta[t], self.positive)
        return z


class ALISTA(LISTA):
    """Analytic LISTA: the weight computed from the dictionary, only a step size and a threshold per
    unrolled step learned (2 T numbers), trained like LISTA."""

    name = "alista"
    Config = UnrolledConfig

    def _build(self, d_in, n_atoms, x, atoms):
        if atoms is None:
            raise ValueError(f"{self.name} needs the dictionary it unrolls")
        return _Analytic(atoms, self.config)

    def flops_per_signal(self, encoded=None) -> float:
        n, d, t = self.dictionary.n_atoms, self.dictionary.d, self.config.unroll
        return 2 * d * n + (t - 1) * (4 * d * n + 2 * d + 3 * n) + 3 * n
