"""Reference solvers from other libraries, adapted to sparsecode's conventions.

Each adapter solves the problem our encoder of the same family solves for the same knob: `k`
atoms chosen greedily and refitted by least squares, or the lasso ``0.5 ||x - z D||^2 + lam ||z||_1`` per signal. The traps:
scikit-learn's `sparse_encode` divides `alpha` by the number of features internally, which turns
its objective into ours times 1/d, so `alpha=lam` is the same problem; SPAMS wants float64,
Fortran-ordered arrays with signals as columns and returns scipy sparse matrices; both OMPs
assume unit-norm atoms, so other dictionaries are normalised and the codes rescaled.

The greedy rule differs: scikit-learn's `orthogonal_mp_gram` is OMP, like our `omp` (the next
atom is the one most correlated with the residual, max_j |<r, d_j>|), but SPAMS's `omp` is
*order-recursive* matching pursuit (ORMP, also called orthogonal least squares or forward
selection: its C++ core is `coreORMP`): the next atom is the one whose addition leaves the
smallest least-squares residual, max_j |<r, P d_j>| / ||P d_j|| with P the projection away from
the selected atoms. Both refit all selected coefficients, so both reach L0 = k, and on sparse
problems with incoherent atoms both recover the planted support; on dense signals they choose
other supports (about 40% of signals agree at k=8, d=32, 64 atoms; ORMP's residuals are a little
smaller). SPAMS also needs float64 here: in float32 it returned other (all-zero) codes.
"""
from __future__ import annotations

import abc
import importlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from sparsecode.encoder import Encoder, EncoderConfig, to_numpy64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OMPReferenceConfig(EncoderConfig):
    k: int = 16
    """Atoms to select per signal: the target L0."""


@dataclass(frozen=True)
class LassoReferenceConfig(EncoderConfig):
    lam: float = 0.1
    """Lasso penalty: each signal minimises 0.5*||x - z D||^2 + lam*||z||_1 (no 1/n or 1/d scaling)."""
    positive: bool = False
    """Constrain codes to be non-negative."""


@dataclass(frozen=True)
class SklearnLassoConfig(LassoReferenceConfig):
    algorithm: str = "lars"
    """'lars' (LassoLars, exact homotopy) or 'cd' (coordinate descent)."""
    max_iter: int = 1000
    """Most iterations of the solver."""

    def validate(self) -> None:
        super().validate()
        if self.algorithm not in ("lars", "cd"):
            raise ValueError(f"algorithm must be 'lars' or 'cd', got {self.algorithm!r}")


@dataclass(frozen=True)
class SpamsConfig(EncoderConfig):
    threads: int = -1
    """Threads SPAMS may use (-1: all cores)."""


@dataclass(frozen=True)
class SpamsOMPConfig(OMPReferenceConfig, SpamsConfig):
    """OMP's k plus SPAMS's thread count."""


@dataclass(frozen=True)
class SpamsLassoConfig(LassoReferenceConfig, SpamsConfig):
    """The lasso's lam and positivity plus SPAMS's thread count."""


@dataclass(frozen=True)
class CvxpyLassoConfig(LassoReferenceConfig):
    solver: str = "CLARABEL"
    """cvxpy solver name; Clarabel (interior point) gives the optimum to high accuracy."""


def _greedy_flops(d: int, n_atoms: int, steps: float) -> float:
    """Cholesky batch OMP / LARS cost: x D^T, then per step j a Gram column update of j atoms."""
    steps = int(round(steps))
    return 2 * d * n_atoms + sum(2 * j * n_atoms + 5 * n_atoms for j in range(steps)) + steps * steps


class _Reference(Encoder):
    """Runs a numpy solver on float64 copies and returns codes in the input's dtype and device."""

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        codes = self._solve(to_numpy64(x), to_numpy64(self.dictionary.atoms))
        return torch.from_numpy(np.asarray(codes)).to(device=x.device, dtype=x.dtype)

    @abc.abstractmethod
    def _solve(self, x: np.ndarray, atoms: np.ndarray) -> np.ndarray:
        """Codes (n, n_atoms) for float64 signals (n, d) and atoms (n_atoms, d)."""

    def flops_per_signal(self, encoded=None) -> float:
        # the homotopy / greedy steps are the atoms a signal ends with: the call's mean L0 (k when not given)
        if encoded is not None:
            steps = float((encoded.codes != 0).sum(1).double().mean()) if encoded.codes.shape[0] else 0.0
        else:
            steps = getattr(self.config, "k", 0)
        return _greedy_flops(self.dictionary.d, self.dictionary.n_atoms, steps)


def _unit_atoms(atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(atoms, axis=1)
    return atoms / norms[:, None], norms


class SklearnOMP(_Reference):
    """scikit-learn's `orthogonal_mp_gram` (Cholesky OMP on the Gram matrix)."""

    name = "sklearn-omp"
    family = "greedy"
    knob = "k"
    k_within_d = True
    slow = True
    gram_itemsize = 8
    Config = OMPReferenceConfig

    def _solve(self, x, atoms):
        from sklearn.linear_model import orthogonal_mp_gram
        unit, norms = _unit_atoms(atoms)
        coef = orthogonal_mp_gram(unit @ unit.T, unit @ x.T, n_nonzero_coefs=self.config.k, copy_Xy=False)
        return np.atleast_2d(coef.T) / norms


class SklearnLasso(_Reference):
    """scikit-learn's `sparse_encode` with LassoLars or coordinate descent (single process)."""

    name = "sklearn-lasso"
    family = "lasso"
    knob = "lam"
    Config = SklearnLassoConfig
    slow = True

    @classmethod
    def reference_params(cls, lam: float, positive: bool) -> dict:
        return {**super().reference_params(lam, positive), "max_iter": max(20000, cls.Config.max_iter)}

    def _solve(self, x, atoms):
        from sklearn.decomposition import sparse_encode
        algorithm = {"lars": "lasso_lars", "cd": "lasso_cd"}[self.config.algorithm]
        # sparse_encode divides alpha by d itself: alpha=lam is our objective scaled by 1/d.
        return sparse_encode(x, atoms, algorithm=algorithm, alpha=self.config.lam, positive=self.config.positive,
                             max_iter=self.config.max_iter, n_jobs=None)

    def flops_per_signal(self, encoded=None) -> float:
        return super().flops_per_signal() if self.config.algorithm == "lars" else float("nan")


class _Spams(_Reference):
    requires = {"spams": "spams-bin"}
    gram_itemsize = 8                   # SPAMS computes D^T D in float64 on every call

    @staticmethod
    def _columns(a: np.ndarray) -> np.ndarray:
        return np.asfortranarray(a.T, dtype=np.float64)


class SpamsOMP(_Spams):
    """SPAMS `omp`: order-recursive matching pursuit (ORMP) with Cholesky updates, in C++.

    Not OMP's selection rule: each step adds the atom that minimises the refitted residual (see
    the module docstring); with unit-norm atoms and incoherent sparse problems it agrees with OMP.
    """

    name = "spams-omp"
    family = "greedy"
    knob = "k"
    k_within_d = True
    speed_reference = True
    Config = SpamsOMPConfig

    def _solve(self, x, atoms):
        spams = importlib.import_module("spams")
        unit, norms = _unit_atoms(atoms)
        codes = spams.omp(self._columns(x), self._columns(unit), L=self.config.k, numThreads=self.config.threads)
        return codes.toarray().T / norms


class SpamsLasso(_Spams):
    """SPAMS `lasso` (C++ LARS homotopy), mode 2: 0.5||x - D a||^2 + lambda1 ||a||_1."""

    name = "spams-lasso"
    family = "lasso"
    knob = "lam"
    speed_reference = True
    Config = SpamsLassoConfig

    def _solve(self, x, atoms):
        spams = importlib.import_module("spams")
        codes = spams.lasso(self._columns(x), self._columns(atoms), lambda1=self.config.lam, lambda2=0.0,
                            mode=2, pos=self.config.positive, numThreads=self.config.threads)
        return codes.toarray().T


class CvxpyLasso(_Reference):
    """The exact lasso optimum from a conic solver (slow: use on small sets, to certify others)."""

    name = "cvxpy-lasso"
    family = "lasso"
    knob = "lam"
    Config = CvxpyLassoConfig
    requires = {"cvxpy": "cvxpy", "clarabel": "clarabel"}
    slow = True

    def _solve(self, x, atoms):
        cp = importlib.import_module("cvxpy")
        signal = cp.Parameter(atoms.shape[1])
        z = cp.Variable(atoms.shape[0], nonneg=self.config.positive)
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(signal - atoms.T @ z)
                                         + self.config.lam * cp.norm1(z)))
        codes = np.zeros((x.shape[0], atoms.shape[0]))
        for i, row in enumerate(x):
            signal.value = row
            problem.solve(solver=self.config.solver)
            if problem.status not in ("optimal", "optimal_inaccurate"):
                raise RuntimeError(f"cvxpy ({self.config.solver}) failed on signal {i}: {problem.status}")
            codes[i] = z.value
            if i and i % 100 == 0:
                log.info("cvxpy-lasso: %d / %d signals", i, x.shape[0])
        # Interior-point solutions hold tiny non-zeros where the optimum has exact zeros.
        codes[np.abs(codes) < 1e-8 * max(1.0, np.abs(codes).max())] = 0.0
        return codes

    def flops_per_signal(self, encoded=None) -> float:
        return float("nan")
