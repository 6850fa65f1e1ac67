"""ADMM, coordinate descent and LCA against the exact lasso optimum (cvxpy + Clarabel)."""
import pytest
import torch

import sparsecode as sc
from sparsecode import metrics

SOLVERS = ["admm", "cd", "lca"]


def _objective(x, codes, atoms, lam):
    return metrics.lasso_objective(x, codes, atoms, lam)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("lam", [0.02, 0.2])
def test_reaches_cvxpy_optimum(lasso_problem, cvxpy_optimum, name, positive, lam):
    enc = sc.get_encoder(name, lam=lam, positive=positive, tol=1e-6, max_iter=50000).fit(lasso_problem.dictionary)
    info = enc.encode_with_info(lasso_problem.x)
    assert info.uncertified == 0
    ref = cvxpy_optimum(lam, positive)
    gap = (_objective(lasso_problem.x, info.codes, lasso_problem.dictionary.atoms, lam) - ref) / ref
    assert float(gap.max()) < 1e-4
    assert float(gap.min()) > -1e-6          # nobody beats the exact optimum
    if positive:
        assert torch.all(info.codes >= 0)
    # the same support as the exact solver's, up to coefficients too small to matter
    fista = sc.get_encoder("fista", lam=lam, positive=positive, tol=1e-10).fit(lasso_problem.dictionary).encode(lasso_problem.x)
    big = fista.abs() > 1e-4
    assert torch.equal(info.codes[big] != 0, torch.ones_like(info.codes[big], dtype=torch.bool))


@pytest.mark.parametrize("name", SOLVERS)
def test_gap_certificate_holds(lasso_problem, name):
    from sparsecode_encoders.iterative import duality_gap
    lam = 0.1
    enc = sc.get_encoder(name, lam=lam, tol=1e-6, max_iter=50000).fit(lasso_problem.dictionary)
    codes = enc.encode(lasso_problem.x)
    assert float(duality_gap(lasso_problem.x, codes, lasso_problem.dictionary.atoms, lam).max()) <= 1e-6


def test_gram_free_paths_match_the_gram_ones():
    """A dictionary wider than 2 d takes the Woodbury (ADMM) and two-product (LCA) forms."""
    data = sc.synthetic.make_sparse_data(n_samples=10, d=8, n_atoms=40, k=2, noise=0.02, seed=7, dtype=torch.float64)
    lam = 0.05
    ref = _objective(data.x, sc.get_encoder("cvxpy-lasso", lam=lam).fit(data.dictionary).encode(data.x),
                     data.dictionary.atoms, lam)
    for name in SOLVERS:
        codes = sc.get_encoder(name, lam=lam, tol=1e-6, max_iter=50000).fit(data.dictionary).encode(data.x)
        gap = (_objective(data.x, codes, data.dictionary.atoms, lam) - ref) / ref
        assert float(gap.abs().max()) < 1e-4, name


def test_non_unit_atoms_and_bias():
    data = sc.synthetic.make_sparse_data(n_samples=8, d=12, n_atoms=20, k=2, seed=6, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    D = sc.Dictionary(data.dictionary.atoms * scales[:, None], bias=bias)
    lam = 0.05
    ref = sc.get_encoder("cvxpy-lasso", lam=lam).fit(sc.Dictionary(D.atoms)).encode(data.x)
    r = metrics.lasso_objective(data.x + bias, ref, D.atoms, lam, bias)
    for name in SOLVERS:
        ours = sc.get_encoder(name, lam=lam, tol=1e-6, max_iter=50000).fit(D).encode(data.x + bias)
        o = metrics.lasso_objective(data.x + bias, ours, D.atoms, lam, bias)
        assert float(((o - r) / r).max()) < 1e-4, name


def test_lca_fixed_point_is_the_membrane_equation(lasso_problem):
    """At convergence u = b - (G - I) a with a = soft(u, lam): the published dynamics' fixed point."""
    from sparsecode_encoders.iterative import soft_threshold
    lam = 0.1
    enc = sc.get_encoder("lca", lam=lam, tol=1e-10, max_iter=100000).fit(lasso_problem.dictionary)
    a = enc.encode(lasso_problem.x)
    atoms = lasso_problem.dictionary.atoms
    G = atoms @ atoms.T
    u = lasso_problem.x @ atoms.T - a @ (G - torch.eye(32, dtype=torch.float64))
    assert torch.allclose(soft_threshold(u, lam, False), a, atol=1e-5)


def test_lca_one_euler_step_by_hand():
    """One step from rest with step eta: u = eta b, a = soft(eta b, lam)."""
    D = sc.Dictionary(torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64))
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    enc = sc.get_encoder("lca", lam=0.1, step=0.5, max_iter=1, tol=1e-12).fit(D)
    b = torch.tensor([2.0, 2.0], dtype=torch.float64)     # x D^T
    assert torch.allclose(enc.encode(x)[0], torch.clamp_min(0.5 * b - 0.1, 0))


def test_cd_one_sweep_by_hand():
    """One sweep: each coordinate minimised exactly given the others, in order."""
    D = sc.Dictionary(torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64))
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    lam = 0.1
    z0 = 2.0 - lam                         # d_0 . x = 2, minus lam
    r = torch.tensor([2.0 - z0, 1.0], dtype=torch.float64)
    z1 = float(r @ torch.tensor([0.6, 0.8], dtype=torch.float64)) - lam
    codes = sc.get_encoder("cd", lam=lam, max_iter=1, tol=1e-12).fit(D).encode(x)
    assert torch.allclose(codes[0], torch.tensor([z0, z1], dtype=torch.float64))


def test_a_small_budget_is_reported(lasso_problem, caplog):
    enc = sc.get_encoder("admm", lam=0.01, max_iter=3).fit(lasso_problem.dictionary)
    with caplog.at_level("WARNING", logger="encoders.lasso"):
        info = enc.encode_with_info(lasso_problem.x)
    assert info.uncertified == 12 and info.n_iter == 3
    assert "admm: 12 of 12 signals reached max_iter=3" in caplog.text


def test_float32_reaches_a_loose_tolerance(lasso_problem, cvxpy_optimum):
    x, D = lasso_problem.x.float(), lasso_problem.dictionary.to(dtype=torch.float32)
    for name in SOLVERS:
        info = sc.get_encoder(name, lam=0.2, tol=1e-4).fit(D).encode_with_info(x)
        assert info.uncertified == 0, name
        gap = (_objective(lasso_problem.x, info.codes.double(), lasso_problem.dictionary.atoms, 0.2) - cvxpy_optimum(0.2, False))
        assert float((gap / cvxpy_optimum(0.2, False)).max()) < 1e-3, name


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="rho must be > 0, got 0"):
        sc.get_encoder("admm", rho=0.0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        sc.get_encoder("lca", step=-1.0)
    with pytest.raises(ValueError, match="lam must be >= 0, got -0.1"):
        sc.get_encoder("cd", lam=-0.1)
    with pytest.raises(FloatingPointError, match="lca diverged: step=10 is above 2/L"):
        D = sc.Dictionary(torch.eye(4, dtype=torch.float64)[:3] + 0.1, normalize=True)
        sc.get_encoder("lca", step=10.0, lam=0.01).fit(D).encode(torch.ones(2, 4, dtype=torch.float64))


def test_they_are_lasso_solvers():
    for name in SOLVERS:
        cls = sc.encoder_class(name)
        assert cls.solves_lasso and cls.knob == "lam" and cls.family == "lasso"


@pytest.mark.parametrize("name", ["admm", "cd", "lca"])
def test_an_iteration_budget_runs_exactly_that_many_iterations(name):
    data = sc.synthetic.make_sparse_data(n_samples=8, d=16, n_atoms=32, k=3, seed=0)
    cls = sc.encoder_class(name)
    info = sc.get_encoder(name, lam=0.05, **cls.budget_params(7)).fit(data.dictionary).encode_with_info(data.x)
    assert info.n_iter == 7
