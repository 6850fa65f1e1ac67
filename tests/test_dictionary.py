import json

import numpy as np
import pytest
import torch

import sparsecode as sc


def test_gram_lipschitz_and_decode_values():
    atoms = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    D = sc.Dictionary(atoms, bias=torch.tensor([0.5, -1.0], dtype=torch.float64))
    assert torch.equal(D.gram(), atoms @ atoms.T)
    # ||D||_2^2 = largest eigenvalue of D^T D = [[2, 1], [1, 5]]
    assert D.lipschitz == pytest.approx((7 + np.sqrt(13)) / 2)
    z = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(D.decode(z), torch.tensor([[1.5, 1.0]], dtype=torch.float64))
    assert not D.unit_norm
    assert D.normalized().unit_norm
    np.testing.assert_allclose(D.norms.numpy(), [1.0, 2.0, np.sqrt(2.0)])


def test_numpy_input_and_gram_cache():
    D = sc.Dictionary(np.eye(3))
    assert D.atoms.dtype == torch.float64
    assert D.gram() is D.gram()
    assert D.gram(torch.float32).dtype == torch.float32


def test_save_load_round_trip(tmp_path):
    D = sc.Dictionary(torch.randn(5, 3), bias=torch.randn(3), metadata={"source": "test"})
    path = D.save(tmp_path / "dict")
    assert path.name == "dict.safetensors" and (tmp_path / "dict.json").is_file()
    E = sc.Dictionary.load(tmp_path / "dict.safetensors")
    assert torch.equal(E.atoms, D.atoms) and torch.equal(E.bias, D.bias)
    assert E.metadata == {"source": "test"}
    assert json.loads((tmp_path / "dict.json").read_text())["n_atoms"] == 5
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("bad, message", [
    (np.array([[1.0, np.nan]]), "NaN or Inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "first at row 0"),
    (np.zeros((2, 3)), "zero rows"),
    (np.ones(3), r"must be \(n, d\)"),
    (np.array([["a"]], dtype=object), "must hold numbers"),
    ([[1.0]], "torch.Tensor or numpy.ndarray"),
])
def test_bad_atoms_rejected(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        sc.Dictionary(bad)


def test_bias_must_match_d():
    with pytest.raises(ValueError, match="bias has 2 entries but atoms have d=3"):
        sc.Dictionary(torch.randn(4, 3), bias=torch.zeros(2))


def test_load_rejects_files_that_are_not_dictionaries(tmp_path):
    from safetensors.torch import save_file
    save_file({"weights": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a dictionary: expected a 2-D tensor 'atoms'"):
        sc.Dictionary.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        sc.Dictionary.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="dictionary file not found"):
        sc.Dictionary.load(tmp_path / "missing.safetensors")
    sc.Dictionary(torch.eye(2)).save(tmp_path / "d")
    (tmp_path / "d.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a sparsecode dictionary description"):
        sc.Dictionary.load(tmp_path / "d")
