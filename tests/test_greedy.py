"""MP and OMP: same supports as scikit-learn and SPAMS, monotone residuals, tolerance stops."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

import sparsecode as sc


def _support(codes):
    return [set(np.flatnonzero(row)) for row in np.asarray(codes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_omp_matches_sklearn_gram_omp(incoherent, dtype):
    D = incoherent.dictionary.atoms.double().numpy()
    x = incoherent.x.double().numpy()
    ref = orthogonal_mp_gram(D @ D.T, D @ x.T, n_nonzero_coefs=5).T
    ours = sc.get_encoder("omp", k=5).fit(incoherent.dictionary.to(dtype=dtype)).encode(incoherent.x.to(dtype))
    assert _support(ours.numpy()) == _support(ref)
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=1e-4 if dtype == torch.float32 else 1e-10)


def test_omp_matches_spams_and_recovers_the_truth(incoherent):
    spams_codes = sc.get_encoder("spams-omp", k=5).fit(incoherent.dictionary).encode(incoherent.x)
    ours = sc.get_encoder("omp", k=5).fit(incoherent.dictionary).encode(incoherent.x)
    assert _support(ours.numpy()) == _support(spams_codes.numpy())
    assert _support(ours.numpy()) == _support(incoherent.codes.numpy())
    torch.testing.assert_close(ours, spams_codes, atol=1e-8, rtol=1e-6)


def test_omp_on_a_coherent_overcomplete_dictionary_matches_sklearn():
    data = sc.synthetic.make_sparse_data(n_samples=200, d=16, n_atoms=64, k=4, seed=9, dtype=torch.float64,
                                         noise=0.05)
    D, x = data.dictionary.atoms.numpy(), data.x.numpy()
    ref = orthogonal_mp_gram(D @ D.T, D @ x.T, n_nonzero_coefs=6).T
    ours = sc.get_encoder("omp", k=6).fit(data.dictionary).encode(data.x)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-9)


@pytest.mark.parametrize("name", ["mp", "omp"])
def test_residual_decreases_monotonically(small, name):
    norms = []
    for k in range(1, 9):
        codes = sc.get_encoder(name, k=k).fit(small.dictionary).encode(small.x)
        norms.append((small.x - codes @ small.dictionary.atoms).norm(dim=1))
    norms = torch.stack(norms)
    assert torch.all(norms[1:] <= norms[:-1] + 1e-10)
    assert torch.all(norms[-1] < norms[0])


def test_omp_residual_is_orthogonal_to_selected_atoms():
    noisy = sc.synthetic.make_sparse_data(n_samples=64, d=16, n_atoms=32, k=3, seed=1, dtype=torch.float64,
                                          noise=0.05)
    codes = sc.get_encoder("omp", k=4).fit(noisy.dictionary).encode(noisy.x)
    r = noisy.x - codes @ noisy.dictionary.atoms
    corr = r @ noisy.dictionary.atoms.T
    assert float(corr[codes != 0].abs().max()) < 1e-10
    assert torch.all((codes != 0).sum(1) == 4)


def test_mp_coefficients_hand_example():
    atoms = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    codes = sc.get_encoder("mp", k=2).fit(atoms).encode(x)
    # step 1: correlations (1, 1.4) -> atom 1, coef 1.4, residual (0.16, -0.12)
    # step 2: correlations (0.16, 0) -> atom 0, coef 0.16
    torch.testing.assert_close(codes, torch.tensor([[0.16, 1.4]], dtype=torch.float64))


@pytest.mark.parametrize("name", ["mp", "omp"])
def test_tolerance_stops_early(incoherent, name):
    enc = sc.get_encoder(name, k=20, tol=0.2).fit(incoherent.dictionary)
    codes = enc.encode(incoherent.x)
    residual = (incoherent.x - codes @ incoherent.dictionary.atoms).norm(dim=1)
    assert torch.all(residual <= 0.2 * incoherent.x.norm(dim=1) + 1e-12)
    l0 = (codes != 0).sum(1)
    assert float(l0.double().mean()) < 5 and int(l0.max()) <= 20
    # one atom fewer would have left the residual above the tolerance (the stop is not late)
    if name == "omp":
        for i in range(10):
            k_i = int(l0[i])
            if k_i > 1:
                c = sc.get_encoder(name, k=k_i - 1).fit(incoherent.dictionary).encode(incoherent.x[i:i + 1])
                r = (incoherent.x[i] - c[0] @ incoherent.dictionary.atoms).norm()
                assert r > 0.2 * incoherent.x[i].norm()


def test_omp_tolerance_matches_sklearn(incoherent):
    D, x = incoherent.dictionary.atoms.numpy(), incoherent.x.numpy()
    tol = 0.3
    ours = sc.get_encoder("omp", k=30, tol=tol).fit(incoherent.dictionary).encode(incoherent.x)
    for i in range(10):
        ref = orthogonal_mp_gram(D @ D.T, D @ x[i], n_nonzero_coefs=30, tol=(tol * np.linalg.norm(x[i])) ** 2,
                                 norms_squared=np.array([x[i] @ x[i]]))
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-9)


def test_non_unit_atoms_select_by_normalised_correlation(incoherent):
    scales = torch.linspace(0.2, 5.0, 64, dtype=torch.float64)
    scaled = sc.Dictionary(incoherent.dictionary.atoms * scales[:, None])
    ours = sc.get_encoder("omp", k=5).fit(scaled).encode(incoherent.x)
    unit = sc.get_encoder("omp", k=5).fit(incoherent.dictionary).encode(incoherent.x)
    torch.testing.assert_close(ours * scales, unit)
    spams_codes = sc.get_encoder("spams-omp", k=5).fit(scaled).encode(incoherent.x)
    torch.testing.assert_close(spams_codes, ours, atol=1e-8, rtol=1e-6)


def test_exact_sparse_signal_stops_cleanly():
    atoms = torch.eye(6, dtype=torch.float64)
    x = torch.tensor([[2.0, 0, 0, -1.0, 0, 0]], dtype=torch.float64)
    codes = sc.get_encoder("omp", k=4).fit(atoms).encode(x)
    torch.testing.assert_close(codes, x)


def test_k_limits():
    with pytest.raises(ValueError, match="k=9 is larger than d=8"):
        sc.get_encoder("omp", k=9).fit(torch.randn(16, 8))
    with pytest.raises(ValueError, match="k=17 is larger than the dictionary's n_atoms=16"):
        sc.get_encoder("mp", k=17).fit(torch.randn(16, 8))
    with pytest.raises(ValueError, match="k must be >= 1"):
        sc.get_encoder("omp", k=0)


@pytest.mark.parametrize("n_atoms", [1024, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_pick_is_the_first_atom_of_largest_magnitude(n_atoms, dtype):
    # the CPU's blocked search (blocks of 64 atoms, 128 from 8,192) must equal a plain argmax of |alpha|,
    # ties included: numpy's argmax returns the first index
    from encoders.greedy import _pick, _selection_scale
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(6, n_atoms, generator=g, dtype=dtype)
    alpha[0, [700, 100]] = 9.0                  # a tie across blocks: the earlier block wins
    alpha[1, [130, 129]] = -9.0                 # a tie within a block, negative
    alpha[2, [5, n_atoms - 1]] = torch.tensor([8.0, -9.0], dtype=dtype)   # the last atom
    alpha[3, :] = 1.0                           # all equal: the first
    for scale_diag in (torch.ones(n_atoms, dtype=dtype), torch.rand(n_atoms, generator=g, dtype=dtype) + 0.5):
        scale = _selection_scale(scale_diag)
        got = _pick(alpha, scale, torch.empty_like(alpha))
        score = alpha.abs() if scale is None else alpha.abs() * scale
        assert got.tolist() == np.argmax(score.numpy(), axis=1).tolist()
    assert _pick(alpha, None, torch.empty_like(alpha))[:4].tolist() == [100, 129, n_atoms - 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_omp_on_a_thousand_coherent_atoms_matches_sklearn_in_both_variants(dtype):
    # 1,024 atoms in 48 dimensions: the sizes where the Gram variant's sparse row products and the
    # blocked pick run, on a coherent dictionary where a wrong update changes later picks
    data = sc.synthetic.make_sparse_data(n_samples=150, d=48, n_atoms=1024, k=6, seed=4, dtype=torch.float64,
                                         noise=0.02)
    D, x = data.dictionary.atoms.numpy(), data.x.numpy()
    ref = orthogonal_mp_gram(D @ D.T, D @ x.T, n_nonzero_coefs=8).T
    dictionary = data.dictionary.to(dtype=dtype)
    for variant in ("gram", "gram-free"):
        ours = sc.get_encoder("omp", k=8, variant=variant, precision="full").fit(dictionary).encode(data.x.to(dtype))
        assert _support(ours.numpy()) == _support(ref), variant
        np.testing.assert_allclose(ours.double().numpy(), ref, atol=2e-4 if dtype == torch.float32 else 1e-9,
                                   err_msg=variant)
