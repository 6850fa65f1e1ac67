"""Metrics of a comparison row. Inputs may be torch or numpy; results are Python floats.

Dataset-level conventions: FVU and MSE pool every entry of the evaluated set; MCCs average the
absolute Pearson correlation over latents (or atoms) matched one-to-one by the Hungarian algorithm.
"""
from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment

from ._validation import as_tensor


def _t(value, name: str) -> torch.Tensor:
    return as_tensor(value, name).to(torch.float64)


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def mse(x, x_hat) -> float:
    """Mean squared error over all entries."""
    x, x_hat = _t(x, "x"), _t(x_hat, "x_hat")
    _same_shape(x, x_hat, "mse")
    return float(((x - x_hat) ** 2).mean())


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained: sum of squared errors over the sum of squared deviations
    of x from its per-feature mean, over the whole set. Predicting the mean gives 1."""
    x, x_hat = _t(x, "x"), _t(x_hat, "x_hat")
    _same_shape(x, x_hat, "fvu")
    total = ((x - x.mean(0)) ** 2).sum()
    if total == 0:
        raise ValueError("fvu is undefined: x has zero variance")
    return float(((x - x_hat) ** 2).sum() / total)


def nmse_db(x, x_hat) -> float:
    """Normalised MSE in decibels, 10 log10(||x - x_hat||^2 / ||x||^2) over the set (compressed
    sensing applies it to the recovered codes)."""
    x, x_hat = _t(x, "x"), _t(x_hat, "x_hat")
    _same_shape(x, x_hat, "nmse_db")
    return float(10 * torch.log10(((x - x_hat) ** 2).sum() / (x ** 2).sum()))


def mean_l0(codes) -> float:
    """Mean number of non-zero entries per code."""
    return float((_t(codes, "codes") != 0).sum(1).double().mean())


def support_scores(true_codes, codes) -> dict[str, float]:
    """Support precision, recall and F1 over all (signal, atom) entries: how well the set of
    non-zeros matches the truth. Codes must be aligned (same dictionary, same atom order)."""
    t, c = _t(true_codes, "true_codes") != 0, _t(codes, "codes") != 0
    _same_shape(t, c, "support_scores")
    hits = float((t & c).sum())
    n_pred, n_true = float(c.sum()), float(t.sum())
    precision = hits / n_pred if n_pred else 1.0 if not n_true else 0.0
    recall = hits / n_true if n_true else 1.0
    f1 = 2 * hits / (n_pred + n_true) if n_pred + n_true else 1.0
    return {"precision": precision, "recall": recall, "f1": f1}


def exact_support_rate(true_codes, codes) -> float:
    """Fraction of signals whose set of non-zeros equals the true one (the success criterion of
    phase-transition studies)."""
    t, c = _t(true_codes, "true_codes") != 0, _t(codes, "codes") != 0
    _same_shape(t, c, "exact_support_rate")
    return float((t == c).all(dim=1).double().mean())


def _abs_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|Pearson correlation| between the columns of a (n, p) and b (n, q); constant columns give 0."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    corr = (a.T @ b) / torch.clamp_min(na[:, None] * nb[None, :], torch.finfo(a.dtype).tiny)
    corr[(na == 0)[:, None] | (nb == 0)[None, :]] = 0.0
    return corr.abs()


def _matched_mean(corr: torch.Tensor) -> float:
    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    return float(corr[rows, cols].mean())


def code_mcc(true_codes, codes) -> float:
    """Mean correlation coefficient of codes (paper c): |Pearson| between true and inferred latent
    columns over the samples, latents matched one-to-one to maximise the total (Hungarian;
    with unequal counts, min(p, q) pairs), averaged over matched pairs. A permuted, rescaled
    copy of the truth scores 1."""
    t, c = _t(true_codes, "true_codes"), _t(codes, "codes")
    if t.shape[0] != c.shape[0]:
        raise ValueError(f"code_mcc: {t.shape[0]} true codes but {c.shape[0]} inferred codes")
    return _matched_mean(_abs_corr(t, c))


def dictionary_mcc(true_atoms, atoms) -> float:
    """The same matched mean |Pearson| on atoms (rows, correlated across their d entries)."""
    t, a = _t(true_atoms, "true_atoms"), _t(atoms, "atoms")
    if t.shape[1] != a.shape[1]:
        raise ValueError(f"dictionary_mcc: atoms of d={t.shape[1]} and d={a.shape[1]} cannot be compared")
    return _matched_mean(_abs_corr(t.T, a.T))


def lasso_objective(x, codes, atoms, lam: float, bias=None) -> torch.Tensor:
    """Per-signal lasso objective ``0.5 ||x - z D - bias||^2 + lam ||z||_1``, shape (n,), float64."""
    x, z, a = _t(x, "x"), _t(codes, "codes"), _t(atoms, "atoms")
    r = x - z @ a
    if bias is not None:
        r = r - as_tensor(bias, "bias", ndim=1).to(device=r.device, dtype=torch.float64)
    return 0.5 * (r * r).sum(1) + lam * z.abs().sum(1)


#: A reference objective below this fraction of the objective at z = 0 counts as zero: the optimum
#: then reconstructs the signals exactly (lam = 0, or lam tiny with n_atoms >= d), and a ratio to it
#: measures round-off, not distance from the optimum.
ZERO_OPTIMUM = 1e-9


def relative_gap(objective, reference, trivial=None) -> float:
    """How far a set of codes is from the lasso optimum, relative to the optimum:
    ``(sum objective - sum reference) / sum reference`` over the set.

    `trivial` is the objective of the zero code, ``0.5 ||x - bias||^2`` per signal (or its total):
    it is the scale of the problem. Where the reference total is below `ZERO_OPTIMUM` times it
    (the optimum is ~0), a relative gap is meaningless and NaN is returned; use `excess_objective`,
    the absolute gap per signal, instead. Without `trivial`, only a reference of exactly 0 gives NaN.
    """
    objective, reference = torch.as_tensor(objective), torch.as_tensor(reference)
    ref = float(reference.sum())
    floor = 0.0 if trivial is None else ZERO_OPTIMUM * float(torch.as_tensor(trivial).sum())
    if ref <= floor or ref == 0:
        return float("nan")
    return float(objective.sum() - ref) / ref


def excess_objective(objective, reference) -> float:
    """Mean per-signal objective above the reference, ``mean(objective - reference)``: the absolute
    gap, defined also where the optimum is ~0 (then the relative gap is not)."""
    objective, reference = torch.as_tensor(objective), torch.as_tensor(reference)
    return float((objective.to(torch.float64) - reference.to(torch.float64)).mean())


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """H2(p) in bits, elementwise, with H2(0) = H2(1) = 0 (differentiable: training uses it too)."""
    p = p.clamp(0, 1)
    q = 1 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2)


def code_entropy(codes) -> float:
    """Entropy estimate of a set of signals from their binary codes (paper b): the sum over atoms
    of the binary entropy, in bits, of each atom's firing rate."""
    return float(binary_entropy_bits(firing_rates(codes)).sum())


def firing_rates(codes) -> torch.Tensor:
    """Fraction of signals on which each atom is non-zero, shape (n_atoms,)."""
    return (_t(codes, "codes") != 0).double().mean(0)


def dead_fraction(codes) -> float:
    """Fraction of atoms that never fire on the evaluated set."""
    return float((firing_rates(codes) == 0).double().mean())


def dense_fraction(codes, threshold: float = 0.5) -> float:
    """Fraction of ultra-dense atoms: those firing on more than `threshold` of the signals."""
    return float((firing_rates(codes) > threshold).double().mean())


class MetricAccumulator:
    """The set-level metrics of a comparison row, accumulated batch by batch.

    Feeding the whole set at once or in any split gives the same numbers up to float64 rounding:
    FVU's denominator uses the mean of the whole set (per-feature means and squared deviations are
    merged across batches with Chan et al.'s update, which stays accurate where the raw sums of
    squares would cancel), MSE and L0 are sums over entries, dead and dense fractions come from
    per-atom firing counts, and the objective is a sum over signals. Memory: O(d + n_atoms).
    """

    def __init__(self, n_atoms: int, dense_threshold: float = 0.5):
        self.n_atoms = n_atoms
        self.dense_threshold = dense_threshold
        self.n = 0
        self.sq_error = 0.0
        self.mean: torch.Tensor | None = None     # per-feature mean of x so far
        self.m2: torch.Tensor | None = None       # per-feature sum of squared deviations from it
        self.nonzeros = 0
        self.fired = torch.zeros(n_atoms, dtype=torch.long)
        self.objective_sum: float | None = None

    def update(self, x, x_hat, codes, objective=None) -> None:
        """Add a batch: signals x (n, d), reconstructions x_hat (n, d), codes (n, n_atoms), and
        optionally the per-signal objective (n,)."""
        x, x_hat = _t(x, "x"), _t(x_hat, "x_hat")
        _same_shape(x, x_hat, "MetricAccumulator.update")
        codes = as_tensor(codes, "codes")
        if codes.shape != (x.shape[0], self.n_atoms):
            raise ValueError(f"codes have shape {tuple(codes.shape)}, expected ({x.shape[0]}, {self.n_atoms})")
        n_b = x.shape[0]
        if n_b == 0:
            return
        self.sq_error += float(((x - x_hat) ** 2).sum())
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        self._add_moments(n_b, mean_b, m2_b)
        active = codes != 0
        self.nonzeros += int(active.sum())
        self.fired += active.sum(0).cpu()
        if objective is not None:
            self.objective_sum = (self.objective_sum or 0.0) + float(torch.as_tensor(objective).double().sum())

    def _add_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        # Chan et al.'s pairwise update of the per-feature mean and squared deviations
        if self.mean is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            total = self.n + n_b
            delta = mean_b.to(self.mean) - self.mean
            self.m2 = self.m2 + m2_b.to(self.m2) + delta ** 2 * (self.n * n_b / total)
            self.mean = self.mean + delta * (n_b / total)
        self.n += n_b

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        """Add what `other` accumulated (another part of the same set): the same numbers as one
        accumulator fed both parts, up to float64 rounding. Returns self."""
        if other.n_atoms != self.n_atoms:
            raise ValueError(f"cannot merge accumulators over {other.n_atoms} and {self.n_atoms} atoms")
        if other.n == 0:
            return self
        self.sq_error += other.sq_error
        self._add_moments(other.n, other.mean, other.m2)
        self.nonzeros += other.nonzeros
        self.fired += other.fired
        if other.objective_sum is not None:
            self.objective_sum = (self.objective_sum or 0.0) + other.objective_sum
        return self

    def result(self) -> dict[str, float]:
        """fvu, mse, l0, dead, dense and, when objectives were given, the mean objective."""
        if self.n == 0:
            raise ValueError("no signals were accumulated")
        total = float(self.m2.sum())
        if total == 0:
            raise ValueError("fvu is undefined: x has zero variance")
        rates = self.fired.double() / self.n
        out = {"fvu": self.sq_error / total, "mse": self.sq_error / (self.n * self.mean.numel()),
               "l0": self.nonzeros / self.n, "dead": float((self.fired == 0).double().mean()),
               "dense": float((rates > self.dense_threshold).double().mean())}
        if self.objective_sum is not None:
            out["objective"] = self.objective_sum / self.n
        return out


__all__ = ["MetricAccumulator", "mse", "fvu", "nmse_db", "mean_l0", "support_scores", "exact_support_rate",
           "code_mcc", "dictionary_mcc", "lasso_objective", "relative_gap", "excess_objective", "binary_entropy_bits",
           "code_entropy", "firing_rates", "dead_fraction", "dense_fraction"]
