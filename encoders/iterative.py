"""Proximal-gradient lasso solvers: ISTA and FISTA.

Both minimise, per signal, ``0.5 * ||x - z @ D||^2 + lam * ||z||_1`` (optionally ``z >= 0``).
The loop is written once in `proximal_gradient`, over a generic quadratic; `solve_lasso` runs it
either on the whole dictionary or, by default, on a small working set of atoms per signal that
grows until the full problem's optimality conditions hold. ISTA and FISTA differ only in momentum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecode.encoder import Encoder, EncoderConfig


@dataclass(frozen=True)
class LassoConfig(EncoderConfig):
    lam: float = 0.1
    """Lasso penalty: each signal minimises 0.5*||x - z D||^2 + lam*||z||_1 (no 1/n or 1/d scaling)."""
    positive: bool = False
    """Constrain codes to be non-negative."""
    max_iter: int = 2000
    """Most iterations per signal (summed over working-set rounds)."""
    tol: float = 1e-5
    """Stop a signal once its stopping quantity (see criterion) falls below tol."""
    criterion: str = "change"
    """'change': relative step ||z_t - z_(t-1)|| / ||z_t||; 'gap': duality gap relative to the objective."""
    working_set: int = 8
    """Atoms per signal to iterate on at first (grown while optimality is violated); 0 iterates on all atoms."""

    def validate(self) -> None:
        super().validate()
        if self.criterion not in ("change", "gap"):
            raise ValueError(f"criterion must be 'change' or 'gap', got {self.criterion!r}")
        if self.working_set < 0:
            raise ValueError(f"working_set must be >= 0, got {self.working_set}")


@dataclass(frozen=True)
class FISTAConfig(LassoConfig):
    restart: bool = True
    """Reset the momentum of a signal whenever it points uphill (adaptive gradient restart)."""


def soft_threshold(v: torch.Tensor, threshold, positive: bool) -> torch.Tensor:
    """The proximal operator of threshold*||.||_1 (plus the indicator of z >= 0 when positive)."""
    if positive:
        return torch.clamp_min(v - threshold, 0)
    return torch.sign(v) * torch.clamp_min(v.abs() - threshold, 0)


def _relative_gap(x, z, r, corr, lam: float, positive: bool) -> torch.Tensor:
    """Per-signal lasso duality gap over the primal objective, from the residual r = x - z D and
    corr = r D^T. The dual point is r scaled into {nu : |D nu| <= lam} (one-sided when positive)."""
    tiny = torch.finfo(x.dtype).tiny
    worst = corr.amax(dim=1) if positive else corr.abs().amax(dim=1)
    scale = torch.clamp(lam / torch.clamp_min(worst, tiny), max=1.0)
    primal = 0.5 * (r * r).sum(1) + lam * z.abs().sum(1)
    nu = r * scale[:, None]
    dual = 0.5 * (x * x).sum(1) - 0.5 * ((x - nu) ** 2).sum(1)
    return (primal - dual) / torch.clamp_min(primal, tiny)


def duality_gap(x, z, atoms, lam: float, positive: bool = False) -> torch.Tensor:
    """Per-signal lasso duality gap divided by the primal objective, shape (n,)."""
    r = x - z @ atoms
    return _relative_gap(x, z, r, r @ atoms.T, lam, positive)


def _apply(quad, y: torch.Tensor) -> torch.Tensor:
    """y @ Q for a shared Q (m, m), a per-row Q (n, m, m), or Q = A A^T given as the tuple (A,)."""
    if isinstance(quad, tuple):
        return (y @ quad[0]) @ quad[0].T
    if quad.ndim == 2:
        return y @ quad
    return torch.bmm(y.unsqueeze(1), quad).squeeze(1)


def proximal_gradient(b: torch.Tensor, quad, step: float, lam: float, positive: bool, max_iter,
                      tol: float, momentum: bool, restart: bool = False,
                      z0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``0.5 z Q z^T - b z^T + lam ||z||_1`` row by row by (accelerated) proximal gradient.

    A row stops once its relative step ``||z_t - z_(t-1)|| / ||z_t||`` falls below `tol` or it
    has used `max_iter` iterations (an int, or a tensor (n,) of per-row budgets). Finished rows
    leave the batch in groups, so the cost follows the hard rows and copies stay rare.
    Returns the solutions (n, m) and the iterations each row used.
    """
    n = b.shape[0]
    per_row = not isinstance(quad, tuple) and quad.ndim == 3
    step = torch.as_tensor(step, dtype=b.dtype, device=b.device).reshape(-1, 1).expand(n, 1)
    budget = torch.as_tensor(max_iter, device=b.device).expand(n).clone()
    tiny = torch.finfo(b.dtype).tiny
    out = torch.zeros_like(b) if z0 is None else z0.clone()
    n_iter = budget.clone()
    live = torch.arange(n, device=b.device)
    pending = budget > 0                       # live rows whose result is not yet recorded
    z = out.clone()
    y = z
    t = torch.ones(n, 1, dtype=b.dtype, device=b.device)
    for it in range(1, int(budget.max()) + 1 if n else 1):
        z_new = soft_threshold(y - step * (_apply(quad, y) - b), lam * step, positive)
        delta = z_new - z
        if momentum:
            if restart:
                uphill = ((y - z_new) * delta).sum(1, keepdim=True) > 0
                t = torch.where(uphill, torch.ones_like(t), t)
            t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
            y = z_new + ((t - 1) / t_next) * delta
            t = t_next
        else:
            y = z_new
        z = z_new
        done = (delta.norm(dim=1) <= tol * torch.clamp_min(z.norm(dim=1), tiny)) | (budget[live] <= it)
        done &= pending
        if bool(done.any()):
            out[live[done]] = z[done]
            n_iter[live[done]] = it
            pending &= ~done
            n_pending = int(pending.sum())
            if n_pending == 0:
                break
            if n_pending <= 0.5 * live.numel():
                keep = pending
                live, z, y, t, b, step = live[keep], z[keep], y[keep], t[keep], b[keep], step[keep]
                pending = pending[keep]
                if per_row:
                    quad = quad[keep]
    return out, n_iter


def solve_lasso(x: torch.Tensor, atoms: torch.Tensor, gram: torch.Tensor | None, lipschitz: float,
                cfg: LassoConfig, momentum: bool, restart: bool = False,
                chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Lasso codes (n, n_atoms) for signals x (n, d), and the iterations each signal used.

    With ``cfg.working_set = w > 0`` each signal iterates on its w atoms most correlated with it;
    after each round the full problem is checked, and the next round (warm started) works on the
    current support plus up to w atoms that violate the optimality condition ``|D r| <= lam``. A signal ends when no atom outside its set violates the condition (and, with
    ``criterion='gap'``, its relative duality gap is below tol). Every answer is thus certified
    on the full dictionary; the iterations only touch small per-signal Gram blocks.
    """
    codes, iters = [], []
    for xs in x.split(chunk):
        z, it = _solve_chunk(xs, atoms, gram, lipschitz, cfg, momentum, restart)
        codes.append(z)
        iters.append(it)
    return torch.cat(codes), torch.cat(iters)


def _solve_chunk(x, atoms, gram, lipschitz, cfg, momentum, restart):
    n, n_atoms = x.shape[0], atoms.shape[0]
    lam, pos = cfg.lam, cfg.positive
    slack = max(cfg.tol ** 0.5, 1e-4)        # violations this small change the objective negligibly
    b = x @ atoms.T
    codes = torch.zeros_like(b)
    used = torch.zeros(n, dtype=torch.long, device=x.device)
    live = torch.arange(n, device=x.device)
    grow = cfg.working_set
    W = (b if pos else b.abs()).topk(grow, dim=1).indices if 0 < grow < n_atoms // 2 else None
    inner_tol = cfg.tol if cfg.criterion == "change" else min(1e-3, cfg.tol * 100)
    while live.numel():
        xs, bs, zs = x[live], b[live], codes[live]
        budget = cfg.max_iter - used[live]
        if W is None:
            quad = gram if gram is not None and n_atoms <= 2 * atoms.shape[1] else (atoms,)
            zs, it = proximal_gradient(bs, quad, 1.0 / lipschitz, lam, pos, budget, inner_tol, momentum,
                                       restart, zs)
        else:
            quad = (gram[W.unsqueeze(2), W.unsqueeze(1)] if gram is not None
                    else torch.bmm(atoms[W], atoms[W].transpose(1, 2)))
            zw, it = proximal_gradient(bs.gather(1, W), quad, 1.0 / _block_lipschitz(quad, lipschitz), lam,
                                       pos, budget, inner_tol, momentum, restart, zs.gather(1, W))
            zs = torch.zeros_like(zs).scatter_(1, W, zw)
        codes[live] = zs
        used[live] += it
        # Certify on the full dictionary: no atom may correlate with the residual beyond lam.
        r = xs - zs @ atoms
        corr = r @ atoms.T
        excess = (corr if pos else corr.abs()) - lam * (1 + slack)
        violated = excess > 0
        ok = ~violated.any(dim=1)
        if cfg.criterion == "gap":
            ok &= _relative_gap(xs, zs, r, corr, lam, pos) <= cfg.tol
        ok |= used[live] >= cfg.max_iter
        keep = ~ok
        live = live[keep]
        if not live.numel():
            break
        if cfg.criterion == "gap":
            inner_tol = max(inner_tol / 10, torch.finfo(x.dtype).eps)
        if W is not None:
            # Next set: the current support plus the worst violators (Celer-style working sets).
            support = zs[keep] != 0
            width = int(support.sum(1).max()) + min(int(violated[keep].sum(1).max()), grow)
            width = max(width, grow)
            if width < n_atoms // 2:
                W = excess[keep].masked_fill_(support, float("inf")).topk(width, dim=1).indices
            else:
                W = None                       # the set would cover most atoms: iterate on all
    return codes, used


def _block_lipschitz(quad: torch.Tensor, bound: float, steps: int = 20) -> torch.Tensor:
    """Largest eigenvalue of each Gram block (n, w, w), by power iteration, as a step size bound.

    A block's constant is often several times smaller than the whole dictionary's, and the step
    1/L sets the convergence rate. Power iteration approaches from below, so the estimate gets a
    10% margin and is capped by `bound`, the full dictionary's constant, which is always safe.
    """
    v = torch.ones(quad.shape[0], quad.shape[1], dtype=quad.dtype, device=quad.device)
    for _ in range(steps):
        v = _apply(quad, v)
        v = v / torch.clamp_min(v.norm(dim=1, keepdim=True), torch.finfo(v.dtype).tiny)
    rayleigh = (_apply(quad, v) * v).sum(1)
    return torch.clamp(1.1 * rayleigh, max=bound)


class _ProximalGradientEncoder(Encoder):
    family = "lasso"
    knob = "lam"
    momentum: bool

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dictionary
        atoms = d.atoms_as(x.dtype, x.device)
        # The Gram matrix serves the working-set blocks and, when n_atoms <= 2 d, the full iterations.
        gram = d.gram(x.dtype, x.device) if d.n_atoms <= 8192 else None
        codes, n_iter = solve_lasso(x, atoms, gram, d.lipschitz, self.config, momentum=self.momentum,
                                    restart=getattr(self.config, "restart", False))
        self.n_iter_ = float(n_iter.float().mean())
        return codes

    def flops_per_signal(self) -> float:
        n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
        w = self.config.working_set
        if 0 < w < n_atoms // 2:
            per_iter = 2 * w * w + 8 * w
            checks = 4 * d * n_atoms            # one certification round (most signals need one or two)
        else:
            per_iter = (2 * n_atoms * n_atoms if n_atoms <= 2 * d else 4 * n_atoms * d) + 8 * n_atoms
            checks = 4 * d * n_atoms
        return 2 * d * n_atoms + checks + (self.n_iter_ or self.config.max_iter) * per_iter


class ISTA(_ProximalGradientEncoder):
    """Iterative soft-thresholding with step 1/L, L = ||D||_2^2."""

    name = "ista"
    Config = LassoConfig
    momentum = False


class FISTA(_ProximalGradientEncoder):
    """ISTA with Nesterov momentum (Beck & Teboulle) and adaptive restart (O'Donoghue & Candes)."""

    name = "fista"
    Config = FISTAConfig
    momentum = True
