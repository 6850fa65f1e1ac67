"""Paper b's training options of binary-entropy, and paper a's binary (skip-)transcoders."""
import pytest
import torch

import sparsecode as sc
from sparsecode.training import Forward
from sparsecode_encoders.binary import SigmoidDerivativeSTE, entropy_penalty


@pytest.fixture(scope="module")
def planted():
    data = sc.synthetic.make_sparse_data(n_samples=2048, d=8, n_atoms=16, k=3, seed=0)
    return data.split(1024)


def test_sigmoid_derivative_ste_hand_values():
    v = torch.tensor([-3.0, 0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    out = SigmoidDerivativeSTE.apply(v)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    out.backward(torch.tensor([1.0, 1.0, 2.0, -1.0], dtype=torch.float64))
    # s(0) (1 - s(0)) = 1/4; s(-3) = 0.0474259, s(0.5) = 0.6224593, s(2) = 0.8807971
    expected = [0.0474259 * 0.9525741, 0.25, 2 * 0.6224593 * 0.3775407, -0.8807971 * 0.1192029]
    torch.testing.assert_close(v.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_entropy_warmup_switches_the_penalty_on_after_warmup_steps(planted):
    from sparsecode import training
    train, _ = planted
    enc = sc.get_encoder("binary-entropy", entropy=0.5, warmup=3, steps=1).fit(train.dictionary, train.x)
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    values = []
    for step in range(5):                        # the step optimise is computing the loss of
        token = training._step_number.set(step)
        try:
            values.append(float(enc._penalty(Forward(h, units=h))))
        finally:
            training._step_number.reset(token)
    # rates 3/4 and 1/4: 2 * H2(1/4) = 1.6225562 bits, times the weight 0.5
    assert values[:3] == [0.0, 0.0, 0.0]
    assert values[3] == pytest.approx(0.5 * 1.6225562, rel=1e-6) == values[4]
    assert float(entropy_penalty(h)) == pytest.approx(1.6225562, rel=1e-6)
    assert training.current_step() is None       # outside training the penalty always acts
    assert float(enc._penalty(Forward(h, units=h))) == pytest.approx(0.5 * 1.6225562, rel=1e-6)


def test_sse_loss_sums_over_features():
    enc = sc.get_encoder("binary-entropy", loss="sse")
    y = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    y_hat = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    # rows: 1 + 4 = 5 and 1 + 4 = 5 -> mean over signals 5; 'mse' divides by the 3 features too
    assert float(enc._reconstruction_loss(y, y_hat)) == pytest.approx(5.0)
    assert float(sc.get_encoder("binary-entropy")._reconstruction_loss(y, y_hat)) == pytest.approx(10 / 6)


@pytest.mark.parametrize("field, value, message", [("ste", "tanh", "ste must be one of"),
                                                   ("warmup", -1, "warmup must be >= 0"),
                                                   ("loss", "l1", "loss must be 'mse' or 'sse'")])
def test_binary_entropy_options_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        sc.get_encoder("binary-entropy", **{field: value})


def test_both_stes_train_a_binary_autoencoder(planted):
    train, test = planted
    for ste in ("clipped", "sigmoid"):
        learned = sc.learn_dictionary(train.x, "binary-entropy", 16, ste=ste, steps=300, lr=3e-3, entropy=0.0)
        codes = learned.encoder.encode(test.x)
        assert sc.metrics.fvu(test.x, learned.dictionary.decode(codes)) < 0.5, ste


def test_skip_transcoder_learns_a_linear_map_and_round_trips(tmp_path, planted):
    train, test = planted
    mix = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    y_train, y_test = train.x @ mix, test.x @ mix            # a purely linear "MLP"
    common = dict(k=2, steps=400, lr=3e-3, batch_size=256)
    plain = sc.get_encoder("binary-topk", **common)
    skip = sc.get_encoder("binary-topk", skip=True, **common)
    fvus = {}
    for name, enc in (("plain", plain), ("skip", skip)):
        D = enc.learn(train.x, 16, y=y_train)
        y_hat = D.decode(enc.encode(test.x))
        if enc.skip_term(test.x) is not None:
            y_hat = y_hat + enc.skip_term(test.x)
        fvus[name] = sc.metrics.fvu(y_test, y_hat)
    assert plain.skip_term(test.x) is None
    assert fvus["skip"] < 0.1 < fvus["plain"]
    again = sc.load_encoder(skip.save(tmp_path / "skip"))
    torch.testing.assert_close(again.skip_term(test.x), skip.skip_term(test.x))
    with pytest.raises(ValueError, match="needs targets y"):
        sc.get_encoder("binary-topk", skip=True, steps=1).learn(train.x, 16)


def test_transcoder_with_latents_that_never_fire_still_makes_a_dictionary(planted):
    train, test = planted
    mix = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    enc = sc.get_encoder("topk", k=1, steps=3, batch_size=64)
    D = enc.learn(train.x, 64, y=train.x @ mix)
    norms = D.atoms.norm(dim=1)
    # latents never selected in 3 steps kept their numerically-zero start; the others learned rows
    assert float(norms.min()) < 1e-6 < float(norms.max())
    assert enc.encode(test.x).shape == (1024, 64)
