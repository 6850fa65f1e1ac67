"""Gradient pursuit: OMP's support where OMP is exact, OMP's codes where one gradient step is exact."""
import pytest
import torch

import sparsecode as sc
from sparsecode import metrics


@pytest.mark.parametrize("variant", ["gram", "gram-free"])
def test_same_support_as_omp_on_an_incoherent_problem(incoherent, variant):
    omp = sc.get_encoder("omp", k=5).fit(incoherent.dictionary).encode(incoherent.x)
    assert torch.equal(omp != 0, incoherent.codes != 0)           # OMP is exact here
    gp = sc.get_encoder("gradient-pursuit", k=5, variant=variant).fit(incoherent.dictionary).encode(incoherent.x)
    # where a planted coefficient is tiny (one here is 0.0035) the approximate refit may pick another atom;
    # everywhere else the supports agree
    clear = (incoherent.codes.abs() + (incoherent.codes == 0) * 1e9).amin(1) > 0.05
    assert int(clear.sum()) >= 100
    assert torch.equal(gp[clear] != 0, omp[clear] != 0)
    # one gradient step per pick approximates the least-squares refit: close, not equal
    assert metrics.fvu(incoherent.x, incoherent.dictionary.decode(gp)) < 0.05


def test_variants_agree(small):
    codes = [sc.get_encoder("gradient-pursuit", k=4, variant=v).fit(small.dictionary).encode(small.x)
             for v in ("gram", "gram-free")]
    assert torch.allclose(codes[0], codes[1], atol=1e-10)


def test_orthonormal_dictionary_gives_omp_codes():
    """With orthonormal atoms the gradient on the support is the least-squares correction itself
    (step 1), so gradient pursuit is OMP."""
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    D = sc.Dictionary(q[:7].contiguous())
    x = torch.randn(20, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for variant in ("gram", "gram-free"):
        gp = sc.get_encoder("gradient-pursuit", k=3, variant=variant).fit(D).encode(x)
        omp = sc.get_encoder("omp", k=3).fit(D).encode(x)
        assert torch.allclose(gp, omp, atol=1e-12)


def test_two_steps_by_hand():
    """Atoms e1 and (e1 + e2)/sqrt(2); x = (2, 1). Step 1 picks atom 1 (|corr| 3/sqrt(2) > 2) with code
    3/sqrt(2), leaving r = (0.5, -0.5). Step 2 adds atom 0: g = (0.5, 0) (atom 1's correlation with r is
    0), g D = (0.5, 0), step ||g||^2 / ||g D||^2 = 1, so z0 = 0.5."""
    s = 2 ** -0.5
    D = sc.Dictionary(torch.tensor([[1.0, 0.0], [s, s]], dtype=torch.float64))
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    for variant in ("gram", "gram-free"):
        z = sc.get_encoder("gradient-pursuit", k=2, variant=variant).fit(D).encode(x)[0]
        assert torch.allclose(z, torch.tensor([0.5, 3 * s], dtype=torch.float64))
        z1 = sc.get_encoder("gradient-pursuit", k=1, variant=variant).fit(D).encode(x)[0]
        assert torch.allclose(z1, torch.tensor([0.0, 3 * s], dtype=torch.float64))


def test_each_pick_is_a_new_atom(small):
    codes = sc.get_encoder("gradient-pursuit", k=6).fit(small.dictionary).encode(small.x)
    assert torch.equal((codes != 0).sum(1), torch.full((small.x.shape[0],), 6))


def test_tolerance_stops_early(incoherent):
    codes = sc.get_encoder("gradient-pursuit", k=12, tol=0.3).fit(incoherent.dictionary).encode(incoherent.x)
    r = incoherent.x - incoherent.dictionary.decode(codes)
    assert float(metrics.mean_l0(codes)) < 12
    # a signal stops at the first step that reaches the tolerance (residual within tol of x)
    assert bool((r.norm(dim=1) <= 0.3 * incoherent.x.norm(dim=1) + 1e-9).all())
