import pytest
import torch

import sparsecode as sc


def test_paper_c_generator_exact_k_positive_unit_atoms():
    data = sc.synthetic.make_sparse_data(seed=3)
    assert data.x.shape == (1024, 8) and data.codes.shape == (1024, 16)
    assert torch.all((data.codes != 0).sum(1) == 3)
    assert torch.all(data.codes >= 0)
    torch.testing.assert_close(data.dictionary.norms, torch.ones(16))
    torch.testing.assert_close(data.x, data.codes @ data.dictionary.atoms, rtol=1e-5, atol=1e-6)


def test_seed_reproducible_and_different_seeds_differ():
    a = sc.synthetic.make_sparse_data(n_samples=50, seed=7)
    b = sc.synthetic.make_sparse_data(n_samples=50, seed=7)
    c = sc.synthetic.make_sparse_data(n_samples=50, seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.codes, b.codes)
    assert not torch.equal(a.x, c.x)


def test_snr_sets_noise_level():
    clean = sc.synthetic.make_sparse_data(n_samples=4000, d=32, n_atoms=64, k=4, seed=1, dtype=torch.float64)
    noisy = sc.synthetic.make_sparse_data(n_samples=4000, d=32, n_atoms=64, k=4, seed=1, snr_db=10,
                                          dtype=torch.float64)
    noise = noisy.x - clean.x
    snr = 10 * torch.log10((clean.x ** 2).mean() / (noise ** 2).mean())
    assert float(snr) == pytest.approx(10, abs=0.2)
    assert noisy.noise == pytest.approx(float(((clean.x ** 2).mean() / 10).sqrt()))


def test_power_law_firing_is_skewed():
    data = sc.synthetic.make_sparse_data(n_samples=4000, d=16, n_atoms=64, k=2, firing="power-law",
                                         power_law=1.5, seed=0)
    rates = (data.codes != 0).float().mean(0)
    assert rates[0] > 5 * rates[-10:].mean()
    assert torch.all((data.codes != 0).sum(1) == 2)


def test_signed_values_and_split():
    data = sc.synthetic.make_sparse_data(n_samples=100, positive=False, seed=0)
    assert (data.codes < 0).any()
    train, test = data.split(60)
    assert train.n_samples == 60 and test.n_samples == 40
    assert torch.equal(test.x, data.x[60:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=20), "k must be between 1 and 16"),
    (dict(noise=-1.0), "noise must be >= 0"),
    (dict(noise=0.1, snr_db=10.0), "either noise"),
    (dict(firing="zipf"), "firing must be"),
    (dict(n_samples=0), "n_samples must be >= 1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sc.synthetic.make_sparse_data(**kwargs)
