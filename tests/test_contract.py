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
