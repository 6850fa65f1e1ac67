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
