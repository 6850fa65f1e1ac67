"""Trained encoders, binary estimators, penalties, Signum and dictionary learning."""
import math

import pytest
import torch

import sparsecode as sc
from sparsecode.metrics import binary_entropy_bits
from sparsecode_encoders.binary import covariance_penalty, entropy_penalty


@pytest.fixture(scope="module")
def planted():
    data = sc.synthetic.make_sparse_data(n_samples=2048, d=8, n_atoms=16, k=3, seed=0)
    return data.split(1024)


def _mcc(test, enc):
    return sc.metrics.code_mcc(test.codes, enc.encode(test.x))


def test_known_d_ordering(planted):
    train, test = planted
    D = train.dictionary
    gen = torch.Generator().manual_seed(0)
    random_codes = torch.relu(test.x @ torch.randn(16, 8, generator=gen).T)
    random_mcc = sc.metrics.code_mcc(test.codes, random_codes)
    relu = sc.get_encoder("relu", steps=1500, lr=3e-3).fit(D, train.x)
    topk = sc.get_encoder("topk", k=3, steps=1500, lr=3e-3).fit(D, train.x)
    ito = sc.get_encoder("ito").fit(D)
    fista = sc.get_encoder("fista", lam=0.01, positive=True).fit(D)
    m = {name: _mcc(test, enc) for name, enc in [("relu", relu), ("topk", topk), ("ito", ito), ("fista", fista)]}
    assert m["relu"] > random_mcc + 0.1 and m["topk"] > random_mcc + 0.1
    assert m["ito"] > m["relu"] and m["fista"] > m["relu"]
    assert relu.losses[-1] < relu.losses[0]


def test_uniform_init_is_torch_linear_default_and_dictionary_init_is_the_atoms(planted):
    train, _ = planted
    D = train.dictionary
    # one Adam step at a negligible rate leaves the weights where they started
    start = dict(steps=1, lr=1e-12, seed=7)
    paper = sc.get_encoder("relu", weight_init="uniform", bias=True, **start).fit(D, train.x)
    torch.manual_seed(7)
    reference = torch.nn.Linear(8, 16)          # paper c's code: the encoder is a default nn.Linear
    torch.testing.assert_close(paper.net.weight.detach(), reference.weight.detach(), atol=1e-8, rtol=0)
    torch.testing.assert_close(paper.net.bias.detach(), reference.bias.detach(), atol=1e-8, rtol=0)
    ours = sc.get_encoder("relu", **start).fit(D, train.x)
    torch.testing.assert_close(ours.net.weight.detach(), D.atoms, atol=1e-8, rtol=0)
    assert ours.net.bias is None


def test_mlp_bias_option(planted):
    train, test = planted
    with_bias = sc.get_encoder("mlp", hidden=8, steps=1, seed=0).fit(train.dictionary, train.x)
    assert [tuple(p.shape) for p in with_bias.net.parameters()] == [(8, 8), (8,), (16, 8), (16,)]
    without = sc.get_encoder("mlp", hidden=8, steps=1, seed=0, bias=False).fit(train.dictionary, train.x)
    assert [tuple(p.shape) for p in without.net.parameters()] == [(8, 8), (16, 8)]
    # without biases the encoder is positively homogeneous: twice the signal, twice the code
    torch.testing.assert_close(without.encode(2 * test.x[:5]), 2 * without.encode(test.x[:5]))


def test_lista_beats_as_many_ista_steps(planted):
    train, test = planted
    D, lam, T = train.dictionary, 0.05, 5
    lista = sc.get_encoder("lista", lam=lam, unroll=T, steps=1500, lr=1e-3).fit(D, train.x)
    ista = sc.get_encoder("ista", lam=lam, max_iter=T, tol=0.0, working_set=0).fit(D)
    objective = lambda enc: float(sc.metrics.lasso_objective(test.x, enc.encode(test.x), D.atoms, lam).mean())
    assert objective(lista) < objective(ista)
    # the tied variant starts as ISTA and learns to get closer to the lasso solution
    tied = sc.get_encoder("lista", lam=lam, unroll=T, tied=True, steps=800, lr=1e-3).fit(D, train.x)
    solution = sc.get_encoder("fista", lam=lam, tol=1e-8).fit(D).encode(test.x)
    distance = lambda enc: float(((enc.encode(test.x) - solution) ** 2).sum(1).mean())
    assert distance(tied) < distance(ista)


def test_lista_supervised_by_true_codes(planted):
    train, test = planted
    enc = sc.get_encoder("lista", target="codes", unroll=4, steps=600, lr=3e-3).fit(train.dictionary, train.x,
                                                                                codes=train.codes)
    assert _mcc(test, enc) > 0.8
    with pytest.raises(ValueError, match="target='codes' needs"):
        sc.get_encoder("lista", target="codes", steps=5).fit(train.dictionary, train.x)


def test_binary_topk_codes_are_binary_at_most_k(planted):
    train, test = planted
    enc = sc.get_encoder("binary-topk", k=3, steps=300).fit(train.dictionary, train.x)
    with torch.no_grad():
        a = enc.binary_codes(test.x)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert int((a != 0).sum(1).max()) <= 3
    codes = enc.encode(test.x)
    scale = torch.exp(enc.net.log_scale.detach())
    torch.testing.assert_close(codes, a * scale)


def test_sigmoid_ste_gradient_is_the_surrogate():
    from sparsecode_encoders.binary import SigmoidSTE
    v = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64, requires_grad=True)
    out = SigmoidSTE.apply(v, 2.0)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    upstream = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    out.backward(upstream)
    s = torch.sigmoid(v.detach() / 2.0)
    torch.testing.assert_close(v.grad, upstream * s * (1 - s))


def test_binary_gradients_reach_the_encoder_only_through_selected(planted):
    train, _ = planted
    enc = sc.get_encoder("binary-topk", k=2, steps=1).fit(train.dictionary, train.x)
    x = train.x[:1]
    enc.net.zero_grad()
    codes = enc._codes(x)
    (codes @ train.dictionary.atoms - x).pow(2).sum().backward()
    grad_rows = enc.net.weight.grad.abs().sum(1)
    selected = enc.net.pre(x).topk(2, dim=1).indices[0]
    assert torch.all(grad_rows[selected] > 0)
    others = torch.ones(16, dtype=torch.bool)
    others[selected] = False
    assert torch.all(grad_rows[others] == 0)


def test_entropy_and_covariance_penalties_hand_values():
    h = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    # firing rates 3/4, 1/4, 3/4 -> H2(3/4) = H2(1/4) = 0.811278 bits each
    h2 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert float(entropy_penalty(h)) == pytest.approx(3 * h2, rel=1e-6)
    assert float(binary_entropy_bits(torch.tensor([0.0, 0.5, 1.0])).sum()) == pytest.approx(1.0)
    c = h - h.mean(0)
    cov = c.T @ c / 3
    expected = float(cov.abs().sum() - cov.diagonal().abs().sum())
    assert float(covariance_penalty(h)) == pytest.approx(expected)
    # hand value of one pair: cov(col0, col1) = sum((a-3/4)(b-1/4))/3 = (1/4*-1/4 + 1/4*3/4 - 3/4*-1/4 + 1/4*-1/4)/3
    assert float(cov[0, 1]) == pytest.approx((-1 / 16 + 3 / 16 + 3 / 16 - 1 / 16) / 3)


def test_binary_entropy_encoder_and_more_bit_decoding(planted):
    train, test = planted
    enc = sc.get_encoder("binary-entropy", steps=200, entropy=0.01, covariance=0.001).fit(train.dictionary, train.x)
    with torch.no_grad():
        a = enc.binary_codes(test.x)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    two = sc.get_encoder("binary-entropy", steps=50, bits=2).fit(train.dictionary, train.x)
    with torch.no_grad():
        values = two.binary_codes(test.x)
    assert set(values.unique().tolist()) <= {0.0, 0.5, 1.0, 1.5}


def test_signum_matches_its_definition():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = sc.Signum([p], lr=0.1, momentum=0.9)
    grads = [torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-1.0, -0.2, 0.4])]
    m = torch.zeros(3)
    expected = p.detach().clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        expected = expected - 0.1 * torch.sign(m)
    torch.testing.assert_close(p.detach(), expected)
    # step size does not depend on the gradient's scale
    q = torch.nn.Parameter(torch.zeros(2))
    opt = sc.Signum([q], lr=0.5)
    q.grad = torch.tensor([1e-6, -1e6])
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([-0.5, 0.5]))


@pytest.fixture(scope="module")
def easy():
    return sc.synthetic.make_sparse_data(n_samples=2000, d=16, n_atoms=24, k=2, seed=0)


@pytest.mark.parametrize("method, params", [
    ("sparse-coding", {"inference": "omp", "k": 2, "n_iter": 30}),
    ("sparse-coding", {"inference": "fista", "lam": 0.05, "n_iter": 20}),
    ("topk", {"k": 2, "steps": 1500, "lr": 3e-3}),
])
def test_dictionary_learning_recovers_planted_atoms(easy, method, params):
    learned = sc.learn_dictionary(easy.x, method, 24, **params)
    assert sc.metrics.dictionary_mcc(easy.dictionary.atoms, learned.dictionary.atoms) > 0.9
    torch.testing.assert_close(learned.dictionary.norms, torch.ones(24), atol=1e-5, rtol=0)
    codes = learned.encoder.encode(easy.x)
    assert sc.metrics.code_mcc(easy.codes, codes) > 0.85


@pytest.mark.parametrize("method", ["sklearn", "spams"])
def test_reference_dictionary_learners(easy, method):
    learned = sc.learn_dictionary(easy.x[:1000], method, 24, lam=0.05)
    assert learned.dictionary.atoms.shape == (24, 16)
    assert sc.metrics.dictionary_mcc(easy.dictionary.atoms, learned.dictionary.atoms) > 0.7
    assert sc.metrics.fvu(easy.x, learned.dictionary.decode(learned.encoder.encode(easy.x))) < 0.2


def test_training_is_reproducible_with_a_seed(planted):
    train, test = planted
    a = sc.get_encoder("topk", k=3, steps=100, seed=5, batch_size=256).fit(train.dictionary, train.x)
    b = sc.get_encoder("topk", k=3, steps=100, seed=5, batch_size=256).fit(train.dictionary, train.x)
    c = sc.get_encoder("topk", k=3, steps=100, seed=6, batch_size=256).fit(train.dictionary, train.x)
    assert torch.equal(a.encode(test.x), b.encode(test.x))
    assert not torch.equal(a.encode(test.x), c.encode(test.x))
    d1 = sc.learn_dictionary(train.x, "sparse-coding", 16, inference="omp", k=3, n_iter=5, seed=1).dictionary
    d2 = sc.learn_dictionary(train.x, "sparse-coding", 16, inference="omp", k=3, n_iter=5, seed=1).dictionary
    assert torch.equal(d1.atoms, d2.atoms)


def test_transcoder_training(planted):
    train, test = planted
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 5, generator=gen)
    y = train.x @ mix                         # targets of another dimension
    enc = sc.get_encoder("binary-topk", k=3, steps=200)
    D = enc.learn(train.x, 16, y=y)
    assert D.atoms.shape == (16, 5) and enc.d_in == 8
    codes = enc.encode(test.x)
    assert codes.shape == (1024, 16)
    assert sc.metrics.fvu(test.x @ mix, D.decode(codes)) < 1.0
    shared = sc.get_encoder("topk", k=3, steps=200).fit(D, train.x, y)
    assert shared.encode(test.x).shape == (1024, 16)


def test_save_and_load_trained_encoder(tmp_path, planted):
    train, test = planted
    for name, params in [("topk", {"k": 3}), ("binary-topk", {"k": 3}), ("lista", {"unroll": 3, "tied": True}),
                         ("mlp", {"hidden": 8})]:
        enc = sc.get_encoder(name, steps=30, **params).fit(train.dictionary, train.x)
        path = enc.save(tmp_path / name)
        again = sc.load_encoder(path)
        torch.testing.assert_close(again.encode(test.x), enc.encode(test.x))
        assert again.config == enc.config
    res = sc.compare([str(tmp_path / "topk.safetensors"), "omp"], test, k=3)
    assert res.rows[0]["encoder"] == "topk" and res.rows[0]["l0"] <= 3


def test_compare_trains_with_x_train_and_joint_mode(planted):
    train, test = planted
    res = sc.compare(["topk", "fista"], test, x_train=train.x, encoder_params={"topk": {"steps": 200}}, lam=0.01)
    assert res.row("topk")["fit_s"] > 0 and res.row("topk")["l0"] <= 3
    with pytest.raises(ValueError, match="is trained: give training signals"):
        sc.compare(["topk"], test)
    joint = sc.compare(["topk", "sparse-coding"], test, x_train=train.x, joint=True,
                       encoder_params={"topk": {"steps": 300, "k": 3}, "sparse-coding": {"inference": "omp", "k": 3}})
    for row in joint.rows:
        assert 0 <= row["dictionary_mcc"] <= 1 and 0 <= row["code_mcc"] <= 1
    with pytest.raises(ValueError, match="not one"):
        sc.compare(["omp"], test, joint=True)


@pytest.mark.parametrize("make, message", [
    (lambda: sc.get_encoder("topk", k=20).fit(torch.randn(16, 8), torch.randn(10, 8)), "k=20 is larger"),
    # relu's L1 weight is `l1_coefficient` (SAELens's name); `lam` is only the lasso's penalty now
    (lambda: sc.get_encoder("relu", l1_coefficient=-1.0), "l1_coefficient must be >= 0"),
    (lambda: sc.get_encoder("binary-entropy", entropy=-0.1), "penalties must be >= 0"),
    (lambda: sc.get_encoder("relu", steps=5).fit(torch.randn(16, 8), torch.zeros(0, 8)), "empty"),
    (lambda: sc.get_encoder("relu").fit(torch.randn(16, 8)), "is trained"),
    (lambda: sc.get_encoder("topk", optimizer="sgd"), "optimizer must be"),
    (lambda: sc.get_encoder("relu", weight_init="gaussian"), "weight_init must be one of 'dictionary', 'uniform', got 'gaussian'"),
    (lambda: sc.get_encoder("mlp", weight_init="dictionary"), "only at weight_init='uniform', got weight_init='dictionary'"),
    (lambda: sc.learn_dictionary(torch.randn(10, 4), "topkk", 8), "Did you mean 'topk'"),
    (lambda: sc.learn_dictionary(torch.randn(10, 4), "topk", 8, k=9), "k=9 is larger than n_atoms=8"),
    (lambda: sc.learn_dictionary(torch.zeros(0, 4), "topk", 8), "empty"),
])
def test_bad_configurations(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_dead_atom_resampling_revives_atoms():
    data = sc.synthetic.make_sparse_data(n_samples=1024, d=16, n_atoms=32, k=2, seed=3)
    common = dict(k=2, steps=400, lr=3e-3, seed=0)
    plain = sc.get_encoder("topk", **common)
    D_plain = plain.learn(data.x, 64)
    revived = sc.get_encoder("topk", resample_every=50, **common)
    D_rev = revived.learn(data.x, 64)
    dead_plain = sc.metrics.dead_fraction(plain.encode(data.x))
    dead_rev = sc.metrics.dead_fraction(revived.encode(data.x))
    assert revived.resampled > 0
    assert dead_rev < dead_plain
    torch.testing.assert_close(D_rev.norms, torch.ones(64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="resample_every must be >= 0"):
        sc.get_encoder("topk", resample_every=-1)
