"""Proximal-gradient lasso solvers: ISTA and FISTA.

Both minimise, per signal, ``0.5 * ||x - z @ D||^2 + lam * ||z||_1`` (optionally ``z >= 0``).
The loop is written once in `proximal_gradient`, over a generic quadratic; `solve_lasso` runs it
either on the whole dictionary or, by default, on a small working set of atoms per signal that
grows until the full problem is certified. ISTA and FISTA differ only in momentum.

Memory: signals are processed in chunks sized from the encoder's memory budget. What a chunk holds
per signal is dominated by the correlations with every atom (``r @ D^T``, needed to certify an
answer on the whole dictionary); the iterations themselves work on per-signal blocks built from
the gathered atoms, so no ``n_atoms^2`` Gram matrix is needed. The Gram matrix is used only where
iterating on all atoms with it is cheaper than with the atoms (``n_atoms <= 2 d``) and it fits.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from sparsecode import native
from sparsecode.encoder import Encoded, Encoder, KernelConfig
from sparsecode.memory import fits, rows_within
from sparsecode.ops import PRECISIONS, low_precision, sparse_rows_product
from sparsecode.parallel import cpu_workers, run_blocks

log = logging.getLogger(__name__)

#: Iterations between two tests of the stopping criterion. A test reads a flag on the host (a
#: synchronisation on CUDA) and costs about one extra product with the block, so it is not done
#: every iteration.
CHECK_EVERY = 10
#: Most iterations of a signal's first round before the whole problem is checked again (a later
#: round may take as many as the signal has used so far). The block's own gap can be too coarse in
#: float32 to reach the target (it subtracts terms of the size of ||x||^2), while the check on the
#: dictionary, one product per signal, may already certify.
ROUND_ITER = 200
#: Widest per-signal Gram block that `_apply` multiplies as Q y rather than y Q (equal: Q is symmetric).
SMALL_BLOCK = 16
#: Fewest signals in a block of working-set iterations on a worker thread: each iteration is a few
#: operations whatever the block's size, so tiny blocks cost their overhead.
MIN_BLOCK = 8
#: Largest dictionary (bytes) whose atoms a chunk reads again cheaply, from cache: see `solve_lasso`.
SHARED_ATOMS_BYTES = 8 * 2 ** 20
#: Most atoms per signal whose correlation a round's check recomputes exactly (see `_Checker`); beyond it
#: the signal's whole product is taken in its own dtype.
MAX_RECHECKED = 256
#: The dtype a working set moves to when the certificate needs more precision than the input's.
#: With small lam the residual ``x - z D`` is a small difference of vectors of the size of x, and
#: the gap subtracts terms of the size of lam ||z||_1: in float32 the iterations stall at a gap of
#: about 1e-4 of the objective (measured at 16,384 x 576, L0 32, lam 0.0036: every signal ran to
#: max_iter=10,000, where float64 certified all of them in about 90 iterations). Only the signals
#: that stall move; their blocks are small (w x w and w x d), and products with the whole dictionary
#: stay in the input's dtype, since their rounding is relative to the (accurate) residual.
PRECISE = torch.float64


@dataclass(frozen=True)
class LassoConfig(KernelConfig):
    lam: float = 0.1
    """Lasso penalty: each signal minimises 0.5*||x - z D||^2 + lam*||z||_1 (no 1/n or 1/d scaling)."""
    positive: bool = False
    """Constrain codes to be non-negative."""
    max_iter: int = 10000
    """Most iterations per signal (summed over working-set rounds); signals still uncertified then are
    counted, logged as a warning and reported in a comparison's 'uncertified' column."""
    tol: float = 1e-4
    """Stop a signal once its stopping quantity (see criterion) is at most tol."""
    criterion: str = "gap"
    """'gap': the lasso duality gap over the objective, a certificate that the objective is within a
    factor (1 + tol) of the optimum; 'change': relative step ||z_t - z_(t-1)|| / ||z_t|| and no atom
    with |D r| above lam."""
    working_set: int = 8
    """Atoms per signal to iterate on at first (grown while the full problem is not certified); 0
    iterates on all atoms."""
    precision: str = "auto"
    """Of each round's check of its answers against all atoms: 'bfloat16' (the largest correlation then
    recomputed in the iterate's precision, so the certificates are those of 'full'), 'full' (the input's
    dtype) or 'auto' (bfloat16 for float32 input on a CPU that multiplies bfloat16 natively, with AVX512-BF16
    or AMX; 'full' on a GPU, where cuBLAS's bfloat16 sums have not been measured against the bound)."""

    def validate(self) -> None:
        super().validate()
        if self.criterion not in ("change", "gap"):
            raise ValueError(f"criterion must be 'change' or 'gap', got {self.criterion!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.working_set, int) or isinstance(self.working_set, bool) or self.working_set < 0:
            raise ValueError(f"working_set must be an integer >= 0, got {self.working_set!r}")


@dataclass(frozen=True)
class FISTAConfig(LassoConfig):
    restart: bool = True
    """Reset the momentum of a signal whenever it points uphill (adaptive gradient restart)."""


def soft_threshold(v: torch.Tensor, threshold, positive: bool) -> torch.Tensor:
    """The proximal operator of threshold*||.||_1 (plus the indicator of z >= 0 when positive)."""
    if positive:
        return torch.clamp_min(v - threshold, 0)
    return torch.sign(v) * torch.clamp_min(v.abs() - threshold, 0)


def _worst(corr: torch.Tensor, positive: bool) -> torch.Tensor:
    """Per row, the largest correlation the dual constraint bounds by lam (one-sided when positive)."""
    if positive:
        return corr.amax(dim=1)
    # no |corr| temporary; and torch's aminmax along a dimension is not vectorised on the CPU (20x slower
    # than amax and amin here)
    return torch.maximum(corr.amax(dim=1), corr.amin(dim=1).neg_())


def _relative_gap(l1: torch.Tensor, zcorr: torch.Tensor, rr: torch.Tensor, worst: torch.Tensor,
                  lam: float) -> torch.Tensor:
    """Per-signal duality gap over the primal objective, from ||z||_1, z . (D r), ||r||^2 and the
    largest |D r| (r = x - z D).

    The dual point is r scaled into the feasible set, nu = s r with s = min(1, lam / worst). Written
    out, gap = 0.5 (1 - s)^2 ||r||^2 + lam ||z||_1 - s z . (D r): no term of the size of ||x||^2 is
    subtracted, so the gap stays accurate in float32 when the residual is small.
    """
    tiny = torch.finfo(rr.dtype).tiny
    s = torch.clamp(lam / torch.clamp_min(worst, tiny), max=1.0)
    primal = 0.5 * rr + lam * l1
    gap = 0.5 * (1 - s) ** 2 * rr + lam * l1 - s * zcorr
    return gap / torch.clamp_min(primal, tiny)


def duality_gap(x, z, atoms, lam: float, positive: bool = False, *, with_floor: bool = False):
    """Per-signal lasso duality gap divided by the primal objective, shape (n,); `with_floor` adds the
    smallest such gap the dtype resolves (`gap_floor`)."""
    r = x - z @ atoms
    corr = r @ atoms.T
    l1, rr = z.abs().sum(1), (r * r).sum(1)
    gap = _relative_gap(l1, (z * corr).sum(1), rr, _worst(corr, positive), lam)
    return (gap, gap_floor((x * x).sum(1), 0.5 * rr + lam * l1)) if with_floor else gap


def gap_floor(xx: torch.Tensor, primal: torch.Tensor) -> torch.Tensor:
    """The smallest relative duality gap the dtype of `primal` resolves for signals of squared norm xx:
    the residual is a difference of terms of the size of ||x||^2, so it is known to about eps ||x||^2
    (with a margin for the sums). Below it, iterating in that dtype goes on rounding."""
    primal = torch.clamp_min(primal, torch.finfo(primal.dtype).tiny)
    return 4 * torch.finfo(primal.dtype).eps * xx / primal


def _apply(quad, y: torch.Tensor) -> torch.Tensor:
    """y @ Q for a shared Q (m, m), a per-row Q (n, m, m), or Q = A A^T given as the tuple (A,)."""
    if isinstance(quad, tuple):
        return (y @ quad[0]) @ quad[0].T
    if quad.ndim == 2:
        return y @ quad
    if quad.shape[1] <= SMALL_BLOCK and y.device.type == "cpu":
        # Q is symmetric, so Q y: the CPU's batched product runs small blocks about 2.5x faster in this
        # orientation (2,048 signals, 16 x 16: 0.22 ms against 0.57 ms) and larger ones 10x slower
        return torch.bmm(quad, y.unsqueeze(2)).squeeze(2)
    return torch.bmm(y.unsqueeze(1), quad).squeeze(1)


def _subproblem_gap(z, b, quad, xx, lam: float, positive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative duality gap of ``0.5 ||x - z A||^2 + lam ||z||_1`` from Q = A A^T, b = A x, xx = ||x||^2,
    and the smallest relative gap the dtype resolves: ||r||^2 is a difference of terms of the size
    of ||x||^2, so it is known to about eps ||x||^2 (with a margin for the sums)."""
    qz = _apply(quad, z)
    corr = b - qz
    l1 = z.abs().sum(1)
    rr = torch.clamp_min(xx - 2 * (z * b).sum(1) + (z * qz).sum(1), 0)
    floor = gap_floor(xx, 0.5 * rr + lam * l1)
    return _relative_gap(l1, (z * corr).sum(1), rr, _worst(corr, positive), lam), floor


def retire(done: torch.Tensor, live: torch.Tensor, z: torch.Tensor, ok: torch.Tensor, it: int | torch.Tensor,
           out: torch.Tensor, n_iter: torch.Tensor, met: torch.Tensor) -> torch.Tensor:
    """Write the finished rows (`done`, a mask over the `live` rows) of a batched iteration: their
    iterate, the iterations used (one count, or one per live row) and whether they met the criterion.
    Returns the mask of rows that go on."""
    rows = live[done]
    out[rows] = z[done].to(out.dtype)
    n_iter[rows] = it[done] if torch.is_tensor(it) else it
    met[rows] = ok[done]
    return ~done


def proximal_gradient(b: torch.Tensor, quad, step, lam: float, positive: bool, max_iter,
                      tol, momentum: bool, restart: bool = False, z0: torch.Tensor | None = None, *,
                      criterion: str = "change", xx: torch.Tensor | None = None,
                      check_every: int = CHECK_EVERY,
                      leave_unresolvable: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise ``0.5 z Q z^T - b z^T + lam ||z||_1`` row by row by (accelerated) proximal gradient.

    Every `check_every` iterations a row stops once its stopping quantity is at most `tol` (a float
    or a tensor (n,) of per-row tolerances): with ``criterion='change'`` the relative step
    ``||z_t - z_(t-1)|| / ||z_t||``; with ``'gap'`` the relative duality gap of the lasso whose
    quadratic this is (Q = A A^T, b = A x; `xx` gives ||x||^2 per row). A row also stops when it
    has used `max_iter` iterations (an int, or a tensor (n,) of per-row budgets), exactly.
    With `leave_unresolvable`, a row whose `tol` lies below the gap its dtype resolves leaves at
    once (unmet), for the caller to go on in a finer dtype.
    Finished rows leave the batch, so the cost follows the hard rows.
    Returns the solutions (n, m), the iterations each row used, and whether each met `tol`.
    """
    n = b.shape[0]
    per_row = not isinstance(quad, tuple) and quad.ndim == 3
    if criterion == "gap" and xx is None:
        raise ValueError("criterion='gap' needs xx, the squared norm of each signal")
    step = torch.as_tensor(step, dtype=b.dtype, device=b.device).reshape(-1, 1).expand(n, 1)
    budget = torch.as_tensor(max_iter, device=b.device).expand(n).clone()
    tol = torch.as_tensor(tol, dtype=b.dtype, device=b.device).expand(n)
    tiny = torch.finfo(b.dtype).tiny
    out = torch.zeros_like(b) if z0 is None else z0.clone()
    n_iter = torch.zeros(n, dtype=torch.long, device=b.device)
    met = torch.zeros(n, dtype=torch.bool, device=b.device)
    live = (budget > 0).nonzero().flatten()
    if live.numel() < n:
        b, step, tol, budget = b[live], step[live], tol[live], budget[live]
        xx = None if xx is None else xx[live]
        quad = quad[live] if per_row else quad
    if not live.numel():
        return out, n_iter, met
    z = out[live]
    y = z
    t = torch.ones(live.numel(), 1, dtype=b.dtype, device=b.device)
    it = 0
    next_check = min(check_every, int(budget.min()))
    while True:
        it += 1
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
        if it < next_check:
            continue
        if criterion == "gap":
            gap, floor = _subproblem_gap(z, b, quad, xx, lam, positive)
            ok = gap <= tol
            stop = ok | (floor > tol) if leave_unresolvable else ok
        else:
            ok = delta.norm(dim=1) <= tol * torch.clamp_min(z.norm(dim=1), tiny)
            stop = ok
        done = stop | (budget <= it)
        if bool(done.any()):
            keep = retire(done, live, z, ok, it, out, n_iter, met)
            if not bool(keep.any()):
                break
            live, z, y, t, b, step, tol, budget = (live[keep], z[keep], y[keep], t[keep], b[keep], step[keep],
                                                   tol[keep], budget[keep])
            xx = None if xx is None else xx[keep]
            quad = quad[keep] if per_row else quad
        next_check = min(it + check_every, int(budget.min()))
    return out, n_iter, met


def lasso_plan(n: int, n_atoms: int, d: int, dtype: torch.dtype, budget: int, working_set: int) -> tuple[bool, int]:
    """Whether to use the Gram matrix, and how many signals a chunk holds, within `budget` bytes.

    A chunk holds, per signal, the correlations with every atom and one more row of that size (the
    next working set's scores, or the warm start), plus its block of the working set (room for two
    doublings of `working_set`). The Gram matrix (n_atoms^2 values, n_atoms^2 d multiply-adds to
    build) is used only where it takes at most half the budget and pays for itself: its blocks are
    gathered instead of multiplied out (w^2 d per signal and round, about 16 working_set^2 d over
    the rounds), so it pays once n signals need that many. Raises a ValueError naming the budget
    when not even one signal fits.
    """
    item = torch.finfo(dtype).bits // 8
    gram_bytes = n_atoms * n_atoms * item
    w = min(4 * max(working_set, 1), n_atoms)
    per_signal = item * (2 * n_atoms + 2 * d + w * (w + d + 12))
    pays = n * 16 * max(working_set, 1) ** 2 >= n_atoms * n_atoms or (working_set == 0 and n_atoms <= 2 * d)
    # beside the Gram matrix (and x D^T, which its blocks keep per signal), the budget must still hold
    # a useful chunk of signals
    use_gram = pays and fits(min(budget // 2, budget - (per_signal + item * n_atoms) * min(n, 256)), gram_bytes)
    if use_gram:
        per_signal += item * n_atoms
    rows = rows_within(budget, per_signal, gram_bytes if use_gram else 0, what="signal of the lasso")
    return use_gram, rows


def solve_lasso(x: torch.Tensor, atoms: torch.Tensor, gram: torch.Tensor | None, lipschitz: float,
                cfg: LassoConfig, momentum: bool, restart: bool = False, chunk: int = 2048,
                workers: int = 1, chunk_bytes: int | None = None, compiled: bool = False,
                low_atoms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lasso codes (n, n_atoms) for signals x (n, d), the iterations each signal used, and whether
    each signal was certified (its stopping criterion held before `max_iter`).

    With ``cfg.working_set = w > 0`` each signal iterates on the w atoms most correlated with it.
    After each round the full problem is checked once, with one product ``r @ D^T`` per signal (in
    the dtype of `low_atoms`, the atoms in low precision, where given; the largest correlation is then
    recomputed exactly, see `_Checker`):
    with ``criterion='gap'`` the duality gap on the whole dictionary, with ``'change'`` that no atom
    correlates with the residual beyond lam. A signal that fails goes on, warm started, on its
    support plus the atoms that violate the optimality condition most, the set at least doubling
    the support (Celer's rule), so a few rounds suffice. Signals are solved `chunk` at a time. For
    atoms larger than a cache, the iterations on the working sets run in blocks of signals on `workers`
    CPU threads (see `sparsecode.parallel`) and each round's check is one product for all of the
    chunk's signals (with few rows per product, reading the atoms costs more than the multiply-adds);
    smaller dictionaries run whole chunks on the workers. Each chunk may use `chunk_bytes` of working
    memory (default: what `lasso_plan` counts per signal). With `compiled` the working sets iterate in the
    compiled kernels (`sparsecode.native`, on the CPU).
    """
    n, n_atoms = x.shape[0], atoms.shape[0]
    codes = x.new_zeros(n, n_atoms)
    iters = torch.zeros(n, dtype=torch.long, device=x.device)
    certified = torch.zeros(n, dtype=torch.bool, device=x.device)
    item = x.element_size()
    w0 = min(4 * max(cfg.working_set, 1), n_atoms)
    checker = _Checker(atoms, low_atoms, compiled)
    # Each round of a chunk reads every atom once, to check its signals. Atoms that stay in cache cost
    # little to read again: then whole chunks run on the worker threads, a round's checks in parallel
    # too. Atoms that do not (16,384 x 576 in float32: 38 MB) are read once per round for all the
    # signals in memory, and only the iterations are spread over the workers (for 64 signals there,
    # 0.42 s against 0.53 s with chunks on the workers).
    spread = workers > 1 and atoms.numel() * item <= SHARED_ATOMS_BYTES
    if spread:
        chunk = max(1, min(chunk // workers, -(-n // (2 * workers))))
        chunk_bytes = None if chunk_bytes is None else chunk_bytes // workers

    def work(start: int, stop: int) -> None:
        full_rows = (stop - start) * item * 2 * n_atoms
        # what the chunk's budget leaves beside its full-width rows, for the working-set blocks
        block_bytes = ((chunk_bytes - full_rows) if chunk_bytes is not None else
                       (stop - start) * item * w0 * (w0 + x.shape[1] + 12))
        _solve_chunk(x[start:stop], atoms, checker, gram, lipschitz, cfg, momentum, restart, block_bytes,
                     codes[start:stop], iters[start:stop], certified[start:stop], 1 if spread else workers, compiled)

    run_blocks(n, max(1, chunk), workers if spread else 1, work)
    return codes, iters, certified


def _solve_chunk(x, atoms, checker, gram, lipschitz, cfg, momentum, restart, block_bytes, codes, used, certified,
                 workers, compiled):
    """Solve a chunk of signals in rounds. Signals are kept in groups that share a working-set width
    (a power-of-two multiple of `working_set`, or all atoms), so a signal with a large support
    widens only its own group's blocks. Each round iterates every group, then checks all of them on
    the whole dictionary with one product (`_Checker.check`): for few signals, reading the atoms costs
    more than the multiply-adds, so one product per group would cost about as much as one for all."""
    n, n_atoms = x.shape[0], atoms.shape[0]
    pos, grow = cfg.positive, cfg.working_set
    # kept precise: each group reads them in its own dtype
    xx = (x.to(PRECISE) ** 2).sum(1)
    # The subproblem's own gap is the full one once no atom outside the set violates; aiming below
    # tol leaves room for the rounding between the two.
    inner_tol = torch.full((n,), cfg.tol / 2, dtype=PRECISE, device=x.device)
    rows = torch.arange(n, device=x.device)
    b = None
    if 0 < grow < n_atoms // 2:
        if gram is None:
            # only ranks the atoms for the first sets (their blocks come from the gathered atoms)
            scores = checker.check([x], pos, block_bytes, exact=False)[0][0]
        else:
            b = scores = x @ atoms.T       # the sets' right-hand sides are gathered from it
        groups = [(rows, (scores if pos else scores.abs()).topk(grow, dim=1).indices, x.new_zeros(n, grow))]
        del scores
    else:
        groups = [(rows, None, None)]
    while groups:
        rounds = [_iterate(x, atoms, checker, gram, b, lipschitz, cfg, momentum, restart, block_bytes, codes, used,
                           inner_tol, xx, live, W, zw, workers, compiled) for live, W, zw in groups]
        checks = checker.check([r.residual for r in rounds], pos, block_bytes)
        by_width: dict = {}
        for r, (corr, worst) in zip(rounds, checks):
            for nxt in _settle(r, corr, worst, x, cfg, block_bytes, codes, used, certified, inner_tol):
                key = None if nxt[1] is None else (nxt[1].shape[1], nxt[2].dtype)
                by_width.setdefault(key, []).append(nxt)
        del rounds, checks
        # groups of one width and dtype from different groups of the last round iterate together
        groups = [tuple(None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in range(3))
                  for parts in by_width.values()]


@dataclass
class _Round:
    """What one round of iterations left for a group of a chunk's signals, to be checked and settled."""
    live: torch.Tensor          # the group's rows of the chunk
    W: torch.Tensor | None      # their working sets (None: all atoms)
    z: torch.Tensor             # their codes on the sets (or on all atoms), in the round's dtype
    met: torch.Tensor           # whether each met the round's own target
    residual: torch.Tensor      # x - z D, in the round's dtype
    xs: torch.Tensor            # the signals, in the round's dtype
    can_promote: bool           # whether a stalled set may move on to PRECISE


def _iterate(x, atoms, checker, gram, b, lipschitz, cfg, momentum, restart, block_bytes, codes, used, inner_tol, xx,
             live, W, zw, workers, compiled) -> _Round:
    """One round of iterations for the signals `live` of a chunk on their working sets W (None: all
    atoms), warm started at zw (or, on all atoms, at their codes so far). With the Gram matrix, `b` is
    x D^T of the chunk. A working set iterates in its codes' dtype: the input's, or `PRECISE` once it
    stalled."""
    coarse = cfg.criterion == "gap" and torch.finfo(x.dtype).bits < torch.finfo(PRECISE).bits
    if W is None:
        # on every atom: precisely where a copy of the atoms in PRECISE fits beside the iterates
        dtype = PRECISE if coarse and checker.fits(block_bytes) else x.dtype
    else:
        dtype = zw.dtype
    can_promote = coarse and W is not None and dtype != PRECISE
    xs = x[live].to(dtype)
    tol_live, xx_live = inner_tol[live].to(dtype), xx[live].to(dtype)
    # rounds at least double a signal's iterations so far: few momentum restarts on hard signals
    budget = torch.minimum(cfg.max_iter - used[live], torch.clamp_min(used[live], ROUND_ITER))
    gram = gram if gram is not None and gram.dtype == dtype else None
    if W is None:
        # a PRECISE round: a precise copy fits (see above), so it is the solve's shared one
        on = atoms if dtype == x.dtype else checker.copy(block_bytes)
        z, it, met = _full_round(xs, on, gram, lipschitz, cfg, momentum, restart, codes[live].to(dtype), budget,
                                 tol_live, xx_live, block_bytes // 2 if on is not atoms else block_bytes)
        codes[live] = z.to(codes.dtype)
        residual = xs - z @ on
    else:
        z, it, met, residual = _iterate_sets(xs, atoms, gram, b, live, W, zw, lipschitz, cfg, momentum, restart,
                                             budget, tol_live, xx_live, can_promote, dtype == x.dtype, workers, compiled)
    used[live] += it
    return _Round(live, W, z, met, residual, xs, can_promote)


def _settle(rnd: _Round, corr, worst, x, cfg, block_bytes, codes, used, certified, inner_tol) -> list:
    """Decide, from a round's check on the whole dictionary (`corr`: its residuals' correlations with
    every atom, in the product's precision, to rank atoms by; `worst`: the largest one the dual
    constraint bounds, exact), which of its signals are done (their codes written) and on which working
    sets the others go on: the groups (rows, W, zw) of the next round."""
    n_atoms, d = codes.shape[1], x.shape[1]
    lam, pos, gap_mode = cfg.lam, cfg.positive, cfg.criterion == "gap"
    live, W, z, r, up_ok = rnd.live, rnd.W, rnd.z, rnd.residual, rnd.can_promote
    dtype = z.dtype
    slack = max(cfg.tol ** 0.5, 1e-4)        # violations this small change the objective negligibly
    eps = torch.finfo(dtype).eps
    within = worst <= lam * (1 + slack)
    if gap_mode:
        # z . (D r) = (z D) . r, and z D = x - r exactly as r was formed: no correlation needed in z's dtype
        zcorr = ((rnd.xs - r) * r).sum(1)
        ok = _relative_gap(z.abs().sum(1), zcorr, (r * r).sum(1), worst, lam) <= cfg.tol
    else:
        ok = within
    certified[live] = ok
    done = ok | (used[live] >= cfg.max_iter)
    # the set was solved to its target, no violator is left, and yet the gap is too large
    stalled = within & rnd.met & ~ok
    # a set that missed its own target, or stalled, in a dtype that may be too coarse for it goes on
    # in PRECISE rather than iterating on rounding
    promote = ~done & ~ok & (stalled | ~rnd.met) if up_ok else torch.zeros_like(ok)
    if gap_mode and not up_ok:
        # ... although the set was solved as tightly as the dtype allows: give up
        done |= stalled & (inner_tol[live] <= 10 * eps)
    if W is not None and bool(done.any()):
        codes[live[done].unsqueeze(1), W[done]] = z[done].to(codes.dtype)
    keep = ~done
    if not bool(keep.any()):
        return []
    live = live[keep]
    if gap_mode:
        # the set was solved too loosely for the dictionary's gap: solve it more tightly
        tighten = live[(stalled & ~promote)[keep]]
        inner_tol[tighten] = torch.clamp_min(inner_tol[tighten] / 10, 10 * eps)
    if W is None:
        return [(live, None, None)]
    zk, wk, scores, up = z[keep], W[keep], corr[keep], promote[keep]
    if not pos:
        scores.abs_()
    width = wk.shape[1]
    # A signal moves to a set twice as wide when its support fills more than half its set (Celer's
    # rule) or its support and violators do not fit in it: each round costs a product with every
    # atom, so sets that are too narrow cost more than wide blocks.
    support = (zk != 0).sum(1)
    violators = (scores > lam * (1 + slack)).sum(1)
    wider = (2 * support > width) | (support + violators > width)
    out = []
    for sel, w in ((~wider, width), (wider, 2 * width)):
        m = int(sel.sum())
        if not m:
            continue
        rows, z_sel, w_sel = live[sel], zk[sel], wk[sel]
        wide = PRECISE if bool(up[sel].any()) else dtype
        if (w >= n_atoms // 2 or w * w > 2 * n_atoms * d
                or m * (torch.finfo(wide).bits // 8) * w * (w + d + 12) > block_bytes):
            # the set would cover most atoms, cost more than iterating on them, or not fit: use them all
            codes[rows] = 0
            codes[rows.unsqueeze(1), w_sel] = z_sel.to(codes.dtype)
            out.append((rows, None, None))
            continue
        sc = scores[sel] if m < scores.shape[0] else scores
        # the support always stays in the set: rank it first
        sc.scatter_(1, w_sel, torch.where(z_sel != 0, float("inf"), sc.gather(1, w_sel)))
        w_new = sc.topk(w, dim=1).indices
        # warm start: each new slot takes its atom's old code (kept in the set's dtype), or 0
        same = (w_new.unsqueeze(2) == w_sel.unsqueeze(1)).to(z_sel.dtype)
        z_new = torch.bmm(same, z_sel.unsqueeze(2)).squeeze(2)
        moving = up[sel]
        if bool(moving.any()) and not bool(moving.all()):
            out.append((rows[~moving], w_new[~moving], z_new[~moving]))
            rows, w_new, z_new = rows[moving], w_new[moving], z_new[moving]
        out.append((rows, w_new, z_new.to(wide)))
    return out


def _iterate_sets(xs, atoms, gram, b, live, W, zw, lipschitz, cfg, momentum, restart, budget, tol, xx,
                  can_promote, input_dtype, workers, compiled):
    """Iterate each signal of a group on its working set W (m, w), warm started at zw, in blocks of
    signals on `workers` threads (many small operations per iteration: see `sparsecode.parallel`), in the
    compiled kernels where `compiled`, else with torch operations.
    Returns the codes on the sets, the iterations used, whether each met its target, and the residuals.
    With `gram` (in the sets' dtype) each signal's Gram block and right-hand side are gathered from it
    and from `b` (x D^T of the chunk's signals, `live` indexing its rows); otherwise they come from the
    signal's own atoms."""
    m, w = W.shape
    n_atoms, d = atoms.shape
    dtype = zw.dtype
    out = torch.empty_like(zw)
    its = torch.empty(m, dtype=torch.long, device=zw.device)
    mets = torch.empty(m, dtype=torch.bool, device=zw.device)
    r = torch.empty(m, d, dtype=dtype, device=zw.device)

    def work(start: int, stop: int) -> None:
        Ws, xb = W[start:stop], xs[start:stop]
        if compiled:
            z = zw[start:stop].contiguous().clone()
            its[start:stop], mets[start:stop], r[start:stop] = native.lasso_sets(
                xb.contiguous(), atoms, Ws.contiguous(), z, budget[start:stop].contiguous(),
                tol[start:stop].contiguous(), xx[start:stop].contiguous(), lipschitz, cfg.lam, cfg.positive, momentum,
                restart, cfg.criterion == "gap", CHECK_EVERY, can_promote, gram=gram, b=None if gram is None else b,
                b_rows=None if gram is None else live[start:stop].contiguous())
            out[start:stop] = z
            return
        mb = Ws.shape[0]
        aw = None
        # Each signal's Gram block (mb, w, w): gathered from the Gram matrix (a flat index_select; advanced
        # indexing with (m, w) index tensors was several times slower here), or from its own atoms.
        if gram is not None:
            flat = (Ws.unsqueeze(2) * n_atoms + Ws.unsqueeze(1)).reshape(-1)
            quad = gram.reshape(-1).index_select(0, flat).view(mb, w, w)
            bw = b.reshape(-1).index_select(0, (live[start:stop].unsqueeze(1) * n_atoms + Ws).reshape(-1)).view(mb, w)
        else:
            aw = atoms.index_select(0, Ws.reshape(-1)).view(mb, w, d).to(dtype)
            quad = torch.bmm(aw, aw.transpose(1, 2))
            bw = torch.bmm(aw, xb.unsqueeze(2)).squeeze(2)
        z, it, met = proximal_gradient(bw, quad, 1.0 / _block_lipschitz(quad, lipschitz), cfg.lam, cfg.positive,
                                       budget[start:stop], tol[start:stop], momentum, restart, zw[start:stop],
                                       criterion=cfg.criterion, xx=xx[start:stop], leave_unresolvable=can_promote)
        del quad, bw
        out[start:stop], its[start:stop], mets[start:stop] = z, it, met
        # a precise block's residual is precise too: from its own atoms, not a float32 product
        r[start:stop] = xb - (sparse_rows_product(z, Ws, atoms) if input_dtype or aw is None
                              else torch.bmm(z.unsqueeze(1), aw).squeeze(1))

    # two blocks per worker, so that a worker on a busy core leaves more of them to the other; not so
    # small that the per-operation overhead of each iteration dominates
    run_blocks(m, max(MIN_BLOCK, -(-m // (2 * workers))) if workers > 1 else m, workers, work)
    return out, its, mets, r


class _Checker:
    """Each round's check of its signals on the whole dictionary: the correlations of their residuals with
    every atom, and the largest one the dual constraint bounds, exactly.

    One product with all atoms serves every group of a round, in low precision where the device
    multiplies it natively (bfloat16, `low_atoms`; about 3x faster than float32 on a CPU with
    AVX512-BF16), else in the atoms' dtype. Its error is bounded (`_product_error`), so the largest
    correlation is among the atoms whose product lies within twice that bound of the product's
    maximum, and only they are recomputed in the residual's dtype (`_recheck`): the certificates are
    those of a product in that dtype. Rows with too many such atoms get a product in their dtype.

    It also keeps the atoms in PRECISE for rounds that iterate on every atom in it: a whole copy,
    converted once per solve and shared by its rounds where it fits in half a chunk's budget
    (converting the atoms every round cost more than the check itself: 39 ms a round at 16,384 x 576
    on the 2-core EPYC).
    """

    def __init__(self, atoms: torch.Tensor, low_atoms: torch.Tensor | None = None, compiled: bool = False):
        self.atoms, self.low_atoms, self.compiled = atoms, low_atoms, compiled
        self._copy, self._norm, self._lock = None, None, threading.Lock()

    def fits(self, block_bytes: int) -> bool:
        """Whether a whole copy in PRECISE fits in half a chunk's budget."""
        return self.atoms.numel() * (torch.finfo(PRECISE).bits // 8) <= block_bytes // 2

    def copy(self, block_bytes: int) -> torch.Tensor | None:
        """The shared copy in PRECISE, made on first use; None where it does not fit."""
        if not self.fits(block_bytes):
            return None
        with self._lock:                      # chunks on worker threads share one copy
            if self._copy is None:
                self._copy = self.atoms.to(PRECISE)
        return self._copy

    def correlations(self, r: torch.Tensor, block_bytes: int) -> torch.Tensor:
        """``r @ atoms.T`` in r's dtype."""
        atoms = self.atoms
        if r.dtype == atoms.dtype:
            return r @ atoms.T
        copy = self.copy(block_bytes) if r.dtype == PRECISE else None
        if copy is not None:
            return r @ copy.T
        step = max(1, min(atoms.shape[0], block_bytes // (2 * atoms.shape[1] * r.element_size())))
        return torch.cat([r @ atoms[s:s + step].to(r.dtype).T for s in range(0, atoms.shape[0], step)], dim=1)

    def check(self, residuals: list[torch.Tensor], positive: bool, block_bytes: int, exact: bool = True
              ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """For each of `residuals` (m_i, d): ``r @ atoms.T`` in the product's precision (to rank atoms by)
        and the largest correlation the dual constraint bounds (see `_worst`) to r's accuracy (None
        without `exact`)."""
        on = self.low_atoms if self.low_atoms is not None else self.atoms
        corr = torch.cat([r.to(on.dtype) for r in residuals]) @ on.T
        out, start = [], 0
        for r in residuals:
            part = corr[start:start + r.shape[0]]
            start += r.shape[0]
            if not exact:
                worst = None
            elif on.dtype == r.dtype:
                worst = _worst(part, positive)
            else:
                worst = self._recheck(r, part, positive, block_bytes)
            out.append((part, worst))
        return out

    def _recheck(self, r: torch.Tensor, corr: torch.Tensor, positive: bool, block_bytes: int) -> torch.Tensor:
        """The largest correlation the dual constraint bounds, in r's dtype, from `corr`, r's product with
        all atoms in a coarser dtype: the atoms that may hold it are recomputed exactly."""
        atoms = self.atoms
        with self._lock:
            if self._norm is None:
                self._norm = float(atoms.norm(dim=1).max()) * (1 + 1e-3)     # margin for its own rounding
        bound = _product_error(corr.dtype, corr.device, atoms.shape[1]) * self._norm * r.norm(dim=1)
        top = _worst(corr, positive).to(r.dtype)
        cut = top - 2 * bound
        # one step of corr's own rounding below (of the cut's size or the maximum's, whichever is larger),
        # so that rounding the cut to corr's dtype cannot lift it above an atom that may hold the maximum
        cut = cut - torch.maximum(cut.abs(), top.abs()) * torch.finfo(corr.dtype).eps
        if self.compiled and corr.dtype in (torch.bfloat16, torch.float32):
            # one pass over corr, each near atom's product computed as it is met: no (pairs, d) gather
            worst, crowded = native.recheck(corr.contiguous(), atoms, r.contiguous(), cut.contiguous(), positive,
                                            MAX_RECHECKED)
        else:
            cut = cut.to(corr.dtype).unsqueeze(1)
            near = corr >= cut if positive else (corr >= cut) | (corr <= -cut)
            rows, cols = near.nonzero(as_tuple=True)
            exact = (atoms.index_select(0, cols).to(r.dtype) * r.index_select(0, rows)).sum(1)
            worst = r.new_full((r.shape[0],), -float("inf") if positive else 0.0)
            worst.scatter_reduce_(0, rows, exact if positive else exact.abs(), "amax")
            crowded = near.sum(1) > MAX_RECHECKED
        if bool(crowded.any()):
            worst[crowded] = _worst(self.correlations(r[crowded], block_bytes), positive)
        # a residual that is not finite reaches no cut: its NaN must come through, never certify
        return torch.where(torch.isfinite(top), worst, top)


def _product_error(dtype: torch.dtype, device: torch.device, d: int) -> float:
    """A bound on |fl(a . r) - a . r| / (||a|| ||r||) for a matrix product of length-d rows in `dtype`
    when a and r are rounded to `dtype` first.

    float32 and float64: (d + 2) u / (1 - (d + 2) u) in the standard model (any order of summation,
    fused multiply-adds included), u the unit roundoff of what the product really computes in (TF32 or
    bfloat16 where torch's float32 matmul precision allows them). bfloat16, whose products accumulate
    in float32: the rounding of both factors (2u + u^2), the float32 sums, and the result's rounding
    to bfloat16 (u); on CUDA, where cuBLAS may also add split sums in bfloat16
    (`allow_bf16_reduced_precision_reduction`), 6u more for up to 32 splits added pairwise.
    """
    if dtype == torch.bfloat16:
        u = 2.0 ** -8
        inputs = 2 * u + u * u
        splits = 6 * u if (torch.device(device).type == "cuda"
                           and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction) else 0.0
        total = inputs + (1 + inputs) * (_product_error(torch.float32, device, d) + splits)
        return total + u * (1 + total)
    u = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        reduced = {"high": 2.0 ** -11, "medium": 2.0 ** -8}.get(torch.get_float32_matmul_precision(), u)
        if torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            reduced = max(reduced, 2.0 ** -11)
        u = max(u, reduced)
    n = (d + 2) * u                     # d products and sums, and the rounding of r
    return n / (1 - n) if n < 1 else float("inf")


def _full_round(xs, atoms, gram, lipschitz, cfg, momentum, restart, z0, budget, tol, xx, block_bytes):
    """One round of iterations on every atom, in slices of signals that fit the chunk's budget."""
    n_atoms = atoms.shape[0]
    quad = gram if gram is not None and n_atoms <= 2 * atoms.shape[1] else (atoms,)
    # per signal: the right-hand side and about five iterates of width n_atoms
    rows = max(1, block_bytes // (xs.element_size() * 6 * n_atoms))
    zs, its, mets = [], [], []
    for s in range(0, xs.shape[0], rows):
        sl = slice(s, s + rows)
        b = xs[sl] @ atoms.T
        z, it, met = proximal_gradient(b, quad, 1.0 / lipschitz, cfg.lam, cfg.positive, budget[sl], tol[sl],
                                       momentum, restart, z0[sl], criterion=cfg.criterion, xx=xx[sl])
        zs.append(z)
        its.append(it)
        mets.append(met)
    return torch.cat(zs), torch.cat(its), torch.cat(mets)


def _power_start(w: int, dtype, device) -> torch.Tensor:
    """The start of the blocks' power iterations: 1 + frac(p / golden ratio) at position p, a vector with
    no symmetry to be orthogonal to (kernels.c starts from the same)."""
    p = torch.arange(w, dtype=torch.float64, device=device)
    return (1 + torch.frac(p * 0.6180339887498949)).to(dtype)


def _block_lipschitz(quad: torch.Tensor, bound: float, steps: int = 20) -> torch.Tensor:
    """Largest eigenvalue of each Gram block (n, w, w), by power iteration, as a step size bound.

    A block's constant is often several times smaller than the whole dictionary's, and the step
    1/L sets the convergence rate. Power iteration approaches from below, so the estimate gets a
    10% margin and is capped by `bound`, the full dictionary's constant, which is always safe.
    It starts from `_power_start`, not from ones: ones can be orthogonal to the top eigenvector (a
    block [[1, -c], [-c, 1]] has ones as its eigenvector of 1 - c), and an estimate of the smaller
    eigenvalue gives a step too long to converge.
    """
    v = _power_start(quad.shape[1], quad.dtype, quad.device).expand(quad.shape[0], -1)
    for _ in range(steps):
        v = _apply(quad, v)
        v = v / torch.clamp_min(v.norm(dim=1, keepdim=True), torch.finfo(v.dtype).tiny)
    rayleigh = (_apply(quad, v) * v).sum(1)
    return torch.clamp(1.1 * rayleigh, max=bound)


class _ProximalGradientEncoder(Encoder):
    family = "lasso"
    knob = "lam"
    momentum: bool

    @classmethod
    def budget_params(cls, budget: int) -> dict:
        # no tolerance and all atoms from the start: every signal runs exactly `budget` iterations
        return {"max_iter": budget, "tol": 0.0, "working_set": 0}

    @classmethod
    def reference_params(cls, lam: float, positive: bool) -> dict:
        # converged tightly: a relative duality gap of 1e-9 certifies the optimum
        return {**super().reference_params(lam, positive), "tol": 1e-9, "criterion": "gap",
                "max_iter": max(20000, cls.Config.max_iter)}

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode_with_info(x).codes

    def _encode_with_info(self, x: torch.Tensor) -> Encoded:
        d, cfg = self.dictionary, self.config
        atoms = d.atoms_as(x.dtype, x.device)
        budget = self.memory_budget(x.device)
        use_gram, rows = lasso_plan(x.shape[0], d.n_atoms, d.d, x.dtype, budget, cfg.working_set)
        gram = d.gram(x.dtype, x.device) if use_gram else None
        # one chunk at a time holds the whole budget; its blocks of iterations share the workers
        chunk_bytes = budget - (gram.numel() * gram.element_size() if use_gram else 0)
        compiled = native.resolve(cfg.kernel, x.device)
        # 'auto' takes bfloat16 checks on the CPU only: their error bound was measured there (see precision)
        wanted = "full" if cfg.precision == "auto" and x.device.type != "cpu" else cfg.precision
        low = low_precision(wanted, x.dtype, x.device)
        codes, n_iter, certified = solve_lasso(x, atoms, gram, d.lipschitz, cfg, momentum=self.momentum,
                                               restart=getattr(cfg, "restart", False), chunk=rows,
                                               workers=cpu_workers(x.device), chunk_bytes=chunk_bytes,
                                               compiled=compiled,
                                               low_atoms=None if low is None else d.atoms_as(low, x.device))
        uncertified = int((~certified).sum())
        if uncertified:
            what = "duality gap over the objective" if cfg.criterion == "gap" else "relative step"
            log.warning("%s: %d of %d signals reached max_iter=%d before their %s fell below tol=%g; "
                        "raise max_iter (or tol)", self.name, uncertified, x.shape[0], cfg.max_iter, what, cfg.tol)
        mean_iter = float(n_iter.float().mean()) if x.shape[0] else 0.0
        return Encoded(codes, n_iter=mean_iter, uncertified=uncertified, variant="gram" if use_gram else "gram-free",
                       precision=str(low or x.dtype).removeprefix("torch."), kernel="native" if compiled else "torch")

    def flops_per_signal(self, encoded=None) -> float:
        n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
        w = self.config.working_set
        if 0 < w < n_atoms // 2:
            per_iter = 2 * w * w + 8 * w
            checks = 4 * d * n_atoms            # certification rounds (most signals need one or two)
        else:
            per_iter = (2 * n_atoms * n_atoms if n_atoms <= 2 * d else 4 * n_atoms * d) + 8 * n_atoms
            checks = 4 * d * n_atoms
        n_iter = encoded.n_iter if encoded is not None and encoded.n_iter is not None else self.config.max_iter
        return 2 * d * n_atoms + checks + n_iter * per_iter


class ISTA(_ProximalGradientEncoder):
    """Iterative soft-thresholding with step 1/L, L = ||D||_2^2."""

    name = "ista"
    Config = LassoConfig
    momentum = False
    slow = True             # hundreds to thousands of iterations per signal without momentum


class FISTA(_ProximalGradientEncoder):
    """ISTA with Nesterov momentum (Beck & Teboulle) and adaptive restart (O'Donoghue & Candes)."""

    name = "fista"
    Config = FISTAConfig
    momentum = True
