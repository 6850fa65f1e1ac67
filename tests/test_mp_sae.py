"""MP-SAE: the training pursuit is the `mp` encoder's, and learning with it recovers a planted dictionary."""
import pytest
import torch

import sparsecode as sc
from sparsecode_encoders.mp_sae import pursuit


def test_training_pursuit_is_the_mp_encoder():
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(40, 12, generator=g, dtype=torch.float64), dim=1)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    codes, r = pursuit(x, atoms, 5)
    assert torch.allclose(codes, sc.get_encoder("mp", k=5).fit(atoms).encode(x), atol=1e-12)
    assert torch.allclose(codes @ atoms + r, x, atol=1e-12)
    # each step removes the projection on the chosen atom: the residual is orthogonal to the last one
    _, r1 = pursuit(x, atoms, 1)
    last = (x @ atoms.T).abs().argmax(1)
    assert torch.allclose((r1 * atoms[last]).sum(1), torch.zeros(30, dtype=torch.float64), atol=1e-12)


def test_gradients_reach_the_atoms_through_the_coefficients():
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    _, r = pursuit(x, atoms, 1)                 # picks atom 0: r = x - (x . a0) a0
    (r * r).sum().backward()
    # f(a) = ||r||^2 with r = x - c a, c = x.a: df/da = -2 (r.a) x - 2 c r; at a = e1, c = 3, r = (0, 1)
    c, r0, a = 3.0, torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(atoms.grad[0], -2 * float(r0 @ a) * x[0] - 2 * c * r0)
    assert torch.equal(atoms.grad[1], torch.zeros(2, dtype=torch.float64))


@pytest.fixture(scope="module")
def planted():
    data = sc.synthetic.make_sparse_data(n_samples=768, d=16, n_atoms=24, k=2, seed=0)
    return data.split(512)


def test_learning_a_dictionary_with_matching_pursuit(planted):
    train, test = planted
    learned = sc.learn_dictionary(train.x, method="mp-sae", n_atoms=24, k=2, steps=250, lr=3e-3)
    D = learned.dictionary
    assert torch.allclose(D.atoms.norm(dim=1), torch.ones(24), atol=1e-5)
    assert learned.losses[-1] < 0.6 * learned.losses[0]
    z = learned.encoder.encode(test.x)
    assert sc.metrics.mean_l0(z) <= 2
    assert sc.metrics.fvu(test.x, D.decode(z)) < 0.15
    assert torch.equal(z, sc.get_encoder("mp-sae", k=2).fit(D).encode(test.x))
    assert sc.metrics.dictionary_mcc(train.dictionary.atoms, D.atoms) > 0.6


def test_on_a_shared_dictionary_it_is_matching_pursuit(planted):
    train, test = planted
    enc = sc.get_encoder("mp-sae", k=3, distinct=False).fit(train.dictionary)
    assert not enc.trainable
    assert torch.equal(enc.encode(test.x), sc.get_encoder("mp", k=3).fit(train.dictionary).encode(test.x))


def _pursuit_until_distinct(x, atoms, k, max_steps):
    """Matching pursuit on one signal, step by step, until k different atoms are active (the reference)."""
    codes, steps = torch.zeros(atoms.shape[0], dtype=x.dtype), 0
    while int((codes != 0).sum()) < k and steps < max_steps:
        step, _ = pursuit((x - codes @ atoms)[None], atoms, 1)
        codes, steps = codes + step[0], steps + 1
    return codes, steps


def test_encoding_reaches_k_distinct_atoms_where_matching_pursuit_picks_one_twice():
    # coherent atoms (pairs 0.9 apart): k steps of matching pursuit often pick an atom twice
    g = torch.Generator().manual_seed(1)
    base = torch.randn(10, 8, generator=g, dtype=torch.float64)
    atoms = torch.nn.functional.normalize(torch.cat([base, base + 0.3 * torch.randn(10, 8, generator=g,
                                                                                     dtype=torch.float64)]), dim=1)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    k = 5
    plain = sc.get_encoder("mp", k=k).fit(atoms).encode(x)
    assert sc.metrics.mean_l0(plain) < k - 0.2                      # the problem the option solves
    info = sc.get_encoder("mp-sae", k=k).fit(atoms).encode_with_info(x)
    assert torch.equal((info.codes != 0).sum(1), torch.full((200,), k))
    total = 0
    for i in range(len(x)):
        ref, steps = _pursuit_until_distinct(x[i], atoms, k, 4 * k)
        assert torch.allclose(info.codes[i], ref, atol=1e-10)
        total += steps
    assert info.n_iter == pytest.approx(total / len(x))
    assert info.n_iter > k


def test_what_it_learns_is_a_dictionary_saved_as_one(planted, tmp_path):
    # the encoder has no weights of its own (it is the pursuit on its dictionary): the dictionary is
    # what a run keeps, and mp-sae on the reloaded dictionary encodes exactly as the learned encoder
    train, test = planted
    learned = sc.learn_dictionary(train.x, method="mp-sae", n_atoms=24, k=2, steps=5)
    again = sc.Dictionary.load(learned.dictionary.save(tmp_path / "mp-sae-dictionary"))
    assert torch.equal(sc.get_encoder("mp-sae", k=2).fit(again).encode(test.x), learned.encoder.encode(test.x))
    with pytest.raises(TypeError, match="not trained"):
        learned.encoder.save(tmp_path / "mp-sae")


def test_bad_use_rejected(planted):
    train, _ = planted
    with pytest.raises(ValueError, match="cannot learn a transcoder"):
        sc.get_encoder("mp-sae", k=2).learn(train.x, 8, y=train.x)
    with pytest.raises(ValueError, match="k=9 is larger than n_atoms=8"):
        sc.get_encoder("mp-sae", k=9).learn(train.x, 8)
    with pytest.raises(RuntimeError, match="not fitted"):
        sc.get_encoder("mp-sae").encode(train.x)
    assert "mp-sae" in sc.learning_methods()
