import pytest
import torch

import sparsecode as sc


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def small():
    """A small planted problem: 32 atoms in 16 dimensions, 3 non-zeros, float64."""
    return sc.synthetic.make_sparse_data(n_samples=64, d=16, n_atoms=32, k=3, seed=1, dtype=torch.float64)


@pytest.fixture
def incoherent():
    """Incoherent dictionary (64 atoms in 128 dimensions), noiseless: greedy recovery is exact."""
    return sc.synthetic.make_sparse_data(n_samples=128, d=128, n_atoms=64, k=5, seed=2, dtype=torch.float64)


@pytest.fixture
def coherent():
    """Overcomplete and noisy, so later picks are close calls: 96 atoms in 24 dimensions."""
    return sc.synthetic.make_sparse_data(n_samples=150, d=24, n_atoms=96, k=4, seed=5, dtype=torch.float64,
                                         noise=0.05)


@pytest.fixture(scope="module")
def lasso_problem():
    """A small signed lasso problem (float64) on which every lasso solver is checked against cvxpy."""
    return sc.synthetic.make_sparse_data(n_samples=12, d=16, n_atoms=32, k=3, noise=0.05, positive=False,
                                         seed=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def cvxpy_optimum(lasso_problem):
    """optimum(lam, positive): the per-signal lasso objective at cvxpy's (Clarabel's) solution."""
    from sparsecode import metrics
    cache = {}

    def get(lam, positive):
        if (lam, positive) not in cache:
            enc = sc.get_encoder("cvxpy-lasso", lam=lam, positive=positive).fit(lasso_problem.dictionary)
            codes = enc.encode(lasso_problem.x)
            cache[lam, positive] = metrics.lasso_objective(lasso_problem.x, codes, lasso_problem.dictionary.atoms, lam)
        return cache[lam, positive]
    return get
