"""Greedy pursuits: matching pursuit (MP) and orthogonal matching pursuit (OMP)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecode.encoder import Encoder, EncoderConfig


@dataclass(frozen=True)
class PursuitConfig(EncoderConfig):
    k: int = 16
    """Atoms to select per signal: the target L0."""
    tol: float | None = None
    """Also stop a signal once its relative residual ||r|| / ||x|| is at most tol."""
    chunk: int = 256
    """Signals processed together; bounds the working memory (chunk x k x n_atoms for OMP)."""

    def validate(self) -> None:
        super().validate()
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


def omp_chunk(alpha0: torch.Tensor, gram: torch.Tensor, diag: torch.Tensor, k: int,
              unexplained: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch OMP from the Gram matrix with a progressive Cholesky factorisation.

    `alpha0` is ``x @ D.T`` (n, n_atoms). The Cholesky factor L of the selected atoms' Gram
    matrix grows one row per step. Alongside it we keep ``C[:, m] = L[m, m] * D q_m``, the
    correlations of every atom with the m-th orthonormalised selected atom (Gram-Schmidt form of
    Rubinstein et al.'s Batch-OMP): L's new row is read from C, and the residual correlations
    take one rank-one update per step, with a single triangular solve at the end.
    `unexplained` (n,), when given, is the squared residual norm each signal may stop at; the
    residual's squared norm falls by ``u_j**2`` per step, so the test is free.
    Returns the selected indices (n, k) and their coefficients (n, k); a signal that stopped early
    (or whose residual lies in the span already) gets zero coefficients for its later picks.
    """
    n, n_atoms = alpha0.shape
    dtype, device = alpha0.dtype, alpha0.device
    rows = torch.arange(n, device=device)
    alpha = alpha0.clone()
    unit = bool(((diag - 1).abs() <= 1e-5).all())
    scale = None if unit else diag.rsqrt()                 # pick by normalised correlation
    score = torch.empty_like(alpha)
    C = torch.empty(n, max(k - 1, 1), n_atoms, dtype=dtype, device=device)
    L = torch.zeros(n, k, k, dtype=dtype, device=device)
    inv_d = torch.zeros(n, k, dtype=dtype, device=device)  # 1 / L[m, m]
    u = torch.zeros(n, k, dtype=dtype, device=device)     # coordinates of x in the orthonormal basis
    idx = torch.zeros(n, k, dtype=torch.long, device=device)
    remaining = unexplained
    eps = torch.finfo(dtype).eps * 16
    for j in range(k):
        torch.abs(alpha, out=score)
        if scale is not None:
            score.mul_(scale)
        pick = score.max(dim=1).indices
        idx[:, j] = pick
        diag_p = diag.index_select(0, pick)
        # L's new row: w_m = <q_m, d_pick> = C[:, m, pick] / L[m, m]
        w = torch.gather(C[:, :j], 2, pick.view(n, 1, 1).expand(n, j, 1)).squeeze(2) * inv_d[:, :j]
        norm2 = diag_p - (w * w).sum(1)
        ok = norm2 > eps * diag_p                          # atom not in the span of those taken
        if remaining is not None:
            ok &= remaining > 0
        d_jj = torch.where(ok, norm2.clamp_min(eps).sqrt(), torch.ones_like(norm2))
        L[:, j, :j] = w * ok[:, None]
        L[:, j, j] = d_jj
        inv_d[:, j] = 1 / d_jj
        u_j = alpha[rows, pick] * ok / d_jj
        u[:, j] = u_j
        if j == k - 1:
            break                                          # the last pick needs no residual update
        c_j = gram.index_select(0, pick)
        if j:
            c_j.unsqueeze(1).baddbmm_((w * inv_d[:, :j]).unsqueeze(1), C[:, :j], alpha=-1)
        C[:, j] = c_j
        alpha.addcmul_((u_j / d_jj)[:, None], c_j, value=-1)
        if remaining is not None:
            remaining = remaining - u_j * u_j
    # The codes solve L^T gamma = u (upper triangular): D_I = L Q and x's projection is u Q.
    gamma = torch.linalg.solve_triangular(L.transpose(1, 2), u.unsqueeze(-1), upper=True).squeeze(-1)
    return idx, gamma


class _Pursuit(Encoder):
    family = "greedy"
    knob = "k"
    Config = PursuitConfig

    def _scatter(self, x, idx, coef) -> torch.Tensor:
        codes = x.new_zeros(x.shape[0], self.dictionary.n_atoms)
        return codes.scatter_add_(1, idx, coef)

    def _energy_to_explain(self, x):
        """Squared residual norm that may be removed before the tolerance ||r|| <= tol ||x|| is met."""
        if self.config.tol is None:
            return None
        return (1 - self.config.tol ** 2) * (x * x).sum(1)


class OMP(_Pursuit):
    """Orthogonal matching pursuit: greedy selection, least-squares refit of all selected atoms."""

    name = "omp"
    k_within_d = True

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        gram = self.dictionary.gram(x.dtype, x.device)
        diag = gram.diagonal().contiguous()
        codes = []
        for xs in x.split(self.config.chunk):
            idx, coef = omp_chunk(xs @ atoms.T, gram, diag, self.config.k, self._energy_to_explain(xs))
            codes.append(self._scatter(xs, idx, coef))
        self.n_iter_ = float(self.config.k)
        return torch.cat(codes)

    def flops_per_signal(self) -> float:
        n_atoms, d, k = self.dictionary.n_atoms, self.dictionary.d, self.config.k
        # x D^T, then per step j: rank-one update of C (2 j n_atoms) and alpha (2 n_atoms),
        # argmax (2 n_atoms); finally a k x k triangular solve.
        return 2 * d * n_atoms + sum(2 * j * n_atoms + 5 * n_atoms for j in range(k)) + k * k


class MP(_Pursuit):
    """Matching pursuit: k greedy steps, each updating only the chosen atom's coefficient."""

    name = "mp"

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        gram = self.dictionary.gram(x.dtype, x.device)
        diag = gram.diagonal()
        scale = diag.rsqrt()
        codes = []
        for xs in x.split(self.config.chunk):
            rows = torch.arange(xs.shape[0], device=x.device)
            alpha = xs @ atoms.T
            z = torch.zeros_like(alpha)
            remaining = self._energy_to_explain(xs)
            for _ in range(self.config.k):
                pick = (alpha.abs() * scale).max(dim=1).indices
                step = alpha[rows, pick] / diag[pick]
                if remaining is not None:
                    step = step * (remaining > 0)
                    remaining = remaining - step * step * diag[pick]
                z[rows, pick] += step
                alpha.addcmul_(step[:, None], gram.index_select(0, pick), value=-1)
            codes.append(z)
        self.n_iter_ = float(self.config.k)
        return torch.cat(codes)

    def flops_per_signal(self) -> float:
        n_atoms, d, k = self.dictionary.n_atoms, self.dictionary.d, self.config.k
        return 2 * d * n_atoms + k * 5 * n_atoms
