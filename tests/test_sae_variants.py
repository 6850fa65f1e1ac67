"""JumpReLU, BatchTopK, Matryoshka and gated SAE encoders: the published forward and backward formulas
on tiny hand-made tensors, short training runs, and export to SAELens."""
import pytest
import torch

import sparsecode as sc
from sparsecode_encoders.sae_variants import (JumpReLUFunction, StepFunction, _affine_without_decoder_gradient, batch_topk,
                                   rectangle)

VARIANTS = {"jumprelu": {}, "batch-topk": {"k": 3}, "matryoshka": {"k": 3}, "gated": {"l1_coefficient": 0.01}}

PRE = torch.tensor([[0.5, 0.0012, 0.3], [0.0009, 2.0, 0.0011]], dtype=torch.float64)
THETA = torch.tensor([0.001, 0.001, 0.0004], dtype=torch.float64)
EPS = 0.001


def test_rectangle_kernel():
    u = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.7])
    assert torch.equal(rectangle(u), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


def test_jumprelu_forward_and_threshold_gradient_by_hand():
    pre = PRE.clone().requires_grad_(True)
    theta = THETA.clone().requires_grad_(True)
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    out = JumpReLUFunction.apply(pre, theta, EPS)
    # fires where pre > theta: 0.5, 0.0012 (> 0.001), 0.3, 2.0, 0.0011 (> 0.0004); not 0.0009
    expected = torch.tensor([[0.5, 0.0012, 0.3], [0.0, 2.0, 0.0011]], dtype=torch.float64)
    assert torch.equal(out.detach(), expected)
    (out * w).sum().backward()
    # d/dpre: w where firing
    assert torch.equal(pre.grad, w * (expected != 0))
    # d/dtheta_i = -sum_n (theta_i / eps) K((pre_ni - theta_i) / eps) w_ni; K = 1 where |pre - theta| < eps / 2:
    # latent 0: 0.0009 (|-0.0001|), w = 4; latent 1: 0.0012 (0.0002), w = 2; latent 2: none (0.0007 off)
    grad = torch.tensor([-(0.001 / EPS) * 4.0, -(0.001 / EPS) * 2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(theta.grad, grad)


def test_step_function_gradient_by_hand():
    pre = PRE.clone().requires_grad_(True)
    theta = THETA.clone().requires_grad_(True)
    l0 = StepFunction.apply(pre, theta, EPS)
    assert torch.equal(l0.detach(), torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64))
    l0.sum().backward()
    assert torch.equal(pre.grad, torch.zeros_like(PRE))
    assert torch.allclose(theta.grad, torch.tensor([-1 / EPS, -1 / EPS, 0.0], dtype=torch.float64))


def test_jumprelu_codes_and_l0_penalty_from_the_network():
    D = sc.Dictionary(torch.eye(3, dtype=torch.float64))
    x = torch.tensor([[0.5, 0.0012, 0.3], [0.0009, 2.0, 0.0011]], dtype=torch.float64)
    enc = sc.get_encoder("jumprelu", steps=1, lr=1e-12, l0_coefficient=0.5).fit(D, x)
    # W starts at the atoms (identity), b at 0, theta at 0.001
    with torch.no_grad():
        enc.net.log_threshold.copy_(torch.log(THETA))
    assert torch.allclose(enc.encode(x), torch.tensor([[0.5, 0.0012, 0.3], [0.0, 2.0, 0.0011]], dtype=torch.float64))
    enc.net.train()
    out = enc.forward(x)
    assert float(enc._penalty(out).detach()) == pytest.approx(0.5 * 5 / 2)     # 5 firing latents over 2 signals
    # squared error summed over features, averaged over signals (the L0 count's scale)
    y_hat = torch.tensor([[0.5, 0.0, 0.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    assert float(enc._reconstruction_loss(x, y_hat)) == pytest.approx(((0.0012 ** 2 + 0.09) + (0.9991 ** 2 + 0.0011 ** 2)) / 2)


def test_batch_topk_keeps_exactly_k_times_batch():
    g = torch.Generator().manual_seed(0)
    pre = torch.rand(5, 12, generator=g, dtype=torch.float64) + 0.1
    out = batch_topk(pre, 3)
    assert int((out != 0).sum()) == 15
    kept = out[out != 0]
    # the 15 largest of the whole batch, wherever they are: some rows keep more than 3, some fewer
    assert torch.equal(kept.sort().values, pre.reshape(-1).sort().values[-15:])
    assert torch.equal(out[out != 0], pre[out != 0])
    assert len(set((out != 0).sum(1).tolist())) > 1


def test_batch_topk_threshold_and_inference():
    D = sc.Dictionary(torch.eye(4, dtype=torch.float64))
    x = torch.tensor([[4.0, 3.0, 0.5, -1.0], [0.2, 0.1, 2.0, 1.0]], dtype=torch.float64)
    enc = sc.get_encoder("batch-topk", k=2, steps=1, lr=1e-12, threshold_momentum=0.5).fit(D, x)
    # one training step on x: the 4 largest of relu(x) are 4, 3, 2, 1: the threshold starts at 1.0
    assert float(enc.net.threshold) == pytest.approx(1.0, abs=1e-9)
    enc.net.train()
    with torch.no_grad():
        enc._codes(torch.tensor([[5.0, 6.0, 7.0, 8.0]], dtype=torch.float64))   # keeps 8 and 7: min 7
    assert float(enc.net.threshold) == pytest.approx(0.5 * 1.0 + 0.5 * 7.0)
    enc.net.eval()
    with torch.no_grad():
        enc.net.threshold.fill_(1.0)
    # inference: relu(pre) kept where above the threshold, each signal on its own
    assert torch.allclose(enc.encode(x), torch.tensor([[4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]],
                                                      dtype=torch.float64), atol=1e-9)


def test_matryoshka_loss_sums_the_prefix_errors():
    D = sc.Dictionary(torch.eye(8, dtype=torch.float64))
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    enc = sc.get_encoder("matryoshka", k=3, groups=3, steps=1, lr=1e-12).fit(D, x)
    assert enc.prefixes(8) == [2, 4, 8]
    atoms = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    decode = lambda z: z @ atoms + b       # noqa: E731
    enc.net.train()
    out = enc.forward(x)
    codes = out.codes
    loss = enc._loss(x, decode(codes), out, decode)
    expected = sum(((x - (codes[:, :m] @ atoms[:m] + b)) ** 2).mean() for m in (2, 4, 8))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)


def test_gated_forward_by_hand():
    D = sc.Dictionary(torch.eye(3, dtype=torch.float64))
    x = torch.tensor([[1.0, -0.5, 2.0]], dtype=torch.float64)
    enc = sc.get_encoder("gated", steps=1, lr=1e-12).fit(D, x)
    with torch.no_grad():
        enc.net.weight.copy_(torch.eye(3, dtype=torch.float64))
        enc.net.bias.copy_(torch.tensor([-2.0, 1.0, 0.5], dtype=torch.float64))      # gates: -1, 0.5, 2.5
        enc.net.r_mag.copy_(torch.log(torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)))
        enc.net.b_mag.copy_(torch.tensor([0.0, 0.1, -0.2], dtype=torch.float64))   # magnitudes: 2, -1.4, 0.8
    # gate closed on latent 0; open on 1 but its magnitude is negative (ReLU: 0); latent 2: 0.8
    assert torch.allclose(enc.encode(x), torch.tensor([[0.0, 0.0, 0.8]], dtype=torch.float64))


def test_gated_auxiliary_term_leaves_the_decoder_alone():
    atoms = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    out = _affine_without_decoder_gradient(lambda c: c @ atoms + 1.0, z)
    assert torch.allclose(out, z @ atoms + 1.0)
    out.sum().backward()
    assert torch.equal(atoms.grad, torch.zeros_like(atoms))
    assert torch.allclose(z.grad, atoms.detach().sum(1).expand(2, 4))


@pytest.fixture(scope="module")
def planted():
    data = sc.synthetic.make_sparse_data(n_samples=512, d=16, n_atoms=32, k=3, seed=0)
    return data.split(256)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_training_on_the_shared_dictionary_lowers_fvu(planted, name):
    train, test = planted
    fvu = {}
    for steps in (1, 150):
        enc = sc.get_encoder(name, steps=steps, lr=3e-3, **VARIANTS[name]).fit(train.dictionary, train.x)
        fvu[steps] = sc.metrics.fvu(test.x, train.dictionary.decode(enc.encode(test.x)))
    assert fvu[150] < 0.7 * fvu[1]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_learning_its_own_dictionary(planted, name):
    train, test = planted
    learned = sc.learn_dictionary(train.x, method=name, n_atoms=32, steps=120, lr=3e-3, **VARIANTS[name])
    D = learned.dictionary
    assert torch.allclose(D.atoms.norm(dim=1), torch.ones(32), atol=1e-5)
    # (matryoshka's loss also sums the errors of its small prefixes, which fall less)
    assert learned.losses[-1] < 0.6 * learned.losses[0]
    assert sc.metrics.fvu(test.x, D.decode(learned.encoder.encode(test.x))) < 0.5


def test_batch_topk_keeps_about_k_at_inference(planted):
    train, test = planted
    enc = sc.get_encoder("batch-topk", k=3, steps=200, lr=3e-3).fit(train.dictionary, train.x)
    assert abs(sc.metrics.mean_l0(enc.encode(test.x)) - 3) < 1.0


@pytest.mark.parametrize("name", ["jumprelu", "batch-topk"])
def test_export_to_saelens_runs_the_same_encoder(planted, name, tmp_path):
    from sparsecode.sae_formats import export_saelens, load_sae
    train, test = planted
    enc = sc.get_encoder(name, steps=20, lr=3e-3, **VARIANTS[name]).fit(train.dictionary, train.x)
    export_saelens(enc, tmp_path / "sae")
    assert torch.allclose(load_sae(tmp_path / "sae").encode(test.x), enc.encode(test.x), atol=1e-6)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_and_load_round_trip(planted, name, tmp_path):
    from sparsecode.encoder_file import load_encoder
    train, test = planted
    enc = sc.get_encoder(name, steps=5, **VARIANTS[name]).fit(train.dictionary, train.x)
    enc.save(tmp_path / "enc")
    assert torch.equal(load_encoder(tmp_path / "enc").encode(test.x), enc.encode(test.x))


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="bandwidth must be > 0, got 0.0"):
        sc.get_encoder("jumprelu", bandwidth=0.0)
    with pytest.raises(ValueError, match="l0_coefficient must be >= 0, got -1.0"):
        sc.get_encoder("jumprelu", l0_coefficient=-1.0)
    with pytest.raises(ValueError, match=r"threshold_momentum must be in \[0, 1\), got 1.0"):
        sc.get_encoder("batch-topk", threshold_momentum=1.0)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        sc.get_encoder("matryoshka", groups=0)
    with pytest.raises(ValueError, match="k=40 is larger than the dictionary's n_atoms=32"):
        sc.get_encoder("batch-topk", k=40).fit(torch.randn(32, 8), torch.randn(10, 8))


def test_gated_loss_is_reconstruction_gate_penalty_and_gate_reconstruction():
    D = sc.Dictionary(torch.eye(3, dtype=torch.float64))
    x = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.2, -0.1]], dtype=torch.float64)
    enc = sc.get_encoder("gated", steps=1, lr=1e-12, l1_coefficient=0.3).fit(D, x)
    atoms = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    decode = lambda z: z @ atoms + 0.5       # noqa: E731
    out = enc.forward(x)
    gate = torch.relu(x @ enc.net.weight.T + enc.net.bias)
    assert torch.allclose(out.units, gate)
    expected = (((x - decode(out.codes)) ** 2).mean() + 0.3 * gate.mean() + ((x - decode(gate)) ** 2).mean())
    assert float(enc._loss(x, decode(out.codes), out, decode).detach()) == pytest.approx(float(expected.detach()), rel=1e-12)


# --- the inference knob: a threshold calibrated on the trained encoder ------------------------------
def _codes_by_hand(enc, x):
    """Each variant's inference codes from its network weights and its config's threshold, written out."""
    pre = x @ enc.net.weight.T + enc.net.bias
    if enc.name == "jumprelu":
        threshold = torch.exp(enc.net.log_threshold) * enc.config.threshold_scale
        return torch.relu(pre) * (torch.relu(pre) > threshold)
    if enc.name == "gated":
        magnitude = torch.relu(torch.exp(enc.net.r_mag) * (x @ enc.net.weight.T) + enc.net.b_mag)
        return magnitude * (pre > enc.config.threshold)
    return torch.relu(pre) * (torch.relu(pre) > enc.config.threshold)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_calibration_sets_the_inference_threshold_to_the_target_l0(planted, name):
    train, test = planted
    knob = sc.registry.encoder_class(name).inference_knob
    params = {"steps": 60, "lr": 3e-3, **VARIANTS[name]}
    for target in (2.0, 4.5):
        enc, l0 = sc.calibrate(name, train.dictionary, test.x, target, params=params, x_train=train.x)
        assert abs(l0 - target) <= 0.09                     # calibration's tolerance: 2% of the target, >= 0.05
        codes = enc.encode(test.x)
        assert sc.metrics.mean_l0(codes) == pytest.approx(l0)
        # the codes are the network's at the calibrated threshold, and only the threshold moved
        assert torch.allclose(codes, _codes_by_hand(enc, test.x), atol=1e-6)
        if "k" in params:
            assert enc.config.k == round(target)            # trained once, at k = the target
        trained = sc.get_encoder(name, **{**params, "k": round(target)} if "k" in params else params)
        trained.fit(train.dictionary, train.x)
        assert torch.equal(trained.net.weight, enc.net.weight)
        assert getattr(enc.config, knob) != getattr(trained.config, knob)


def test_inference_threshold_l0_falls_as_it_grows_and_retuning_shares_the_network(planted):
    train, test = planted
    enc = sc.get_encoder("batch-topk", k=3, steps=30, lr=3e-3).fit(train.dictionary, train.x)
    low, high = enc.inference_range(test.x)
    l0 = [sc.metrics.mean_l0(enc.retuned(threshold=t).encode(test.x)) for t in torch.linspace(low, high, 6).tolist()]
    assert l0 == sorted(l0, reverse=True) and l0[-1] == 0.0
    # at the low end every positive pre-activation fires: ReLU's L0
    assert l0[0] == sc.metrics.mean_l0(torch.relu(test.x @ enc.net.weight.T + enc.net.bias))
    twin = enc.retuned(threshold=0.5)
    assert twin.net is enc.net and enc.config.threshold is None and twin.config.threshold == 0.5
    with pytest.raises(ValueError, match="can change only threshold after fitting, not k"):
        enc.retuned(k=4)
    with pytest.raises(ValueError, match="threshold must be >= 0, got -1.0"):
        enc.retuned(threshold=-1.0)


def test_a_target_above_the_densest_threshold_is_unreachable(planted):
    from sparsecode.compare import Unreachable
    train, test = planted
    # a large gate penalty trains gates that stay shut on most signals, even with the threshold at its lowest
    params = {"steps": 60, "lr": 3e-3, "l1_coefficient": 50.0}
    enc = sc.get_encoder("gated", **params).fit(train.dictionary, train.x)
    low, _ = enc.inference_range(test.x)
    densest = sc.metrics.mean_l0(enc.retuned(threshold=low).encode(test.x))
    assert densest == sc.metrics.mean_l0(torch.relu(torch.exp(enc.net.r_mag) * (test.x @ enc.net.weight.T)
                                                    + enc.net.b_mag))
    with pytest.raises(Unreachable, match=rf"out of gated's reach: at its densest threshold=.* its mean L0 is "
                                          rf"{densest:.3g}; train it denser \(its l1_coefficient\)"):
        sc.calibrate("gated", train.dictionary, test.x, densest + 1, params=params, x_train=train.x)


def test_exported_batch_topk_uses_the_calibrated_threshold(planted, tmp_path):
    from sparsecode.sae_formats import export_saelens, load_sae
    train, test = planted
    enc, _ = sc.calibrate("batch-topk", train.dictionary, test.x, 2.0, params={"steps": 30, "lr": 3e-3},
                          x_train=train.x)
    export_saelens(enc, tmp_path / "sae")
    assert torch.allclose(load_sae(tmp_path / "sae").encode(test.x), enc.encode(test.x), atol=1e-6)


def test_calibrate_inference_on_an_encoder_that_learned_its_own_dictionary(planted):
    from sparsecode.compare import calibrate_inference
    train, test = planted
    learned = sc.learn_dictionary(train.x, method="jumprelu", n_atoms=32, steps=40, lr=3e-3)
    before = learned.encoder.config.threshold_scale
    enc, l0 = calibrate_inference(learned.encoder, test.x, 2.5)
    assert abs(l0 - 2.5) <= 0.05 and sc.metrics.mean_l0(enc.encode(test.x)) == l0
    assert torch.allclose(enc.encode(test.x), _codes_by_hand(enc, test.x), atol=1e-6)
    assert enc.dictionary is learned.dictionary and learned.encoder.config.threshold_scale == before
    with pytest.raises(ValueError, match="'topk' has no inference knob to calibrate"):
        calibrate_inference(sc.get_encoder("topk", k=2, steps=1).fit(train.dictionary, train.x), test.x, 2.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        calibrate_inference(sc.get_encoder("gated"), test.x, 2.0)
    with pytest.raises(ValueError, match="target_l0 must be > 0"):
        calibrate_inference(enc, test.x, 0.0)
