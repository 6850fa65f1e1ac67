"""ISTA/FISTA against the exact lasso optimum (cvxpy + Clarabel) and the C++/scikit-learn solvers."""
import numpy as np
import pytest
import torch

import sparsecode as sc
from sparsecode import metrics

SOLVERS = ["ista", "fista"]


def _objective(data, codes, lam):
    return metrics.lasso_objective(data.x, codes, data.dictionary.atoms, lam)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("lam", [0.02, 0.2])
@pytest.mark.parametrize("working_set", [0, 8])
def test_reaches_cvxpy_optimum(lasso_problem, cvxpy_optimum, name, positive, lam, working_set):
    enc = sc.get_encoder(name, lam=lam, positive=positive, tol=1e-8, max_iter=20000,
                         working_set=working_set).fit(lasso_problem.dictionary)
    codes = enc.encode(lasso_problem.x)
    ref = cvxpy_optimum(lam, positive)
    gap = (_objective(lasso_problem, codes, lam) - ref) / ref
    assert float(gap.max()) < 1e-4
    assert float(gap.min()) > -1e-6          # nobody beats the exact optimum
    if positive:
        assert torch.all(codes >= 0)


@pytest.mark.parametrize("name", SOLVERS)
def test_gap_criterion_certifies(lasso_problem, name):
    lam = 0.1
    enc = sc.get_encoder(name, lam=lam, tol=1e-6, criterion="gap", max_iter=20000).fit(lasso_problem.dictionary)
    codes = enc.encode(lasso_problem.x)
    from sparsecode_encoders.iterative import duality_gap
    gaps = duality_gap(lasso_problem.x, codes, lasso_problem.dictionary.atoms, lam)
    assert float(gaps.max()) <= 1e-6


def test_fista_needs_fewer_iterations_than_ista(lasso_problem):
    counts = {}
    for name in SOLVERS:
        enc = sc.get_encoder(name, lam=0.05, tol=1e-7, max_iter=20000, working_set=0).fit(lasso_problem.dictionary)
        # iterations come back with the codes (`Encoded.n_iter`), not as state kept on the encoder
        counts[name] = enc.encode_with_info(lasso_problem.x).n_iter
    assert counts["fista"] < counts["ista"]


@pytest.mark.parametrize("reference", ["spams-lasso", "sklearn-lasso"])
@pytest.mark.parametrize("positive", [False, True])
def test_references_solve_the_same_problem(lasso_problem, cvxpy_optimum, reference, positive):
    lam = 0.1
    enc = sc.get_encoder(reference, lam=lam, positive=positive).fit(lasso_problem.dictionary)
    gap = (_objective(lasso_problem, enc.encode(lasso_problem.x), lam) - cvxpy_optimum(lam, positive)) / cvxpy_optimum(lam, positive)
    assert float(gap.abs().max()) < 1e-4


def test_sklearn_cd_matches_too(lasso_problem, cvxpy_optimum):
    enc = sc.get_encoder("sklearn-lasso", lam=0.1, algorithm="cd", max_iter=10000).fit(lasso_problem.dictionary)
    gap = (_objective(lasso_problem, enc.encode(lasso_problem.x), 0.1) - cvxpy_optimum(0.1, False)) / cvxpy_optimum(0.1, False)
    assert float(gap.abs().max()) < 1e-3


def test_large_lam_gives_zero_codes(lasso_problem):
    lam_max = float((lasso_problem.x @ lasso_problem.dictionary.atoms.T).abs().max())
    codes = sc.get_encoder("fista", lam=lam_max * 1.01).fit(lasso_problem.dictionary).encode(lasso_problem.x)
    assert torch.count_nonzero(codes) == 0


def test_working_set_matches_full_iterations_on_a_large_dictionary():
    data = sc.synthetic.make_sparse_data(n_samples=200, d=64, n_atoms=512, k=6, seed=5, dtype=torch.float64)
    full = sc.get_encoder("fista", lam=0.05, working_set=0, tol=1e-9).fit(data.dictionary).encode(data.x)
    ws = sc.get_encoder("fista", lam=0.05, working_set=16, tol=1e-9).fit(data.dictionary).encode(data.x)
    o_full, o_ws = _objective(data, full, 0.05), _objective(data, ws, 0.05)
    assert float(((o_ws - o_full) / o_full).abs().max()) < 1e-6
    assert torch.equal(full != 0, ws != 0)


def test_non_unit_dictionary_and_bias_are_handled():
    data = sc.synthetic.make_sparse_data(n_samples=10, d=12, n_atoms=20, k=2, seed=6, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    D = sc.Dictionary(data.dictionary.atoms * scales[:, None], bias=bias)
    x = data.x + bias
    lam = 0.05
    ours = sc.get_encoder("fista", lam=lam, tol=1e-9).fit(D).encode(x)
    ref = sc.get_encoder("cvxpy-lasso", lam=lam).fit(sc.Dictionary(D.atoms)).encode(data.x)
    o = metrics.lasso_objective(x, ours, D.atoms, lam, bias)
    r = metrics.lasso_objective(x, ref, D.atoms, lam, bias)
    assert float(((o - r) / r).max()) < 1e-4


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="lam must be >= 0, got -0.1"):
        sc.get_encoder("fista", lam=-0.1)
    with pytest.raises(ValueError, match="criterion must be 'change' or 'gap'"):
        sc.get_encoder("ista", criterion="never")
    with pytest.raises(TypeError, match="no option 'lamda'.*Did you mean 'lam'"):
        sc.get_encoder("fista", lamda=0.1)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        sc.get_encoder("fista", max_iter=0)


@pytest.fixture(scope="module")
def dense_problem():
    """Issue 15's case: dense signals (no sparse structure) and a small lam, where FISTA once stopped at
    max_iter 6% above the optimum without a word."""
    g = torch.Generator().manual_seed(0)
    D = sc.Dictionary(torch.randn(64, 32, generator=g, dtype=torch.float64), normalize=True)
    x = torch.randn(30, 32, generator=g, dtype=torch.float64)
    return D, x


def test_default_fista_is_certified_on_dense_data_with_small_lam(dense_problem):
    D, x = dense_problem
    lam = 0.01
    enc = sc.get_encoder("fista", lam=lam).fit(D)
    assert (enc.config.criterion, enc.config.tol) == ("gap", 1e-4)
    info = enc.encode_with_info(x)
    assert info.uncertified == 0 and info.n_iter > 1
    ours = metrics.lasso_objective(x, info.codes, D.atoms, lam)
    for reference in ("sklearn-lasso", "cvxpy-lasso"):
        ref = metrics.lasso_objective(x, sc.get_encoder(reference, lam=lam).fit(D).encode(x), D.atoms, lam)
        assert float(((ours - ref) / ref).max()) <= 1e-4, reference
    from sparsecode_encoders.iterative import duality_gap
    assert float(duality_gap(x, info.codes, D.atoms, lam).max()) <= 1e-4
    assert torch.equal(enc.encode(x), info.codes)


def test_a_budget_of_iterations_too_small_is_reported(dense_problem, caplog):
    D, x = dense_problem
    enc = sc.get_encoder("fista", lam=0.01, max_iter=20).fit(D)
    with caplog.at_level("WARNING", logger="sparsecode_encoders.iterative"):
        info = enc.encode_with_info(x)
    assert info.uncertified == 30
    assert "fista: 30 of 30 signals reached max_iter=20" in caplog.text
    row = sc.compare([enc], x, dictionary=D, lam=0.01, reference=None).row("fista")
    assert row["uncertified"] == 30
    assert "uncertified" not in sc.compare(["omp"], x, dictionary=D, k=4, reference=None).row("omp")


@pytest.mark.parametrize("name", SOLVERS)
def test_small_budget_iterates_without_the_gram_matrix_in_small_chunks(lasso_problem, cvxpy_optimum, name, monkeypatch):
    from sparsecode_encoders import iterative
    # 40 KB: room for two signals of this problem and no Gram matrix beside them
    assert iterative.lasso_plan(12, 32, 16, torch.float64, 40_000, 8) == (False, 2)
    gram_calls = []
    monkeypatch.setattr(sc.Dictionary, "gram", lambda self, *a: gram_calls.append(a))
    for positive in (False, True):
        enc = sc.get_encoder(name, lam=0.02, positive=positive, tol=1e-8, max_iter=20000, memory="40KB")
        codes = enc.fit(lasso_problem.dictionary).encode(lasso_problem.x)
        gap = (_objective(lasso_problem, codes, 0.02) - cvxpy_optimum(0.02, positive)) / cvxpy_optimum(0.02, positive)
        assert float(gap.max()) < 1e-4 and float(gap.min()) > -1e-6
    assert gram_calls == []


def test_gram_only_where_it_fits_and_pays():
    from sparsecode_encoders.iterative import lasso_plan
    # an SAE-sized dictionary: the 1 GB Gram matrix would fit in 8 GB but 1,000 signals never repay it
    assert lasso_plan(1000, 16384, 576, torch.float32, 8 * 10 ** 9, 8)[0] is False
    # 65,536 atoms: 17 GB, never within a 4 GB budget however many signals
    use_gram, rows = lasso_plan(10 ** 8, 65536, 2304, torch.float32, 4 * 10 ** 9, 8)
    assert use_gram is False and rows * 4 * 2 * 65536 <= 4 * 10 ** 9
    assert lasso_plan(4096, 1024, 256, torch.float32, 10 ** 9, 8)[0] is True


def test_a_budget_below_one_signal_is_a_clear_error(lasso_problem):
    enc = sc.get_encoder("fista", lam=0.1, memory="1KB").fit(lasso_problem.dictionary)
    with pytest.raises(ValueError, match=r"memory budget 1 KB is too small: one signal of the lasso needs .*raise memory"):
        enc.encode(lasso_problem.x)


@pytest.mark.parametrize("shape", [(16, 128, 2048), (160, 64, 256)], ids=["atoms", "gram"])
def test_float32_input_is_certified_at_small_lam(shape):
    # Noiseless signals at a small lam leave a residual far below ||x||: float32 iterations stalled
    # at a gap of about 1e-4 of the objective and ran to max_iter. Working sets that stall go on in float64,
    # so float32 input certifies too, to the same objective.
    n, d, n_atoms = shape
    data = sc.synthetic.make_sparse_data(n_samples=n, d=d, n_atoms=n_atoms, k=8, noise=0.0, seed=0)
    lam = 0.002
    runs = {}
    for dtype in (torch.float32, torch.float64):
        enc = sc.get_encoder("fista", lam=lam, max_iter=3000).fit(data.dictionary)
        runs[dtype] = enc.encode_with_info(torch.as_tensor(data.x, dtype=dtype))
    assert runs[torch.float32].uncertified == 0
    # (a set moves to float64 only once it stalls, after its first round in float32)
    assert runs[torch.float32].n_iter <= 2 * runs[torch.float64].n_iter
    x = torch.as_tensor(data.x, dtype=torch.float64)
    atoms = data.dictionary.atoms.double()
    obj = {t: metrics.lasso_objective(x, r.codes.double(), atoms, lam) for t, r in runs.items()}
    assert np.allclose(obj[torch.float32], obj[torch.float64], rtol=2e-4)


@pytest.mark.parametrize("name", ["admm", pytest.param("cd", marks=pytest.mark.slow), "lca"])
def test_other_solvers_certify_float32_input_at_small_lam(name):
    # As FISTA: at a small lam float32 cannot resolve the gap that certifies (admm and lca ran to max_iter on
    # most of these signals); signals whose gap lies below what float32 resolves go on in float64.
    data = sc.synthetic.make_sparse_data(n_samples=32, d=16, n_atoms=32, k=4, noise=0.0, seed=0)
    lam = 0.002
    runs = {}
    for dtype in (torch.float32, torch.float64):
        enc = sc.get_encoder(name, lam=lam, max_iter=20000 if name == "lca" else 2000).fit(data.dictionary)
        runs[dtype] = enc.encode_with_info(torch.as_tensor(data.x, dtype=dtype))
    assert runs[torch.float64].uncertified == 0 and runs[torch.float32].uncertified == 0
    assert runs[torch.float32].codes.dtype == torch.float32
    assert runs[torch.float32].n_iter <= 1.1 * runs[torch.float64].n_iter
    x = torch.as_tensor(data.x, dtype=torch.float64)
    atoms = data.dictionary.atoms.double()
    obj = {t: metrics.lasso_objective(x, r.codes.double(), atoms, lam) for t, r in runs.items()}
    assert np.allclose(obj[torch.float32], obj[torch.float64], rtol=2e-4)


def test_float32_signals_certified_below_float32_resolution_through_float64_working_sets():
    # tol 1e-8 is below what float32 iterates resolve: stalled working sets go on in float64 and are
    # certified with float64 correlations (one converted copy of the atoms per solve), giving the
    # float64 solve's optimum and certificates
    data = sc.synthetic.make_sparse_data(n_samples=40, d=64, n_atoms=512, k=6, seed=7, dtype=torch.float64,
                                         noise=0.01)
    lam = 0.02
    enc = sc.get_encoder("fista", lam=lam, tol=1e-8, working_set=16)
    single = enc.fit(data.dictionary.to(dtype=torch.float32)).encode_with_info(data.x.float())
    double = enc.fit(data.dictionary).encode(data.x)
    assert single.uncertified == 0
    o32, o64 = _objective(data, single.codes.double(), lam), _objective(data, double, lam)
    assert float(((o32 - o64) / o64).abs().max()) < 1e-6


def test_float64_certifying_correlations_equal_with_or_without_a_whole_copy_of_the_atoms():
    from sparsecode_encoders.iterative import _Checker
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(300, 24, generator=g)
    r = torch.randn(5, 24, generator=g, dtype=torch.float64)
    expected = r @ atoms.double().T
    whole = _Checker(atoms)
    torch.testing.assert_close(whole.correlations(r, block_bytes=10 ** 9), expected, rtol=1e-13, atol=1e-13)
    assert whole._copy is not None                                    # converted once, kept
    sliced = _Checker(atoms)
    # 2 KB of budget: slices of 5 atoms each, never a whole copy
    torch.testing.assert_close(sliced.correlations(r, block_bytes=2 * 24 * 8 * 5), expected, rtol=1e-13, atol=1e-13)
    assert sliced._copy is None


def _near_tie_residuals(atoms, g):
    r = torch.randn(6, atoms.shape[1], generator=g, dtype=torch.float64)
    # row 0 nearly ties atoms 3 and 7 (their correlations differ by about 1e-10, below the resolution of
    # a float32 product, let alone a bfloat16 one): only the exact recomputation ranks them right
    r[0] = 0.45 * (atoms[3] + atoms[7]).double() + 1e-10 * (atoms[3] - atoms[7]).double()
    return r


@pytest.mark.parametrize("positive", [False, True])
def test_precise_certificate_from_a_float32_product_finds_the_float64_largest_correlation(positive):
    from sparsecode_encoders.iterative import MAX_RECHECKED, _Checker
    g = torch.Generator().manual_seed(2)
    atoms = torch.nn.functional.normalize(torch.randn(2000, 64, generator=g), dim=1)
    r = _near_tie_residuals(atoms, g)
    expected_corr = r @ atoms.double().T
    expected = expected_corr.amax(1) if positive else expected_corr.abs().amax(1)
    [(corr, worst)] = _Checker(atoms).check([r], positive, block_bytes=10 ** 9)
    assert corr.dtype == torch.float32
    torch.testing.assert_close(corr.double(), expected_corr, rtol=0, atol=1e-5)
    torch.testing.assert_close(worst, expected, rtol=1e-14, atol=0)
    # a product too coarse to screen (bfloat16 matmuls allowed): every row falls back to float64
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        [(_, coarse)] = _Checker(atoms).check([r], positive, block_bytes=10 ** 9)
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(coarse, expected, rtol=1e-14, atol=0)
    assert MAX_RECHECKED < atoms.shape[0]


@pytest.mark.parametrize("positive", [False, True])
def test_one_bfloat16_check_gives_each_group_its_own_exact_largest_correlation(positive):
    """A round's groups iterate in float32 or float64; one bfloat16 product checks them all, and each
    gets the largest correlation its own dtype computes."""
    from sparsecode_encoders.iterative import _Checker, _product_error
    g = torch.Generator().manual_seed(3)
    atoms = torch.nn.functional.normalize(torch.randn(2000, 64, generator=g), dim=1)
    r64 = _near_tie_residuals(atoms, g)
    r32 = torch.randn(4, 64, generator=g)
    checks = _Checker(atoms, atoms.bfloat16()).check([r32, r64], positive, block_bytes=10 ** 9)
    for r, (corr, worst) in zip((r32, r64), checks):
        assert corr.dtype == torch.bfloat16 and worst.dtype == r.dtype
        exact = r @ atoms.to(r.dtype).T
        expected = exact.amax(1) if positive else exact.abs().amax(1)
        torch.testing.assert_close(worst, expected, rtol=1e-6 if r.dtype == torch.float32 else 1e-14, atol=0)
        # the bound holds the product's error, with room to spare on random data
        error = (corr.double() - r.double() @ atoms.double().T).abs() / r.double().norm(dim=1, keepdim=True)
        assert float(error.max()) <= _product_error(torch.bfloat16, torch.device("cpu"), 64)


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_block_step_holds_when_ones_are_orthogonal_to_the_top_eigenvector(kernel):
    """Two atoms at 120 degrees: their Gram block [[1, -1/2], [-1/2, 1]] has ones as the eigenvector of
    1/2, its largest eigenvalue is 3/2. A power iteration started from ones estimated 1/2, and FISTA
    with the step 2 diverged to NaN."""
    from sparsecode import native
    from sparsecode_encoders.iterative import _block_lipschitz
    if kernel == "native" and not native.available():
        pytest.skip("no C compiler builds the kernels here")
    block = torch.tensor([[[1.0, -0.5], [-0.5, 1.0]]], dtype=torch.float64)
    assert float(_block_lipschitz(block, 10.0)) >= 1.5
    # 50 atoms in 3 dimensions: sets of two such atoms came up, and the codes were NaN
    data = sc.synthetic.make_sparse_data(n_samples=7, d=3, n_atoms=50, k=3, seed=1, noise=0.1)
    lam = 0.3
    info = sc.get_encoder("fista", lam=lam, working_set=1, kernel=kernel).fit(data.dictionary).encode_with_info(data.x)
    assert bool(torch.isfinite(info.codes).all()) and info.uncertified == 0
    ref = sc.get_encoder("cvxpy-lasso", lam=lam).fit(data.dictionary).encode(data.x)
    ours, best = (_objective(data, c.double(), lam) for c in (info.codes, ref))
    assert float(((ours - best) / best).max()) < 1e-4        # within the certified gap


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("positive", [False, True])
def test_a_residual_that_is_not_finite_is_never_within_the_dual_constraint(compiled, positive):
    from sparsecode import native
    from sparsecode_encoders.iterative import _Checker
    if compiled and not native.available():
        pytest.skip("no C compiler builds the kernels here")
    g = torch.Generator().manual_seed(5)
    atoms = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    r = torch.randn(3, 16, generator=g)
    r[1, 4] = float("nan")
    [(_, worst)] = _Checker(atoms, atoms.bfloat16(), compiled).check([r], positive, block_bytes=10 ** 9)
    assert bool(torch.isnan(worst[1])) and bool(torch.isfinite(worst[[0, 2]]).all())
