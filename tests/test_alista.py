"""ALISTA: the analytic weight against its optimality conditions; training learns steps and thresholds only."""
import pytest
import torch

import sparsecode as sc
from sparsecode_encoders.lista import _spectral_norm, analytic_weight


def _off_diagonal(b):
    return float(((b - torch.diag(b.diagonal())) ** 2).sum())


@pytest.mark.parametrize("shape", [(24, 8), (8, 8), (6, 10)])
def test_analytic_weight_solves_the_coherence_problem(shape):
    atoms = torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64,
                                                      generator=torch.Generator().manual_seed(0)), dim=1)
    W = analytic_weight(atoms)
    # feasible: w_i . d_i = 1
    assert torch.allclose((W * atoms).sum(1), torch.ones(shape[0], dtype=torch.float64))
    # optimal (a convex problem: the KKT conditions suffice): the gradient 2 M w_i of sum_j (w_i . d_j)^2
    # is a multiple of the constraint's gradient d_i
    grad = W @ (atoms.T @ atoms)
    coef = (grad * atoms).sum(1, keepdim=True)
    assert torch.allclose(grad, coef * atoms, atol=1e-10)
    # and so no feasible perturbation (orthogonal to d_i) lowers the coherence
    base = _off_diagonal(W @ atoms.T)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        delta = torch.randn(*shape, dtype=torch.float64, generator=g)
        delta -= (delta * atoms).sum(1, keepdim=True) * atoms
        assert _off_diagonal((W + 1e-3 * delta) @ atoms.T) > base
    assert base <= _off_diagonal(atoms @ atoms.T) + 1e-12


def test_spectral_norm_by_power_iteration():
    atoms = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    W = analytic_weight(atoms)
    assert _spectral_norm(atoms, W) == pytest.approx(float(torch.linalg.matrix_norm(W @ atoms.T, 2)), rel=1e-6)


def test_zero_atom_is_refused():
    atoms = torch.randn(5, 4, dtype=torch.float64)
    atoms[3] = 0
    with pytest.raises(ValueError, match="alista needs non-zero atoms: atom 3 is zero"):
        analytic_weight(atoms)


@pytest.fixture(scope="module")
def planted():
    data = sc.synthetic.make_sparse_data(n_samples=256, d=16, n_atoms=32, k=2, seed=0, dtype=torch.float64)
    return data.split(128)


def test_training_learns_only_steps_and_thresholds(planted):
    train, test = planted
    errors = {}
    for steps in (1, 80):
        enc = sc.get_encoder("alista", unroll=6, steps=steps, lr=1e-2, lam=0.05, target="codes")
        enc.fit(train.dictionary, train.x, codes=train.codes)
        z = enc.encode(test.x)
        errors[steps] = float(((z - test.codes) ** 2).sum() / (test.codes ** 2).sum())
    learned = {name: p.numel() for name, p in enc.net.named_parameters() if p.requires_grad}
    assert learned == {"gamma": 6, "theta": 6}
    assert torch.equal(enc.net.weight, analytic_weight(train.dictionary.atoms))
    assert errors[80] < 0.5 * errors[1]


def test_one_step_by_hand():
    """With one unrolled step the code is soft(gamma x W^T, theta), gamma = 1 / ||W D^T||_2, theta = lam gamma."""
    D = sc.Dictionary(torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)),
                      normalize=True)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    enc = sc.get_encoder("alista", unroll=1, steps=1, lr=1e-12, lam=0.1).fit(D, x)
    W = analytic_weight(D.atoms)
    gamma = 1 / float(torch.linalg.matrix_norm(W @ D.atoms.T, 2))
    v = gamma * x @ W.T
    assert torch.allclose(enc.encode(x), torch.sign(v) * torch.clamp_min(v.abs() - 0.1 * gamma, 0), atol=1e-8)


def test_it_does_not_learn_a_dictionary():
    assert "alista" not in sc.learning_methods() and "lista" not in sc.learning_methods()
    with pytest.raises(ValueError, match="alista learns to infer codes for a given dictionary"):
        sc.get_encoder("alista").learn(torch.randn(10, 4), 6)


def test_save_and_load_round_trip(planted, tmp_path):
    train, test = planted
    enc = sc.get_encoder("alista", unroll=3, steps=5).fit(train.dictionary, train.x)
    again = sc.load_encoder(enc.save(tmp_path / "alista"))
    assert torch.equal(again.encode(test.x), enc.encode(test.x))
