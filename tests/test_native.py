"""The compiled CPU kernels: the same answers as the torch operations they replace, a build that is cached
and can fail safely, and a `kernel` option that says what it does."""
import logging
import os

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

import sparsecode as sc
from sparsecode import native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler builds the kernels here")


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_build_is_cached_and_a_broken_compiler_is_reported(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if native._compiler() is not None and native.available():
        monkeypatch.setattr(native, "_state", {})
        assert native.available()
        built = sorted((tmp_path / "cache" / "sparsecode").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"          # no temporary file is left behind
        assert built[0].stat().st_mode & 0o777 == 0o777 & ~_umask()   # the user's umask, as the compiler left it
        stamp = built[0].stat().st_mtime_ns
        monkeypatch.setattr(native, "_state", {})
        assert native.available()                                      # loaded again, not rebuilt
        assert sorted((tmp_path / "cache" / "sparsecode").iterdir()) == built
        assert built[0].stat().st_mtime_ns == stamp
        # a cached library others may write is not loaded (loading runs its code): one of this process's own
        built[0].chmod(0o777)
        monkeypatch.setattr(native, "_state", {})
        assert native.available()
        assert not native._state["lib"]._name.startswith(str(tmp_path / "cache"))
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


def _objective(data, codes, lam):
    from sparsecode import metrics
    return metrics.lasso_objective(data.x.double(), codes.double(), data.dictionary.atoms.double(), lam)


@needs_native
@pytest.mark.parametrize("name", ["fista", "ista"])
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("criterion", ["gap", "change"])
@pytest.mark.parametrize("gram", [True, False])
def test_lasso_working_sets_equal_their_torch_iterations(name, positive, criterion, gram):
    """The compiled working-set iterations reach the torch iterations' objective, with the same
    certificates, whether blocks come from the Gram matrix or from the atoms."""
    # 120 signals pay for the Gram matrix of 128 atoms, not of 512 (see lasso_plan)
    data = sc.synthetic.make_sparse_data(n_samples=120, d=64, n_atoms=128 if gram else 512, k=5, noise=0.02,
                                         seed=7, dtype=torch.float64, positive=positive)
    lam, tol = 0.05, 1e-8 if name == "fista" else 1e-6        # ISTA converges slowly: a looser target
    infos = [sc.get_encoder(name, lam=lam, positive=positive, criterion=criterion, tol=tol, kernel=kernel)
             .fit(data.dictionary).encode_with_info(data.x) for kernel in ("torch", "native")]
    assert [i.kernel for i in infos] == ["torch", "native"]
    assert [i.variant for i in infos] == ["gram" if gram else "gram-free"] * 2
    assert [i.uncertified for i in infos] == [0, 0]
    a, b = (_objective(data, i.codes, lam) for i in infos)
    assert float(((b - a) / a).abs().max()) < 10 * tol
    if criterion == "gap":
        from sparsecode_encoders.iterative import duality_gap
        assert float(duality_gap(data.x, infos[1].codes, data.dictionary.atoms, lam, positive).max()) <= tol


@needs_native
def test_float32_sets_that_stall_move_to_float64_in_the_kernels_too(monkeypatch):
    """At a small lam float32 cannot resolve the gap asked for: the sets move to float64 (float32
    atoms, float64 state) and reach the float64 optimum, as the torch iterations do."""
    calls = []
    lasso_sets = native.lasso_sets

    def spy(x, atoms, *args, **kwargs):
        calls.append((atoms.dtype, x.dtype))
        return lasso_sets(x, atoms, *args, **kwargs)

    monkeypatch.setattr(native, "lasso_sets", spy)
    data = sc.synthetic.make_sparse_data(n_samples=40, d=64, n_atoms=512, k=6, seed=7, dtype=torch.float64,
                                         noise=0.01)
    lam = 0.02
    single = data.dictionary.to(dtype=torch.float32)
    infos = [sc.get_encoder("fista", lam=lam, tol=1e-8, working_set=16, kernel=kernel).fit(single)
             .encode_with_info(data.x.float()) for kernel in ("torch", "native")]
    exact = sc.get_encoder("fista", lam=lam, tol=1e-10).fit(data.dictionary).encode(data.x)
    best = _objective(data, exact, lam)
    for info in infos:
        assert info.uncertified == 0
        assert float(((_objective(data, info.codes, lam) - best) / best).abs().max()) < 1e-6
    assert {(torch.float32, torch.float32), (torch.float32, torch.float64)} <= set(calls)


@needs_native
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float32])
def test_compiled_recheck_equals_the_torch_recheck(positive, low):
    from sparsecode_encoders.iterative import _Checker
    g = torch.Generator().manual_seed(4)
    atoms = torch.nn.functional.normalize(torch.randn(3000, 40, generator=g), dim=1)
    r = torch.randn(9, 40, generator=g, dtype=torch.float64) * torch.logspace(-3, 0, 9, dtype=torch.float64)[:, None]
    r[0] = 0.3 * (atoms[5] + atoms[11]).double() + 1e-11 * (atoms[5] - atoms[11]).double()     # a near-tie
    low_atoms = atoms.to(low) if low == torch.bfloat16 else None
    results = [_Checker(atoms, low_atoms, compiled).check([r, r.float()], positive, block_bytes=10 ** 9)
               for compiled in (False, True)]
    for (corr_t, worst_t), (corr_n, worst_n), rr in zip(*results, (r, r.float())):
        torch.testing.assert_close(corr_n, corr_t, rtol=0, atol=0)             # the same product
        exact = rr @ atoms.to(rr.dtype).T
        expected = exact.amax(1) if positive else exact.abs().amax(1)
        tol = 1e-6 if rr.dtype == torch.float32 else 1e-14
        torch.testing.assert_close(worst_n, expected, rtol=tol, atol=0)
        torch.testing.assert_close(worst_t, expected, rtol=tol, atol=0)


@needs_native
def test_kernel_wrappers_refuse_what_would_run_out_of_bounds():
    atoms = torch.nn.functional.normalize(torch.randn(20, 6), dim=1)
    x = torch.randn(3, 6)
    ok = dict(budget=torch.full((3,), 5), tol=torch.full((3,), 1e-4), xx=(x * x).sum(1), bound=4.0, lam=0.1,
              positive=False, momentum=True, restart=True, gap_criterion=True, check_every=10,
              leave_unresolvable=False)
    with pytest.raises(ValueError, match=r"W holds indices outside \[0, 20\)"):
        native.lasso_sets(x, atoms, torch.tensor([[0, 20]] * 3), torch.zeros(3, 2), **ok)
    with pytest.raises(ValueError, match=r"z has shape \(3, 3\), expected \(3, 2\)"):
        native.lasso_sets(x, atoms, torch.tensor([[0, 1]] * 3), torch.zeros(3, 3), **ok)
    with pytest.raises(ValueError, match="gram, b and b_rows go together"):
        native.lasso_sets(x, atoms, torch.tensor([[0, 1]] * 3), torch.zeros(3, 2), gram=atoms @ atoms.T, **ok)
    gram = atoms @ atoms.T
    with pytest.raises(ValueError, match="k=21 must be between 1 and n_atoms=20"):
        native.omp_gram(x @ atoms.T, gram, gram.diagonal().contiguous(), None, 21, None, 1e-6)
    with pytest.raises(ValueError, match=r"diag has shape \(19,\)"):
        native.mp_gram(x @ atoms.T, torch.zeros(3, 20), gram, torch.ones(19), None, 2, None)
