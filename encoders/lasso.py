"""More lasso solvers beside ISTA/FISTA: ADMM, batched coordinate descent, and LCA.

All three minimise, per signal, ``0.5 * ||x - z @ D||^2 + lam * ||z||_1`` (optionally ``z >= 0``),
the problem every lasso encoder of the registry solves, and stop a signal once the relative
duality gap of its current sparse iterate (`encoders.iterative.duality_gap`) is at most `tol`, so
each answer carries the same certificate as FISTA's. They differ in how an iteration moves:

- `admm` (Boyd et al. 2011, section 6.4): splits z = v; a ridge solve for z, a soft threshold for v
  and a dual update, with the penalty rho adapted by residual balancing;
- `cd`: cyclic coordinate descent (the method of glmnet and scikit-learn's lasso), batched over
  signals: each coordinate is minimised exactly in turn, for all signals of a block at once;
- `lca` (Rozell, Johnson, Baraniuk & Olshausen 2008): the locally competitive algorithm, Euler
  steps of the membrane dynamics ``tau u' = b - u - (G - I) a`` with ``a = T_lam(u)``, whose fixed
  points are the lasso's optima.

Signals are solved in chunks sized from the memory budget; a signal leaves its chunk's batch as soon
as it is certified, so the cost follows the hard signals. As in FISTA (`encoders.iterative.PRECISE`),
a signal whose certificate lies below what the input's dtype resolves (float32 at a small `lam`,
where the residual is a small difference of vectors of the size of x) goes on in float64 from where
it stood, with the input's atoms in float64, instead of iterating on rounding to `max_iter`. None forms the n_atoms^2 Gram matrix
unless it fits the budget and pays (ADMM with n_atoms <= 2 d, LCA with n_atoms <= 2 d).
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass

import torch

from sparsecode_encoders.iterative import PRECISE, duality_gap, retire, soft_threshold
from sparsecode._validation import check_positive
from sparsecode.encoder import Encoded, Encoder, MemoryConfig
from sparsecode.memory import fits, rows_within
from sparsecode.parallel import cpu_workers, run_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolverConfig(MemoryConfig):
    lam: float = 0.1
    """Lasso penalty: each signal minimises 0.5*||x - z D||^2 + lam*||z||_1 (no 1/n or 1/d scaling)."""
    positive: bool = False
    """Constrain codes to be non-negative."""
    max_iter: int = 10000
    """Most iterations per signal; signals still uncertified then are counted, logged as a warning and
    reported in a comparison's 'uncertified' column."""
    tol: float = 1e-4
    """Stop a signal once its lasso duality gap over the objective is at most tol (a certificate that the
    objective is within a factor 1 + tol of the optimum)."""


@dataclass(frozen=True)
class ADMMConfig(SolverConfig):
    rho: float = 1.0
    """Augmented-Lagrangian penalty at the start (the atoms' squared norms are its scale)."""
    adapt: bool = True
    """Adapt rho by residual balancing (Boyd et al. 3.4.1): double it while the primal residual is ten
    times the dual one, halve it in the opposite case."""

    def validate(self) -> None:
        super().validate()
        check_positive("rho", self.rho, allow_zero=False)


@dataclass(frozen=True)
class CDConfig(SolverConfig):
    max_iter: int = 1000
    """Most sweeps over all coordinates per signal; signals still uncertified then are counted, logged as
    a warning and reported in a comparison's 'uncertified' column."""


@dataclass(frozen=True)
class LCAConfig(SolverConfig):
    step: float = 0.0
    """Euler step dt/tau of the membrane dynamics (0: 1/L with L = ||D||_2^2, stable for every support;
    above 2/L the dynamics diverge)."""

    def validate(self) -> None:
        super().validate()
        check_positive("step", self.step)


class _LassoSolver(Encoder):
    """The loop every solver here shares: chunks from the budget, certification by the duality gap
    every `check_every` iterations, certified signals leaving the batch.

    A subclass builds a per-chunk state with `_start` and advances it with `_step`; the state is a
    dict of tensors with one row per live signal (other entries are shared by the chunk and kept in
    `shared`).
    """

    family = "lasso"
    knob = "lam"
    #: iterations between two duality-gap tests (one test costs about two products with the atoms)
    check_every: int = 10
    #: per-signal rows of n_atoms values in the state (for chunk sizes)
    state_rows: int = 6

    @classmethod
    def budget_params(cls, budget: int) -> dict:
        # no tolerance: every signal runs exactly `budget` iterations (a recovery sweep's --budget)
        return {"max_iter": budget, "tol": 0.0}

    @abc.abstractmethod
    def _start(self, x: torch.Tensor, atoms: torch.Tensor, shared: dict) -> dict:
        """The initial state of signals x; `shared` holds what `_prepare` made for the whole call."""

    @abc.abstractmethod
    def _step(self, state: dict, shared: dict) -> None:
        """One iteration, in place on `state`."""

    @abc.abstractmethod
    def _codes_of(self, state: dict) -> torch.Tensor:
        """The sparse iterate (live signals x n_atoms) the gap is measured on and the answer is."""

    def _prepare(self, atoms: torch.Tensor, budget: int) -> tuple[dict, int]:
        """What every chunk shares (factorisations), and its size in bytes."""
        return {}, 0

    def _checked(self, state: dict, shared: dict) -> None:
        """Called after each gap test, with the state of the signals still live (ADMM adapts rho here)."""

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode_with_info(x).codes

    def _encode_with_info(self, x: torch.Tensor) -> Encoded:
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        n, n_atoms, item = x.shape[0], atoms.shape[0], x.element_size()
        budget = self.memory_budget(x.device)
        shared, fixed = self._prepare(atoms, budget)
        rows = rows_within(budget, item * (self.state_rows * n_atoms + 4 * x.shape[1]), fixed,
                           what=f"signal of {self.name} ({n_atoms} atoms)")
        codes = x.new_zeros(n, n_atoms)
        iters = torch.zeros(n, dtype=torch.long, device=x.device)
        certified = torch.zeros(n, dtype=torch.bool, device=x.device)
        # Chunks run on worker threads, one core each (`sparsecode.parallel`): these loops run many small
        # operations, which torch's own thread pool slows to a crawl when another process takes a core.
        # Chunks in flight share the budget; two per worker balance a core that another process slows.
        workers = cpu_workers(x.device)
        chunk = max(1, min(rows // workers, -(-n // (2 * workers))))

        def work(start: int, stop: int) -> None:
            self._solve_chunk(x[start:stop], atoms, dict(shared), codes[start:stop], iters[start:stop],
                              certified[start:stop])

        run_blocks(n, chunk, workers, work)
        uncertified = int((~certified).sum())
        if uncertified:
            log.warning("%s: %d of %d signals reached max_iter=%d before their duality gap over the objective "
                        "fell below tol=%g; raise max_iter (or tol)", self.name, uncertified, n,
                        self.config.max_iter, self.config.tol)
        mean_iter = float(iters.float().mean()) if n else 0.0
        return Encoded(codes, n_iter=mean_iter, uncertified=uncertified)

    def _solve_chunk(self, x, atoms, shared, codes, iters, certified) -> None:
        """Solve signals x; `shared` is this chunk's own copy (ADMM changes its rho). Signals that the
        input's dtype cannot certify go on in `PRECISE`."""
        live = torch.arange(x.shape[0], device=x.device)
        state = self._start(x, atoms, shared)
        state["x"] = x
        used = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        coarse = torch.finfo(x.dtype).bits < torch.finfo(PRECISE).bits
        moved = self._iterate(state, live, used, atoms, shared, codes, iters, certified, promote=coarse)
        if moved is not None:
            live, state, used = moved
            atoms = atoms.to(PRECISE)
            state, shared = self._precise(state, shared, atoms)
            self._iterate(state, live, used, atoms, shared, codes, iters, certified, promote=False)

    def _iterate(self, state, live, used, atoms, shared, codes, iters, certified, promote: bool):
        """Iterate the `live` signals (state rows, iterations `used` so far) until each is certified or has
        used max_iter. With `promote`, signals whose gap the dtype cannot resolve leave instead: returns
        them (live, state, used), or None."""
        cfg = self.config
        moved = []
        while live.numel():
            steps = min(self.check_every, int((cfg.max_iter - used).min()))
            for _ in range(steps):
                self._step(state, shared)
            used = used + steps
            z = self._codes_of(state)
            gap, floor = duality_gap(state["x"], z, atoms, cfg.lam, cfg.positive, with_floor=True)
            ok = gap <= cfg.tol
            done = ok | (used >= cfg.max_iter)
            leave = ~done & (floor > cfg.tol) if promote else None
            if leave is not None and bool(leave.any()):
                moved.append((live[leave], {key: value[leave] for key, value in state.items()}, used[leave]))
                done = done | leave
            if bool(done.any()):
                keep = retire(done, live, z, ok, used, codes, iters, certified)
                live, used = live[keep], used[keep]
                state = {key: value[keep] for key, value in state.items()}
            if live.numel():
                self._checked(state, shared)
        if not moved:
            return None
        return (torch.cat([m[0] for m in moved]), {key: torch.cat([m[1][key] for m in moved]) for key in moved[0][1]},
                torch.cat([m[2] for m in moved]))

    def _precise(self, state: dict, shared: dict, atoms: torch.Tensor) -> tuple[dict, dict]:
        """`state` and `shared` to go on in `PRECISE` (`atoms`, the input's, in that dtype): their tensors
        in that dtype; subclasses recompute what rounding in the input's dtype spoiled where the iteration's
        fixed point depends on it."""
        state = {key: value.to(PRECISE) for key, value in state.items()}
        shared = {key: value.to(PRECISE) if torch.is_tensor(value) and value.is_floating_point() else value
                  for key, value in shared.items()}
        return state, shared

    def flops_per_signal(self, encoded=None) -> float:
        n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
        iters = encoded.n_iter if encoded is not None and encoded.n_iter is not None else self.config.max_iter
        checks = iters / self.check_every * 4 * d * n_atoms
        return 2 * d * n_atoms + iters * self._flops_per_iteration() + checks

    @abc.abstractmethod
    def _flops_per_iteration(self) -> float:
        """Multiply-adds (x2) of one iteration for one signal."""


def _use_gram(atoms: torch.Tensor, budget: int) -> bool:
    """Whether iterating with an n_atoms^2 matrix beats two products with the atoms, and fits half the budget."""
    n_atoms, d = atoms.shape
    return n_atoms <= 2 * d and fits(budget // 2, n_atoms * n_atoms * atoms.element_size())


class ADMM(_LassoSolver):
    """ADMM for the lasso: z = (G + rho I)^-1 (D x + rho (v - u)), v = soft(z + u, lam/rho), u += z - v."""

    name = "admm"
    Config = ADMMConfig
    state_rows = 8

    def _prepare(self, atoms, budget):
        n_atoms, d = atoms.shape
        shared = {"atoms64": atoms.double(), "gram": _use_gram(atoms, budget), "rho": float(self.config.rho)}
        self._factor(shared, atoms.dtype)
        size = (n_atoms * n_atoms if shared["gram"] else d * d + n_atoms * d) * atoms.element_size()
        return shared, size

    @staticmethod
    def _factor(shared: dict, dtype) -> None:
        """The ridge solve's matrix for the current rho, formed in float64: (G + rho I)^-1 when the Gram
        matrix is used, else (rho I_d + D^T D)^-1 for the Woodbury form
        (G + rho I)^-1 = (I - D (rho I + D^T D)^-1 D^T) / rho, which needs only d x d values."""
        a, rho = shared["atoms64"], shared["rho"]
        if shared["gram"]:
            m = a @ a.T
            m.diagonal().add_(rho)
        else:
            m = a.T @ a
            m.diagonal().add_(rho)
        shared["solve"] = torch.cholesky_inverse(torch.linalg.cholesky(m)).to(dtype)
        shared["atoms"] = a.to(dtype)

    def _precise(self, state, shared, atoms):
        state, shared = super()._precise(state, shared, atoms)
        state["b"] = state["x"] @ atoms.T
        self._factor(shared, PRECISE)          # at the rho reached so far, factored again in PRECISE
        return state, shared

    def _ridge(self, q: torch.Tensor, shared: dict) -> torch.Tensor:
        """q (G + rho I)^-1, row by row."""
        if shared["gram"]:
            return q @ shared["solve"]
        a = shared["atoms"]
        return (q - ((q @ a) @ shared["solve"]) @ a.T) / shared["rho"]

    def _start(self, x, atoms, shared):
        b = x @ atoms.T
        return {"b": b, "v": torch.zeros_like(b), "u": torch.zeros_like(b), "z": torch.zeros_like(b),
                "v_prev": torch.zeros_like(b)}

    def _step(self, state, shared):
        rho, lam, pos = shared["rho"], self.config.lam, self.config.positive
        v_old, u = state["v"], state["u"]
        z = self._ridge(state["b"] + rho * (v_old - u), shared)
        v = soft_threshold(z + u, lam / rho, pos)
        state["u"] = u + z - v
        # the last iterates, for the residuals residual balancing compares at the next gap test
        state["z"], state["v_prev"], state["v"] = z, v_old, v

    def _codes_of(self, state):
        return state["v"]

    def _checked(self, state, shared):
        if not self.config.adapt:
            return
        # Boyd et al.'s primal residual ||z - v|| and dual residual rho ||v - v_prev||, over the chunk
        primal = float((state["z"] - state["v"]).norm())
        dual = shared["rho"] * float((state["v"] - state["v_prev"]).norm())
        factor = 2.0 if primal > 10 * dual else 0.5 if dual > 10 * primal else 1.0
        if factor != 1.0:
            # u is the dual variable scaled by 1/rho: rescale it with rho
            state["u"] = state["u"] / factor
            shared["rho"] *= factor
            self._factor(shared, state["u"].dtype)

    def _flops_per_iteration(self):
        n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
        solve = 2 * n_atoms * n_atoms if n_atoms <= 2 * d else 4 * n_atoms * d + 2 * d * d
        return solve + 10 * n_atoms


class CD(_LassoSolver):
    """Cyclic coordinate descent, batched over signals: each coordinate in turn set to its exact
    minimiser ``soft(z_j + d_j . r / ||d_j||^2, lam / ||d_j||^2)``, the residual r kept up to date.

    An iteration is one sweep over all atoms: 4 d n_atoms multiply-adds per signal, and n_atoms small
    operations on the block (so on large dictionaries it is slower than the matrix-product methods;
    it is here as the lasso's classic solver, exact per coordinate and free of step sizes).
    """

    name = "cd"
    Config = CDConfig
    check_every = 4
    state_rows = 2

    def _prepare(self, atoms, budget):
        sq = (atoms * atoms).sum(1)
        # read once here: a test on a device tensor per coordinate would wait for the device each time
        return {"atoms": atoms, "sq": sq, "nonzero": (sq > 0).tolist()}, 0

    def _start(self, x, atoms, shared):
        return {"z": x.new_zeros(x.shape[0], atoms.shape[0]), "r": x.clone()}

    def _step(self, state, shared):
        atoms, sq = shared["atoms"], shared["sq"]
        lam, pos = self.config.lam, self.config.positive
        z, r = state["z"], state["r"]
        for j, nonzero in enumerate(shared["nonzero"]):
            if not nonzero:
                continue            # a zero atom: its coordinate stays 0
            a = atoms[j]
            old = z[:, j]
            new = soft_threshold(old + (r @ a) / sq[j], lam / sq[j], pos)
            delta = new - old
            r.addr_(delta, a, alpha=-1)
            z[:, j] = new

    def _codes_of(self, state):
        return state["z"]

    def _precise(self, state, shared, atoms):
        state, shared = super()._precise(state, shared, atoms)
        self._checked(state, shared)           # the residual, from x in PRECISE
        return state, shared

    def _checked(self, state, shared):
        # the residual is updated by rank-one steps, whose rounding accumulates over sweeps (in float32
        # enough to keep the gap above tol): start again from x - z D at each gap test
        state["r"] = state["x"] - state["z"] @ shared["atoms"]

    def _flops_per_iteration(self):
        n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
        return 4 * n_atoms * d + 4 * n_atoms + 2 * n_atoms * d / self.check_every


class LCA(_LassoSolver):
    """Locally competitive algorithm: Euler steps ``u += eta (b - u - a (G - I))``, ``a = soft(u, lam)``."""

    name = "lca"
    Config = LCAConfig
    state_rows = 5

    def _prepare(self, atoms, budget):
        eta = self.config.step or 1.0 / self.dictionary.lipschitz
        use_gram = _use_gram(atoms, budget)
        shared = {"atoms": atoms, "eta": eta, "gram": self.dictionary.gram(atoms.dtype, atoms.device)
                  if use_gram else None}
        return shared, atoms.shape[0] ** 2 * atoms.element_size() if use_gram else 0

    def _start(self, x, atoms, shared):
        b = x @ atoms.T
        return {"b": b, "u": torch.zeros_like(b), "a": torch.zeros_like(b)}

    def _precise(self, state, shared, atoms):
        state, shared = super()._precise(state, shared, atoms)
        # the fixed point is where b - a (G - I) balances lam: a rounded b or G moves it
        state["b"] = state["x"] @ atoms.T
        if shared["gram"] is not None:
            shared["gram"] = atoms @ atoms.T
        return state, shared

    def _step(self, state, shared):
        a, u = state["a"], state["u"]
        gram, atoms = shared["gram"], shared["atoms"]
        inhibition = a @ gram if gram is not None else (a @ atoms) @ atoms.T       # a G
        u = u + shared["eta"] * (state["b"] - u - inhibition + a)
        state["u"] = u
        state["a"] = soft_threshold(u, self.config.lam, self.config.positive)

    def _checked(self, state, shared):
        if not bool(torch.isfinite(state["u"]).all()):
            raise FloatingPointError(f"lca diverged: step={shared['eta']:.4g} is above 2/L = "
                                     f"{2 / self.dictionary.lipschitz:.4g}; lower step (0 picks 1/L)")

    def _codes_of(self, state):
        return state["a"]

    def _flops_per_iteration(self):
        n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
        return (2 * n_atoms * n_atoms if n_atoms <= 2 * d else 4 * n_atoms * d) + 8 * n_atoms
