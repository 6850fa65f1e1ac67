"""The compiled CPU kernels: the same answers as the torch operations they replace, a build that is cached
and can fail safely, and a `kernel` option that says what it does."""
import logging

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

import sparsecode as sc
from sparsecode import native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler builds the kernels here")


@pytest.fixture
def coherent():
    """Overcomplete and noisy, so later picks are close calls: 96 atoms in 24 dimensions."""
    return sc.synthetic.make_sparse_data(n_samples=150, d=24, n_atoms=96, k=4, seed=5, dtype=torch.float64,
                                         noise=0.05)


def _support(codes):
    return [set(np.flatnonzero(row)) for row in np.asarray(codes)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["omp", "mp", "gradient-pursuit"])
@pytest.mark.parametrize("tol", [None, 0.3])
@pytest.mark.parametrize("unit", [True, False])
def test_pursuits_equal_their_torch_steps(coherent, dtype, name, tol, unit):
    atoms = coherent.dictionary.atoms
    if not unit:       # picks go by normalised correlation: the scale enters every step
        atoms = atoms * torch.linspace(0.3, 3.0, atoms.shape[0], dtype=atoms.dtype)[:, None]
    D, x = sc.Dictionary(atoms).to(dtype=dtype), coherent.x.to(dtype)
    infos = [sc.get_encoder(name, k=10, tol=tol, variant="gram", kernel=kernel).fit(D).encode_with_info(x)
             for kernel in ("torch", "native")]
    assert [info.kernel for info in infos] == ["torch", "native"]
    a, b = (info.codes for info in infos)
    assert _support(a.numpy()) == _support(b.numpy())
    torch.testing.assert_close(b, a, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)
    if tol is not None:
        assert float((b != 0).sum(1).double().mean()) < 10      # the tolerance stopped signals early


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_omp_matches_sklearn_on_a_coherent_dictionary(dtype):
    data = sc.synthetic.make_sparse_data(n_samples=300, d=64, n_atoms=1024, k=8, seed=11, noise=0.02,
                                         dtype=torch.float64)
    D, x = data.dictionary.atoms.numpy(), data.x.numpy()
    ref = orthogonal_mp_gram(D @ D.T, D @ x.T, n_nonzero_coefs=12).T
    ours = sc.get_encoder("omp", k=12, kernel="native").fit(data.dictionary.to(dtype=dtype)).encode(data.x.to(dtype))
    assert _support(ours.numpy()) == _support(ref)
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=1e-4 if dtype == torch.float32 else 1e-10)


@needs_native
def test_native_mp_hand_example():
    atoms = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    codes = sc.get_encoder("mp", k=2, kernel="native").fit(atoms).encode(torch.tensor([[1.0, 1.0]],
                                                                                      dtype=torch.float64))
    # correlations (1, 1.4) -> atom 1 with 1.4, residual (0.16, -0.12) -> atom 0 with 0.16
    torch.testing.assert_close(codes, torch.tensor([[0.16, 1.4]], dtype=torch.float64))


@needs_native
def test_native_gradient_pursuit_selects_each_atom_once_and_ties_go_first():
    # x lies in the span of atoms 0 and 1: after two steps every correlation left is exactly zero, and
    # later steps must add atom 2, then 3 (the first unselected), each with a zero step
    atoms = torch.eye(4, dtype=torch.float64)
    x = torch.tensor([[3.0, -2.0, 0.0, 0.0]], dtype=torch.float64)
    for kernel in ("torch", "native"):
        codes = sc.get_encoder("gradient-pursuit", k=4, kernel=kernel).fit(atoms).encode(x)
        torch.testing.assert_close(codes, x)


@needs_native
def test_blocks_and_threads_change_nothing(coherent):
    enc = sc.get_encoder("omp", k=9, kernel="native").fit(coherent.dictionary)
    whole = enc.encode(coherent.x)
    for threads, chunk in ((1, None), (2, 7), (3, 1)):
        again = sc.get_encoder("omp", k=9, kernel="native", threads=threads, chunk=chunk).fit(coherent.dictionary)
        # blocks of other sizes round x D^T differently (the product's own blocking), nothing more
        torch.testing.assert_close(again.encode(coherent.x), whole, atol=1e-12, rtol=1e-10)


def test_kernel_option_is_checked(coherent):
    with pytest.raises(ValueError, match="kernel must be one of auto, native, torch, got 'c'"):
        sc.get_encoder("omp", kernel="c")
    with pytest.raises(ValueError, match="kernel must be one of"):
        sc.get_encoder("fista", kernel="fast")


def test_unavailable_kernels_fall_back_or_say_why(coherent, monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {"lib": None, "why": "no C compiler found (set CC)"})
    with pytest.raises(ValueError, match=r"kernel='native' is not available here: no C compiler found \(set CC\)"):
        sc.get_encoder("omp", k=4, kernel="native").fit(coherent.dictionary).encode(coherent.x)
    info = sc.get_encoder("omp", k=4).fit(coherent.dictionary).encode_with_info(coherent.x)
    assert info.kernel == "torch"
    ref = orthogonal_mp_gram(coherent.dictionary.atoms.numpy() @ coherent.dictionary.atoms.numpy().T,
                             coherent.dictionary.atoms.numpy() @ coherent.x.numpy().T, n_nonzero_coefs=4).T
    np.testing.assert_allclose(info.codes.numpy(), ref, atol=1e-9)


def test_native_kernel_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="kernel='native' runs on the CPU, not on meta"):
        native.resolve("native", torch.device("meta"))
    assert native.resolve("auto", torch.device("meta")) is False
    assert native.resolve("torch", torch.device("cpu")) is False


def test_build_is_cached_and_a_broken_compiler_is_reported(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if native._compiler() is not None and native.available():
        monkeypatch.setattr(native, "_state", {})
        assert native.available()
        built = sorted((tmp_path / "cache" / "sparsecode").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"          # no temporary file is left behind
        stamp = built[0].stat().st_mtime_ns
        monkeypatch.setattr(native, "_state", {})
        assert native.available()                                      # loaded again, not rebuilt
        assert sorted((tmp_path / "cache" / "sparsecode").iterdir()) == built
        assert built[0].stat().st_mtime_ns == stamp
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING, logger="sparsecode.native"):
        assert not native.available()
    assert "could not compile kernels.c (cc: fatal error: no input)" in native.why_unavailable()
    assert "compiled kernels unavailable" in caplog.text
    assert not any(p.suffix == ".so" for p in (tmp_path / "other").rglob("*"))
