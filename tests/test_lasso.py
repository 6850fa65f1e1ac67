"""ISTA/FISTA against the exact lasso optimum (cvxpy + Clarabel) and the C++/scikit-learn solvers."""
import numpy as np
import pytest
import torch

import sparsecode as sc
from sparsecode import metrics

SOLVERS = ["ista", "fista"]


def _objective(data, codes, lam):
    return metrics.lasso_objective(data.x, codes, data.dictionary.atoms, lam)


@pytest.fixture(scope="module")
def problem():
    data = sc.synthetic.make_sparse_data(n_samples=12, d=16, n_atoms=32, k=3, noise=0.05, positive=False,
                                         seed=4, dtype=torch.float64)
    return data


@pytest.fixture(scope="module")
def optimum(problem):
    """cvxpy optima for each (lam, positive)."""
    cache = {}

    def get(lam, positive):
        if (lam, positive) not in cache:
            enc = sc.get_encoder("cvxpy-lasso", lam=lam, positive=positive).fit(problem.dictionary)
            cache[lam, positive] = _objective(problem, enc.encode(problem.x), lam)
        return cache[lam, positive]
    return get


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("lam", [0.02, 0.2])
@pytest.mark.parametrize("working_set", [0, 8])
def test_reaches_cvxpy_optimum(problem, optimum, name, positive, lam, working_set):
    enc = sc.get_encoder(name, lam=lam, positive=positive, tol=1e-8, max_iter=20000,
                         working_set=working_set).fit(problem.dictionary)
    codes = enc.encode(problem.x)
    ref = optimum(lam, positive)
    gap = (_objective(problem, codes, lam) - ref) / ref
    assert float(gap.max()) < 1e-4
    assert float(gap.min()) > -1e-6          # nobody beats the exact optimum
    if positive:
        assert torch.all(codes >= 0)


@pytest.mark.parametrize("name", SOLVERS)
def test_gap_criterion_certifies(problem, name):
    lam = 0.1
    enc = sc.get_encoder(name, lam=lam, tol=1e-6, criterion="gap", max_iter=20000).fit(problem.dictionary)
    codes = enc.encode(problem.x)
    from encoders.iterative import duality_gap
    gaps = duality_gap(problem.x, codes, problem.dictionary.atoms, lam)
    assert float(gaps.max()) <= 1e-6


def test_fista_needs_fewer_iterations_than_ista(problem):
    counts = {}
    for name in SOLVERS:
        enc = sc.get_encoder(name, lam=0.05, tol=1e-7, max_iter=20000, working_set=0).fit(problem.dictionary)
        enc.encode(problem.x)
        counts[name] = enc.n_iter_
    assert counts["fista"] < counts["ista"]


@pytest.mark.parametrize("reference", ["spams-lasso", "sklearn-lasso"])
@pytest.mark.parametrize("positive", [False, True])
def test_references_solve_the_same_problem(problem, optimum, reference, positive):
    lam = 0.1
    enc = sc.get_encoder(reference, lam=lam, positive=positive).fit(problem.dictionary)
    gap = (_objective(problem, enc.encode(problem.x), lam) - optimum(lam, positive)) / optimum(lam, positive)
    assert float(gap.abs().max()) < 1e-4


def test_sklearn_cd_matches_too(problem, optimum):
    enc = sc.get_encoder("sklearn-lasso", lam=0.1, algorithm="cd", max_iter=10000).fit(problem.dictionary)
    gap = (_objective(problem, enc.encode(problem.x), 0.1) - optimum(0.1, False)) / optimum(0.1, False)
    assert float(gap.abs().max()) < 1e-3


def test_large_lam_gives_zero_codes(problem):
    lam_max = float((problem.x @ problem.dictionary.atoms.T).abs().max())
    codes = sc.get_encoder("fista", lam=lam_max * 1.01).fit(problem.dictionary).encode(problem.x)
    assert torch.count_nonzero(codes) == 0


def test_working_set_matches_full_iterations_on_a_large_dictionary():
    data = sc.synthetic.make_sparse_data(n_samples=200, d=64, n_atoms=512, k=6, seed=5, dtype=torch.float64)
    full = sc.get_encoder("fista", lam=0.05, working_set=0, tol=1e-9).fit(data.dictionary).encode(data.x)
    ws = sc.get_encoder("fista", lam=0.05, working_set=16, tol=1e-9).fit(data.dictionary).encode(data.x)
    o_full, o_ws = _objective(data, full, 0.05), _objective(data, ws, 0.05)
    assert float(((o_ws - o_full) / o_full).abs().max()) < 1e-6
    assert torch.equal(full != 0, ws != 0)


def test_non_unit_dictionary_and_bias_are_handled():
    data = sc.synthetic.make_sparse_data(n_samples=10, d=12, n_atoms=20, k=2, seed=6, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    D = sc.Dictionary(data.dictionary.atoms * scales[:, None], bias=bias)
    x = data.x + bias
    lam = 0.05
    ours = sc.get_encoder("fista", lam=lam, tol=1e-9).fit(D).encode(x)
    ref = sc.get_encoder("cvxpy-lasso", lam=lam).fit(sc.Dictionary(D.atoms)).encode(data.x)
    o = metrics.lasso_objective(x, ours, D.atoms, lam, bias)
    r = metrics.lasso_objective(x, ref, D.atoms, lam, bias)
    assert float(((o - r) / r).max()) < 1e-4


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="lam must be >= 0, got -0.1"):
        sc.get_encoder("fista", lam=-0.1)
    with pytest.raises(ValueError, match="criterion must be 'change' or 'gap'"):
        sc.get_encoder("ista", criterion="never")
    with pytest.raises(TypeError, match="no option 'lamda'.*Did you mean 'lam'"):
        sc.get_encoder("fista", lamda=0.1)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        sc.get_encoder("fista", max_iter=0)
