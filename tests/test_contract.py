"""One contract for every encoder in the registry."""
import numpy as np
import pytest
import torch

import sparsecode as sc
from sparsecode.registry import encoder_names

NAMES = encoder_names()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def problem():
    return sc.synthetic.make_sparse_data(n_samples=6, d=8, n_atoms=16, k=3, noise=0.01, seed=3,
                                         dtype=torch.float64)


QUICK = {"steps": 60, "unroll": 3}      # trained encoders: a few steps are enough for the contract


def _sae_folder(dictionary):
    """An SAELens folder whose decoder is `dictionary` (encoder rows = atoms), for the sae-file encoder."""
    import tempfile
    from sparsecode.sae_formats import save_saelens
    D = dictionary if isinstance(dictionary, sc.Dictionary) else sc.Dictionary(dictionary)
    folder = tempfile.mkdtemp(prefix="sae-")
    save_saelens(folder, D.to(device="cpu"), D.atoms.cpu(), None, "relu")
    return folder


def _fitted(name, dictionary, x_train=None):
    cls = sc.encoder_class(name)
    if name == "sae-file":
        return sc.get_encoder(name, path=_sae_folder(dictionary)).fit(dictionary)
    fields = cls.Config.__dataclass_fields__
    quick = QUICK.items() if cls.trainable else ()
    params = {key: value for key, value in (("k", 3), ("lam", 0.05), *quick) if key in fields}
    enc = sc.get_encoder(name, **params)
    if cls.trainable:
        if x_train is None:
            x_train = torch.randn(40, dictionary.shape[1] if hasattr(dictionary, "shape") else dictionary.d,
                                  dtype=torch.float64)
        return enc.fit(dictionary, x_train)
    return enc.fit(dictionary)


def test_builtin_encoders_are_registered():
    assert {"ista", "fista", "mp", "omp", "sklearn-omp", "sklearn-lasso", "spams-omp", "spams-lasso",
            "cvxpy-lasso", "relu", "topk", "mlp", "ito", "lista", "binary-topk", "binary-entropy"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_shape_dtype_device_determinism(problem, name, dtype, device):
    D = problem.dictionary.to(device=device, dtype=dtype)
    x = problem.x.to(device=device, dtype=dtype)
    enc = _fitted(name, D, x)
    codes = enc.encode(x)
    assert codes.shape == (6, 16)
    assert codes.dtype == dtype and codes.device.type == device
    assert torch.equal(codes, enc.encode(x))
    if enc.family not in ("amortised", "binary", "unrolled"):
        # every inference method reconstructs the planted signals well
        assert sc.metrics.fvu(x, D.decode(codes)) < 0.25
    assert np.isfinite(enc.flops_per_signal()) or name == "cvxpy-lasso"


@pytest.mark.parametrize("name", NAMES)
def test_numpy_in_tensor_out(problem, name):
    enc = _fitted(name, problem.dictionary.atoms.numpy())
    codes = enc.encode(problem.x.numpy())
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_rejected(problem, name):
    enc = sc.get_encoder(name)
    with pytest.raises(RuntimeError, match="not (fitted|trained)"):
        enc.encode(problem.x)
    enc = _fitted(name, problem.dictionary)
    bad = problem.x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf \\(first at row 2\\)"):
        enc.encode(bad)
    with pytest.raises(ValueError, match="x has d=5 features per signal but .* d=8"):
        enc.encode(problem.x[:, :5])
    with pytest.raises(ValueError, match=r"x must be \(n, d\)"):
        enc.encode(problem.x[0])
    atoms = problem.dictionary.atoms.clone()
    atoms[0, 0] = float("inf")
    with pytest.raises(ValueError, match="atoms contains NaN or Inf"):
        _fitted(name, atoms)


def test_unknown_encoder_gets_a_suggestion():
    with pytest.raises(ValueError, match="unknown encoder 'fsta'. Did you mean 'fista'\\? Available: "):
        sc.get_encoder("fsta")


def test_available_encoders_lists_knobs_and_status():
    infos = {i.name: i for i in sc.available_encoders()}
    assert infos["omp"].available and infos["omp"].family == "greedy"
    default, help_text = infos["omp"].knobs["k"]
    assert default == 16 and "target L0" in help_text
    assert "no 1/n or 1/d scaling" in infos["fista"].knobs["lam"][1]
    assert infos["spams-omp"].missing == ()


def test_missing_package_says_what_to_install(monkeypatch):
    cls = sc.encoder_class("spams-omp")
    monkeypatch.setattr(cls, "requires", {"no_such_module_xyz": "no-such-package"})
    with pytest.raises(ImportError, match="pip install no-such-package"):
        sc.get_encoder("spams-omp")
    info = {i.name: i for i in sc.available_encoders()}["spams-omp"]
    assert not info.available and info.missing == ("no-such-package",)


@pytest.mark.parametrize("name", NAMES)
def test_encode_keeps_no_per_call_state_on_the_encoder(problem, name):
    # what a call learns about its answer (iterations, variant, L0) comes back in `Encoded`; an encoder
    # that kept it on itself would hand one caller's numbers to another (threads, calibration)
    enc = _fitted(name, problem.dictionary, problem.x)
    before = dict(vars(enc))
    info = enc.encode_with_info(problem.x)
    assert vars(enc).keys() == before.keys() and all(vars(enc)[k] is v for k, v in before.items())
    assert np.isfinite(enc.flops_per_signal(info)) or name == "cvxpy-lasso"


@pytest.mark.parametrize("name", NAMES)
def test_one_not_fitted_check_for_every_encoder(problem, name):
    with pytest.raises(RuntimeError, match=f"encoder '{name}' is not fitted: call .fit"):
        sc.get_encoder(name).encode(problem.x)


def test_training_keeps_no_batch_on_the_encoder():
    # the binary units its penalties need and the batch dead-atom resampling needs are returned by the
    # forward pass and the training step, not left on the encoder (`_hidden`, `_last_batch`, `_last_fired`)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    enc = sc.get_encoder("binary-entropy", steps=4, resample_every=2, covariance=0.1)
    enc.learn(x, 6)
    out = enc.forward(x)
    assert out.units.shape == (64, 6) and set(out.units.unique().tolist()) <= {0.0, 1.0}
    assert not {"_hidden", "_last_batch", "_last_fired"} & set(vars(enc))


def test_reference_flops_count_the_calls_own_selected_atoms(problem):
    enc = sc.get_encoder("sklearn-omp", k=2).fit(problem.dictionary)
    info = enc.encode_with_info(problem.x)
    assert sc.metrics.mean_l0(info.codes) == 2.0
    # x D^T (2 d N), then per step j the Gram column update (2 j N) and argmax (5 N), then the k x k solve
    assert enc.flops_per_signal(info) == 2 * 8 * 16 + (5 * 16) + (2 * 16 + 5 * 16) + 2 * 2
