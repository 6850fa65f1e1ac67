"""Greedy pursuits: matching pursuit (MP) and orthogonal matching pursuit (OMP).

Each comes in two variants that compute the same codes:

- **gram**: the residual correlations are updated from rows of the dictionary's Gram matrix
  (``n_atoms^2`` values, computed once per dtype and device and cached on the `Dictionary`). Few
  multiply-adds per signal, but it needs the Gram matrix in memory.
- **gram-free**: every step recomputes the residual correlations from the atoms with one large
  matrix product, and OMP orthogonalises the selected atoms only. Memory grows linearly with
  ``n_atoms``, so it runs at any dictionary size.

`variant="auto"` takes the Gram matrix where it fits the memory budget and pays for itself.
Signals are encoded in blocks sized from the budget (`memory`), spread over worker threads.
"""
from __future__ import annotations

import abc
import logging
import math
import threading
from dataclasses import dataclass

import torch

from sparsecode import native
from sparsecode.encoder import Encoded, Encoder, KernelConfig
from sparsecode.memory import fits, format_bytes, rows_within
from sparsecode.ops import PRECISIONS, low_precision, sparse_rows_product
from sparsecode.parallel import cpu_workers, run_blocks

log = logging.getLogger(__name__)

VARIANTS = ("auto", "gram", "gram-free")

#: Bytes of per-block state a CPU worker aims for in the Gram variant. Smaller blocks keep its state in
#: cache, larger ones pay each operation's fixed cost over more signals; measured on the 2-core EPYC
#: (32 MB L3), omp at 1,024 x 256, k=16, interleaved against 16 MB: 4 MB 0.82x, 8 MB 0.90-1.03x,
#: 32 MB 1.02-1.10x (equal blocks per worker); 16,384 x 576, k=32: 16 to 64 MB alike.
CACHE_BLOCK_BYTES = 16 * 2 ** 20
#: Signals per block on the CPU: one matrix product with all atoms per block runs at full speed from here.
BLOCK = 256
#: Fewest signals per block: below this, per-operation overhead outweighs what the cache saves.
MIN_BLOCK = 8


@dataclass(frozen=True)
class PursuitConfig(KernelConfig):
    k: int = 16
    """Atoms to select per signal: the target L0."""
    tol: float | None = None
    """Also stop a signal once its relative residual ||r|| / ||x|| is at most tol."""
    variant: str = "auto"
    """'gram' (updates from the cached n_atoms x n_atoms Gram matrix), 'gram-free' (correlations recomputed
    from the atoms each step; memory linear in n_atoms) or 'auto' (gram where it fits the memory budget and
    pays for itself)."""
    chunk: int | None = None
    """At most this many signals per block [default: as many as the memory budget and the cache allow]."""
    threads: int = 0
    """CPU worker threads that encode blocks of signals in parallel, each running its operations on one core
    (0: torch's thread count)."""
    precision: str = "auto"
    """Of the gram-free variant's products with all atoms: 'bfloat16' (each pick then checked in the input's
    precision, so the picks are those of 'full'), 'full' (the input's dtype) or 'auto' (bfloat16 for float32
    input where the device multiplies bfloat16 natively: a CUDA GPU, or a CPU with AVX512-BF16 or AMX)."""

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.chunk is not None and (isinstance(self.chunk, bool) or self.chunk < 1):
            raise ValueError(f"chunk must be >= 1 or None, got {self.chunk!r}")
        if isinstance(self.threads, bool) or self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads!r}")


# --- kernels ----------------------------------------------------------------------------------
def omp_chunk(alpha0: torch.Tensor, gram: torch.Tensor, diag: torch.Tensor, k: int,
              unexplained: torch.Tensor | None = None, workspace: dict | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch OMP from the Gram matrix with a progressive Cholesky factorisation.

    `alpha0` is ``x @ D.T`` (n, n_atoms). The Cholesky factor L of the selected atoms' Gram matrix
    grows one row per step, and with it its inverse: row m of ``L^-1`` gives the m-th orthonormalised
    selected atom as a combination of the selected atoms, ``q_m = sum_i L^-1[m, i] d_{s_i}``. L's new
    row is ``L^-1`` times the new atom's Gram entries with the selected ones, and the residual
    correlations fall by ``u_j D q_j``: one product of the Gram matrix with a sparse matrix holding
    ``j + 1`` coefficients per signal (`sparse_rows_product`), which reads only the support's Gram rows
    and keeps no per-signal state of n_atoms x k (Rubinstein et al.'s Batch-OMP keeps those
    correlations per signal, and updating them was most of its time). The codes come from one
    triangular solve at the end.
    `unexplained` (n,), when given, is the squared residual norm each signal may stop at; the
    residual's squared norm falls by ``u_j**2`` per step, so the test is free.
    Returns the selected indices (n, k) and their coefficients (n, k); a signal that stopped early
    (or whose residual lies in the span already) gets zero coefficients for its later picks.
    `alpha0` is overwritten. `workspace` (a dict kept between calls of one thread) reuses the large
    buffers: a fresh allocation of this size is new pages from the kernel, and faulting them in
    cost more than the arithmetic that fills them.
    """
    n, n_atoms = alpha0.shape
    dtype, device = alpha0.dtype, alpha0.device
    alpha = alpha0
    scale = _selection_scale(diag)
    score = _buffer(workspace, "score", (n, n_atoms), dtype, device)
    inv = torch.zeros(n, k, k, dtype=dtype, device=device)           # L^-1, row by row
    state = _Cholesky(n, k, dtype, device, unexplained)
    flat_gram = gram.view(-1)
    for j in range(k):
        pick = _pick(alpha, scale, score)
        diag_p = diag.index_select(0, pick)
        # L's new row: w = L^-1 (G[s_m, pick])_m, the new atom's coordinates on q_0 .. q_{j-1}
        g = flat_gram.take(state.idx[:, :j] * n_atoms + pick[:, None])
        w = torch.bmm(inv[:, :j, :j], g.unsqueeze(2)).squeeze(2)
        d_jj, ok = state.add(j, pick, w, diag_p - (w * w).sum(1), diag_p)
        u_j = alpha.gather(1, pick.unsqueeze(1)).squeeze(1) * ok / d_jj
        state.explain(j, u_j)
        if j == k - 1:
            break                                          # the last pick needs no residual update
        # q_j = (d_pick - sum_m w_m q_m) / L[j, j]; an atom that does not count gets q_j = 0
        inv_jj = ok / d_jj
        inv[:, j, :j] = torch.bmm(w.unsqueeze(1), inv[:, :j, :j]).squeeze(1) * -inv_jj[:, None]
        inv[:, j, j] = inv_jj
        sparse_rows_product(inv[:, j, :j + 1] * -u_j[:, None], state.idx[:, :j + 1], gram, out=alpha)
    return state.idx, state.coefficients()


def omp_gram_free(x: torch.Tensor, corr: "Correlations", diag: torch.Tensor, k: int,
                  unexplained: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP without the Gram matrix: the same picks and coefficients as `omp_chunk`.

    Each step computes the residual's correlations with every atom as one matrix product
    ``r @ D.T`` (`corr`) and orthogonalises only the newly selected atom against the orthonormal
    basis Q of those already taken (Gram-Schmidt, applied twice so float32 keeps Q orthonormal). Q's
    coefficients form the same Cholesky factor L of the selected atoms' Gram matrix as in
    `omp_chunk`, so the codes come from the same triangular solve. Memory per signal: n_atoms
    correlations plus k x d for Q, independent of n_atoms^2.
    """
    n, d = x.shape
    dtype, device = x.dtype, x.device
    atoms = corr.atoms
    r = x.clone()
    Q = torch.zeros(n, k, d, dtype=dtype, device=device)
    state = _Cholesky(n, k, dtype, device, unexplained)
    for j in range(k):
        pick, _ = corr.pick(r)
        v = atoms.index_select(0, pick)
        w = torch.zeros(n, j, dtype=dtype, device=device)
        if j:
            for _ in range(2):
                w_pass = torch.bmm(Q[:, :j], v.unsqueeze(2)).squeeze(2)
                v.unsqueeze(1).baddbmm_(w_pass.unsqueeze(1), Q[:, :j], alpha=-1)
                w += w_pass
        d_jj, ok = state.add(j, pick, w, (v * v).sum(1), diag.index_select(0, pick))
        q = v.mul_((ok / d_jj)[:, None])
        u_j = (r * q).sum(1)
        state.explain(j, u_j)
        Q[:, j] = q
        if j < k - 1:
            r.addcmul_(u_j[:, None], q, value=-1)
    return state.idx, state.coefficients()


def mp_chunk(alpha: torch.Tensor, codes: torch.Tensor, gram: torch.Tensor, diag: torch.Tensor, k: int,
             unexplained: torch.Tensor | None = None, workspace: dict | None = None) -> None:
    """Matching pursuit from the Gram matrix: adds k steps into `codes` (n, n_atoms), in place.

    `alpha` (n, n_atoms) holds ``x @ D.T`` and is overwritten with the final residual correlations.
    """
    rows = torch.arange(alpha.shape[0], device=alpha.device)
    scale = _selection_scale(diag)
    score = _buffer(workspace, "score", alpha.shape, alpha.dtype, alpha.device)
    row = _buffer(workspace, "row", alpha.shape, alpha.dtype, alpha.device)
    remaining = unexplained
    for _ in range(k):
        pick = _pick(alpha, scale, score)
        step, remaining = _mp_step(alpha.gather(1, pick.unsqueeze(1)).squeeze(1), diag.index_select(0, pick),
                                   remaining)
        codes.index_put_((rows, pick), step, accumulate=True)
        alpha.addcmul_(step[:, None], torch.index_select(gram, 0, pick, out=row), value=-1)


def mp_gram_free(x: torch.Tensor, codes: torch.Tensor, corr: "Correlations", diag: torch.Tensor, k: int,
                 unexplained: torch.Tensor | None = None) -> None:
    """Matching pursuit from the atoms (residual correlations recomputed each step): same steps as `mp_chunk`."""
    rows = torch.arange(x.shape[0], device=x.device)
    r = x.clone()
    remaining = unexplained
    for _ in range(k):
        pick, value = corr.pick(r)
        step, remaining = _mp_step(value, diag.index_select(0, pick), remaining)
        codes.index_put_((rows, pick), step, accumulate=True)
        r.addcmul_(step[:, None], corr.atoms.index_select(0, pick), value=-1)


def gp_chunk(alpha: torch.Tensor, codes: torch.Tensor, gram: torch.Tensor, diag: torch.Tensor, k: int,
             unexplained: torch.Tensor | None = None, workspace: dict | None = None) -> None:
    """Gradient pursuit (Blumensath & Davies 2008) from the Gram matrix: k steps into `codes` (n, n_atoms).

    Each step adds the unselected atom most correlated with the residual to the support, then takes
    one exact line-search step along the gradient restricted to the support, ``g = (D r)_support``:
    ``z += a g`` with ``a = ||g||^2 / ||g D||^2``, where OMP would solve the least-squares problem on
    the support. The correlations follow as ``alpha -= a g G``, from the support's rows of the Gram
    matrix (step j reads j + 1 rows per signal, as OMP's). `alpha` (n, n_atoms) holds ``x @ D.T`` and is
    overwritten.
    """
    n = alpha.shape[0]
    scale = _selection_scale(diag)
    score = _buffer(workspace, "score", alpha.shape, alpha.dtype, alpha.device)
    gG = _buffer(workspace, "gG", alpha.shape, alpha.dtype, alpha.device)
    idx = torch.zeros(n, k, dtype=torch.long, device=alpha.device)
    remaining = unexplained
    for j in range(k):
        idx[:, j] = _pick_unselected(alpha, scale, score, idx[:, :j])
        live = _live(remaining, n, alpha.device)
        support = idx[:, :j + 1]
        g = alpha.gather(1, support) * live[:, None]
        gG.zero_()
        sparse_rows_product(g, support, gram, out=gG)
        step = _gp_step(g, (g * gG.gather(1, support)).sum(1))
        codes.scatter_add_(1, support, step[:, None] * g)
        alpha.addcmul_(step[:, None], gG, value=-1)
        if remaining is not None:
            # the residual's squared norm falls by 2 a r.(gD) - a^2 ||gD||^2 = a ||g||^2, as r.(gD) = ||g||^2
            remaining = remaining - step * (g * g).sum(1)


def gp_gram_free(x: torch.Tensor, codes: torch.Tensor, corr: "Correlations", diag: torch.Tensor, k: int,
                 unexplained: torch.Tensor | None = None) -> None:
    """Gradient pursuit from the atoms (correlations recomputed each step): the same steps as `gp_chunk`.

    With a low-precision `corr` each pick is certified (`Correlations.pick`, the atoms already selected
    left out) and the support's correlations, the step's values, are computed exactly from its atoms."""
    n = x.shape[0]
    atoms = corr.atoms
    scale = _selection_scale(diag)
    r = x.clone()
    alpha = score = None
    if corr.low is None:
        alpha = x @ atoms.T
        score = torch.empty_like(alpha)
    idx = torch.zeros(n, k, dtype=torch.long, device=x.device)
    remaining = unexplained
    for j in range(k):
        if alpha is not None:
            if j:
                torch.mm(r, atoms.T, out=alpha)
            idx[:, j] = _pick_unselected(alpha, scale, score, idx[:, :j])
        else:
            idx[:, j] = corr.pick(r, exclude=idx[:, :j])[0]
        live = _live(remaining, n, x.device)
        support = idx[:, :j + 1]
        chosen = atoms[support]                                          # (n, j + 1, d)
        g = alpha.gather(1, support) if alpha is not None else torch.bmm(chosen, r.unsqueeze(2)).squeeze(2)
        g = g * live[:, None]
        u = torch.bmm(g.unsqueeze(1), chosen).squeeze(1)                # the gradient's image g D
        step = _gp_step(g, (u * u).sum(1))
        codes.scatter_add_(1, support, step[:, None] * g)
        r.addcmul_(step[:, None], u, value=-1)
        if remaining is not None:
            remaining = remaining - step * (g * g).sum(1)


def _pick_unselected(alpha, scale, score, selected: torch.Tensor) -> torch.Tensor:
    """Index of the largest |correlation| of each row among the atoms not listed in its row of `selected`
    (n, m) (`score` is scratch space of alpha's shape)."""
    torch.abs(alpha, out=score)
    if scale is not None:
        score.mul_(scale)
    if selected.shape[1]:
        score.scatter_(1, selected, -1.0)              # below every score: an atom is selected once
    return score.argmax(dim=1)


def _live(remaining: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """Which rows still have energy to explain (the others take no more steps)."""
    return torch.ones(n, dtype=torch.bool, device=device) if remaining is None else remaining > 0


def _gp_step(g: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """The exact line-search step ||g||^2 / ||g D||^2 per row (0 where the gradient vanishes)."""
    gg = (g * g).sum(1)
    tiny = torch.finfo(g.dtype).tiny
    return torch.where(curvature > tiny, gg / curvature.clamp_min(tiny), torch.zeros_like(gg))

def _buffer(workspace: dict | None, name: str, shape: tuple, dtype, device) -> torch.Tensor:
    """An uninitialised tensor, a view of the one kept in `workspace` under `name` when that is large enough."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buf = workspace.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
        buf = workspace[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
#: Atoms per block of `_pick`'s blocked search on the CPU (twice this from 8,192 atoms): measured on the
#: 2-core EPYC, one thread, abs and argmax of 1,024 rows: 1,024 atoms 0.45 ms against 0.79 ms unblocked;
#: 16,384 atoms (64 rows) 0.23 ms against 1.03 ms. Without writing |alpha| first, omp gained another 15%.
PICK_BLOCK = 64


def _selection_scale(diag: torch.Tensor) -> torch.Tensor | None:
    """1/||d_i|| when the atoms are not unit norm: picks go by normalised correlation."""
    unit = bool(((diag - 1).abs() <= 1e-5).all())
    return None if unit else diag.rsqrt()


def _pick(alpha: torch.Tensor, scale: torch.Tensor | None, score: torch.Tensor) -> torch.Tensor:
    """Index of the largest |correlation| of each row (`score` is scratch space of alpha's shape, which
    may be alpha itself; first index on ties)."""
    # Non-negative IEEE floats order like their bit patterns read as integers, and torch's integer
    # max-with-index is about 1.5x faster than the floating-point one on the CPU.
    bits = _SAME_WIDTH_INT.get(alpha.dtype)
    n, n_atoms = alpha.shape
    width = PICK_BLOCK if n_atoms < 8192 else 2 * PICK_BLOCK
    if alpha.device.type != "cpu" or n_atoms % width or n_atoms < 4 * width or bits is None:
        torch.abs(alpha, out=score)
        if scale is not None:
            score.mul_(scale)
        return (score if bits is None else score.view(bits)).max(dim=1).indices
    # On the CPU a max without its index is vectorised and several times faster than one with it: take
    # each block's largest magnitude first (from its max and min, without writing |alpha|), then the
    # first block holding the row's largest, then the first index within that block.
    if scale is None:
        blocks = alpha.reshape(n, n_atoms // width, width)
    else:
        blocks = torch.mul(alpha, scale, out=score).reshape(n, n_atoms // width, width)
    top = torch.maximum(blocks.amax(2), blocks.amin(2).neg_()).abs_()
    block = top.view(bits).max(dim=1).indices
    inside = blocks[torch.arange(n, device=alpha.device), block].abs_()    # (n, width); faster than gather here
    return block * width + inside.view(bits).max(dim=1).indices


def _mp_step(corr: torch.Tensor, diag_p: torch.Tensor, remaining: torch.Tensor | None):
    step = corr / diag_p
    if remaining is not None:
        step = step * (remaining > 0)
        remaining = remaining - step * step * diag_p
    return step, remaining


#: Candidates re-scored in full precision per signal and step when correlations are computed in bfloat16.
CANDIDATES = 8
#: |error| of a bfloat16 score with float32 accumulation, as a multiple of ||r|| ||d_i||: both factors
#: rounded (2u), the product rounded (u), the scaling by 1/||d_i|| rounded (u), the float32 sum
#: (d * 2^-24, far below); u = 2^-8, with a margin.
BF16_ERROR = 5 * 2.0 ** -8


class Correlations:
    """The atom of largest |correlation| with each residual, for the gram-free pursuits: one product with
    all atoms per step, which is where their time goes.

    With `low` (bfloat16) that product runs in low precision (about 3x faster in float32's place on a CPU
    with AVX512-BF16) and every pick is certified: the CANDIDATES best-scoring atoms are re-scored
    exactly, and the best of them stands when it beats every other atom's low-precision score plus the
    product's error bound (BF16_ERROR ||r||, in units of normalised correlation). Rows that cannot be
    certified (near-ties) are recomputed in full precision, so the picks are always those of the full
    product, up to its own rounding.
    """

    def __init__(self, atoms: torch.Tensor, diag: torch.Tensor, low: torch.dtype | None = None,
                 low_atoms: torch.Tensor | None = None):
        self.atoms, self.low = atoms, low
        self.low_atoms = low_atoms if low is None or low_atoms is not None else atoms.to(low)
        self.scale = _selection_scale(diag)
        self.recomputed = 0                  # rows that needed the full-precision product

    def pick(self, r: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the best atom for each row of `r`, and its correlation (in r's precision); with
        `exclude` (n, m), the best of the atoms not listed in its row."""
        if exclude is not None and exclude.shape[1] == 0:
            exclude = None
        if self.low is None or r.shape[0] == 0:
            return self._full(r, exclude)
        # scores stay in low precision: their rounding is part of the bound
        score = (r.to(self.low) @ self.low_atoms.T).abs_()
        if self.scale is not None:
            score.mul_(self.scale.to(self.low))
        if exclude is not None:
            score.scatter_(1, exclude, -1.0)             # below every score: never a candidate that wins
        m = min(CANDIDATES, score.shape[1] - 1)
        if m < 1:
            return self._full(r, exclude)
        top, cand = score.topk(m + 1, dim=1)
        exact = torch.bmm(self.atoms[cand[:, :m]], r.unsqueeze(2)).squeeze(2)          # (n, m), r's dtype
        exact_score = exact.abs() if self.scale is None else exact.abs() * self.scale[cand[:, :m]]
        if exclude is not None:
            exact_score = torch.where(top[:, :m] < 0, -1.0, exact_score)
        best_score, best = exact_score.max(dim=1)
        pick = cand.gather(1, best[:, None]).squeeze(1)
        value = exact.gather(1, best[:, None]).squeeze(1)
        bound = BF16_ERROR * r.norm(dim=1)
        # the best candidate must beat every other atom, whose exact score is at most its low-precision
        # score plus the bound, and also the candidates' own low-precision ranking: top[:, m] bounds both
        unsure = (best_score < top[:, m].to(best_score.dtype) + bound).nonzero().squeeze(1)
        if unsure.numel():
            self.recomputed += unsure.numel()
            again, again_value = self._full(r[unsure], None if exclude is None else exclude[unsure])
            pick[unsure], value[unsure] = again, again_value
        return pick, value

    def _full(self, r: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = r @ self.atoms.T
        if exclude is None:
            pick = _pick(alpha, self.scale, torch.empty_like(alpha))
        else:
            pick = _pick_unselected(alpha, self.scale, torch.empty_like(alpha), exclude)
        return pick, alpha.gather(1, pick[:, None]).squeeze(1)


def span_eps(dtype: torch.dtype) -> float:
    """Relative squared distance to the span of the atoms already picked below which OMP's new pick does
    not count (it adds no direction)."""
    return torch.finfo(dtype).eps * 16


class _Cholesky:
    """The growing Cholesky factor of the selected atoms' Gram matrix, shared by both OMP variants."""

    def __init__(self, n: int, k: int, dtype, device, unexplained: torch.Tensor | None):
        self.L = torch.zeros(n, k, k, dtype=dtype, device=device)
        self.inv_d = torch.zeros(n, k, dtype=dtype, device=device)   # 1 / L[m, m]
        self.u = torch.zeros(n, k, dtype=dtype, device=device)       # x in the orthonormal basis
        self.idx = torch.zeros(n, k, dtype=torch.long, device=device)
        self.remaining = unexplained
        self.eps = span_eps(dtype)

    def add(self, j: int, pick, w, norm2, diag_p):
        """Row j of L from the new atom's coordinates `w` on the basis and its squared distance `norm2`
        to the span. Returns L[j, j] and whether the atom counts (not in the span, signal not done)."""
        ok = norm2 > self.eps * diag_p
        if self.remaining is not None:
            ok &= self.remaining > 0
        d_jj = torch.where(ok, norm2.clamp_min(self.eps).sqrt(), torch.ones_like(norm2))
        self.idx[:, j] = pick
        self.L[:, j, :j] = w * ok[:, None]
        self.L[:, j, j] = d_jj
        self.inv_d[:, j] = 1 / d_jj
        return d_jj, ok

    def explain(self, j: int, u_j) -> None:
        self.u[:, j] = u_j
        if self.remaining is not None:
            self.remaining = self.remaining - u_j * u_j

    def coefficients(self) -> torch.Tensor:
        # The codes solve L^T gamma = u (upper triangular): D_I = L Q and x's projection is u Q.
        return torch.linalg.solve_triangular(self.L.transpose(1, 2), self.u.unsqueeze(-1), upper=True).squeeze(-1)


# --- choosing a variant on a GPU -----------------------------------------------------------------
#: A GPU's matrix-product rate over its memory bandwidth (flops per byte): H100, about 700 TFLOP/s in
#: bfloat16 and 50 in float32, against 3 TB/s.
GPU_FLOPS_PER_BYTE = {torch.bfloat16: 200.0, None: 20.0}
#: Passes over a signal's n_atoms correlations that a Gram-free step makes besides its product: the
#: pick, its certification and the residual's bookkeeping.
GRAM_FREE_PASSES = 8.0


def _gram_free_passes(d: int, low: torch.dtype | None) -> float:
    """A Gram-free step's cost per signal on a GPU, in passes over n_atoms values (4 bytes each): the
    product with all atoms (2 d flops per atom) at the device's flops per byte, and its other passes."""
    return 2 * d / (4 * GPU_FLOPS_PER_BYTE[low]) + GRAM_FREE_PASSES


# --- the encoders -------------------------------------------------------------------------------
class _Pursuit(Encoder):
    family = "greedy"
    knob = "k"
    Config = PursuitConfig

    @abc.abstractmethod
    def _row_items(self, variant: str) -> int:
        """What a variant keeps per signal (bytes / itemsize), on top of the returned codes."""

    @abc.abstractmethod
    def _gram_passes(self) -> float:
        """The Gram variant's mean cost per step and signal in passes over n_atoms values. On a CPU the
        Gram variant's state stays in cache (it is chosen wherever it fits and pays); on a GPU each pass
        is memory traffic, set against `_gram_free_passes`."""

    def _energy_to_explain(self, x):
        """Squared residual norm that may be removed before the tolerance ||r|| <= tol ||x|| is met."""
        if self.config.tol is None:
            return None
        return (1 - self.config.tol ** 2) * (x * x).sum(1)

    def _plan(self, x: torch.Tensor) -> tuple[str, bool, int, int, int, int]:
        """The variant, whether its steps run in the compiled kernels, signals per block, per pursuit
        sub-block, worker threads and planned working memory (bytes, the Gram matrix included) for `x`,
        from the budget.

        A block's correlations with all atoms come from one matrix product (large enough to run at the
        machine's arithmetic speed); the Gram variant's torch operations then run on sub-blocks whose state
        (k x n_atoms per signal) stays in cache between steps, since that variant is bound by memory traffic.
        The compiled kernels take one signal at a time, so their blocks need no sub-blocks.
        """
        n, n_atoms, itemsize = x.shape[0], self.dictionary.n_atoms, x.element_size()
        budget = self.memory_budget(x.device)
        gram_bytes = n_atoms * n_atoms * itemsize
        variant = self.config.variant
        if variant == "auto":
            # Computing the Gram matrix costs about n_atoms^2 d multiply-adds; without it every signal
            # costs about k d n_atoms more, so it pays once n * k reaches n_atoms (or is already there).
            fit = fits(budget, gram_bytes + MIN_BLOCK * self._row_items("gram") * itemsize)
            pays = self.dictionary.has_gram(x.dtype, x.device) or n * self.config.k >= n_atoms
            if x.device.type != "cpu":
                pays = pays and self._gram_passes() < _gram_free_passes(self.dictionary.d, self._low_precision(x))
            variant = "gram" if fit and pays else "gram-free"
        row_bytes = self._row_items(variant) * itemsize
        fixed = gram_bytes if variant == "gram" else 0
        if variant == "gram" and not fits(budget, gram_bytes):
            raise ValueError(f"memory budget {format_bytes(budget)} is too small for variant='gram': the Gram "
                             f"matrix of {n_atoms} atoms needs {format_bytes(gram_bytes)}; raise memory or use "
                             "variant='gram-free'")
        rows = rows_within(budget, row_bytes, fixed, what=f"signal ({variant} {self.name}, {n_atoms} atoms)")
        compiled = variant == "gram" and native.resolve(self.config.kernel, x.device)
        if x.device.type == "cpu":
            workers, preferred = cpu_workers(x.device, self.config.threads), BLOCK
            if compiled:
                inner = preferred
            elif variant == "gram":
                # the pursuit's operations run over a whole block, so its block is the cache-sized one
                preferred = inner = max(MIN_BLOCK, CACHE_BLOCK_BYTES // row_bytes)
            else:
                # Each step streams all atoms through one matrix product per block: splitting fewer than
                # BLOCK signals over workers would stream them once per worker, and large products
                # already use every core through torch's own threads.
                inner, workers = preferred, min(workers, -(-n // BLOCK))
        else:
            workers, preferred, inner = 1, n, n
        workers = max(1, min(workers, rows, -(-n // MIN_BLOCK)))
        block = max(1, min(rows // workers, preferred, -(-n // workers), self.config.chunk or n))
        inner = min(inner, block)
        working_bytes = int(fixed + row_bytes * block * workers)
        log.debug("%s: variant %s (%s kernel), %d signals per block (%d per pursuit), %d workers, %s working "
                  "memory (budget %s)", self.name, variant, "native" if compiled else "torch", block, inner, workers,
                  format_bytes(working_bytes), format_bytes(budget))
        return variant, compiled, block, inner, workers, working_bytes

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode_with_info(x).codes

    def _encode_with_info(self, x: torch.Tensor) -> Encoded:
        variant, compiled, block, inner, workers, working_bytes = self._plan(x)
        atoms = self.dictionary.atoms_as(x.dtype, x.device)
        low = None
        if variant == "gram":
            gram = self.dictionary.gram(x.dtype, x.device)
            diag = gram.diagonal().contiguous()
        else:
            gram, diag = None, self.dictionary.norms.to(device=x.device, dtype=x.dtype).square()
            low = self._low_precision(x)
        corr = Correlations(atoms, diag, low, None if low is None else self.dictionary.atoms_as(low, x.device))
        codes = x.new_zeros(x.shape[0], self.dictionary.n_atoms)
        workspaces: dict[int, dict] = {}          # per worker thread, freed when encoding ends
        recomputed: list[int] = []

        def work(start: int, stop: int) -> None:
            workspace = workspaces.setdefault(threading.get_ident(), {})
            xs = x[start:stop]
            alpha = None
            if gram is not None:
                alpha = torch.mm(xs, atoms.T, out=_buffer(workspace, "alpha", (stop - start, atoms.shape[0]),
                                                          x.dtype, x.device))
            mine = Correlations(corr.atoms, diag, corr.low, corr.low_atoms)      # counts per thread
            for s in range(0, stop - start, inner):
                part = slice(s, s + inner)
                self._encode_block(xs[part], None if alpha is None else alpha[part], codes[start:stop][part],
                                   mine, gram, diag, workspace, compiled)
            recomputed.append(mine.recomputed)

        run_blocks(x.shape[0], block, workers, work)
        if low is not None:
            log.debug("%s: %d of %d x %d picks recomputed in full precision", self.name, sum(recomputed),
                      x.shape[0], self.config.k)
        return Encoded(codes, n_iter=float(self.config.k), variant=variant, working_bytes=working_bytes,
                       precision=str(low or x.dtype).removeprefix("torch."), kernel="native" if compiled else "torch")

    def _low_precision(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype of the gram-free products with all atoms (None: x's own)."""
        return low_precision(self.config.precision, x.dtype, x.device)

    def _variant(self, encoded) -> str:
        """The variant a call ran (given its `Encoded`), else the one `variant` names ('gram' for auto:
        the variant used wherever the Gram matrix fits and pays)."""
        if encoded is not None and encoded.variant is not None:
            return encoded.variant
        return "gram" if self.config.variant == "auto" else self.config.variant

    @abc.abstractmethod
    def _encode_block(self, x, alpha, codes, corr: Correlations, gram, diag, workspace: dict, compiled: bool) -> None:
        """Write the codes of signals `x` into `codes` (zeros). With `gram`, `alpha` holds ``x @ atoms.T``
        (overwritten) and `compiled` says whether the steps run in the compiled kernels (`sparsecode.native`);
        the gram-free variant (`gram` and `alpha` None) finds its picks through `corr`."""


class OMP(_Pursuit):
    """Orthogonal matching pursuit: greedy selection, least-squares refit of all selected atoms."""

    name = "omp"
    k_within_d = True

    def _row_items(self, variant: str) -> int:
        n_atoms, d, k = self.dictionary.n_atoms, self.dictionary.d, self.config.k
        small = 2 * k * k + 6 * k + 2 * d
        # gram: correlations and their scores; gram-free: correlations and Q
        return 2 * n_atoms + small if variant == "gram" else n_atoms + k * d + small

    def _gram_passes(self) -> float:
        # step j reads the support's j + 1 Gram rows into alpha, then the pick
        return 0.5 * self.config.k + 6

    def _encode_block(self, x, alpha, codes, corr, gram, diag, workspace: dict, compiled: bool) -> None:
        energy = self._energy_to_explain(x)
        if gram is None:
            idx, coef = omp_gram_free(x, corr, diag, self.config.k, energy)
        elif compiled:
            idx, coef = native.omp_gram(alpha, gram, diag, _selection_scale(diag), self.config.k, energy,
                                        span_eps(x.dtype))
        else:
            idx, coef = omp_chunk(alpha, gram, diag, self.config.k, energy, workspace)
        codes.scatter_add_(1, idx, coef)

    def flops_per_signal(self, encoded=None) -> float:
        n_atoms, d, k = self.dictionary.n_atoms, self.dictionary.d, self.config.k
        if self._variant(encoded) == "gram-free":
            # per step: r D^T (2 d n_atoms), argmax (2 n_atoms), two Gram-Schmidt passes (8 j d)
            return sum(2 * d * n_atoms + 2 * n_atoms + 8 * j * d + 4 * d for j in range(k)) + k * k
        # x D^T, then per step j: alpha from the support's j + 1 Gram rows (2 (j + 1) n_atoms), argmax
        # (2 n_atoms); finally a k x k triangular solve.
        return 2 * d * n_atoms + sum(2 * (j + 1) * n_atoms + 2 * n_atoms for j in range(k - 1)) \
            + 2 * n_atoms + k * k


class MP(_Pursuit):
    """Matching pursuit: k greedy steps, each updating only the chosen atom's coefficient."""

    name = "mp"

    def _row_items(self, variant: str) -> int:
        n_atoms, d = self.dictionary.n_atoms, self.dictionary.d
        # gram: correlations, scores and the gathered Gram rows; gram-free: correlations, residual, atoms
        return 3 * n_atoms + 2 * d if variant == "gram" else n_atoms + 3 * d

    def _gram_passes(self) -> float:
        return 5.0                        # one Gram row into alpha, then the pick

    def _encode_block(self, x, alpha, codes, corr, gram, diag, workspace: dict, compiled: bool) -> None:
        energy = self._energy_to_explain(x)
        if gram is None:
            mp_gram_free(x, codes, corr, diag, self.config.k, energy)
        elif compiled:
            native.mp_gram(alpha, codes, gram, diag, _selection_scale(diag), self.config.k, energy)
        else:
            mp_chunk(alpha, codes, gram, diag, self.config.k, energy, workspace)

    def flops_per_signal(self, encoded=None) -> float:
        n_atoms, d, k = self.dictionary.n_atoms, self.dictionary.d, self.config.k
        if self._variant(encoded) == "gram-free":
            return k * (2 * d * n_atoms + 2 * n_atoms + 4 * d)
        return 2 * d * n_atoms + k * 5 * n_atoms


class GradientPursuit(_Pursuit):
    """Gradient pursuit: OMP's greedy selection, with one line-search gradient step on the support
    in place of OMP's least-squares refit (Blumensath & Davies 2008; the batched OMP approximation
    of dictionary_learning). Two matrix products a step, no factorisation: cheap on accelerators."""

    name = "gradient-pursuit"

    def _row_items(self, variant: str) -> int:
        n_atoms, d, k = self.dictionary.n_atoms, self.dictionary.d, self.config.k
        # gram: correlations, scores, a Gram row and g G; gram-free: correlations, scores, the support's
        # atoms, r and g D
        return 4 * n_atoms + 2 * d if variant == "gram" else 2 * n_atoms + k * d + 3 * d

    def _gram_passes(self) -> float:
        return 0.5 * self.config.k + 6    # step j reads the support's j + 1 Gram rows, then the pick

    def _encode_block(self, x, alpha, codes, corr, gram, diag, workspace: dict, compiled: bool) -> None:
        energy = self._energy_to_explain(x)
        if gram is None:
            gp_gram_free(x, codes, corr, diag, self.config.k, energy)
        elif compiled:
            native.gp_gram(alpha, codes, gram, diag, _selection_scale(diag), self.config.k, energy)
        else:
            gp_chunk(alpha, codes, gram, diag, self.config.k, energy, workspace)

    def flops_per_signal(self, encoded=None) -> float:
        n_atoms, d, k = self.dictionary.n_atoms, self.dictionary.d, self.config.k
        if self._variant(encoded) == "gram-free":
            # per step j: r D^T (2 d n_atoms), argmax, g D on the support (2 (j + 1) d), residual update
            return sum(2 * d * n_atoms + 2 * n_atoms + 2 * (j + 1) * d + 4 * d for j in range(k))
        # x D^T, then per step j: g G from j + 1 Gram rows (2 (j + 1) n_atoms), alpha update and argmax
        return 2 * d * n_atoms + sum(2 * (j + 1) * n_atoms + 5 * n_atoms for j in range(k))
