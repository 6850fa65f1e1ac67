"""Inference at scale: the Gram-free pursuits equal the Gram-based ones, variants follow the memory
budget, worker threads change nothing, and `bench scale` writes its results."""
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram
from typer.testing import CliRunner

import sparsecode as sc
from sparsecode.bench import amortised_floor, scale_samples
from sparsecode.cli import app
from sparsecode.parallel import run_blocks


def _support(codes):
    return [set(np.flatnonzero(row)) for row in np.asarray(codes)]


@pytest.mark.parametrize("precision", ["full", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,k,tol", [("omp", 8, None), ("omp", 12, 0.3), ("mp", 8, None), ("mp", 12, 0.3),
                                        ("gradient-pursuit", 8, None), ("gradient-pursuit", 12, 0.3)])
def test_gram_free_equals_gram(coherent, dtype, name, k, tol, precision):
    D, x = coherent.dictionary.to(dtype=dtype), coherent.x.to(dtype)
    gram = sc.get_encoder(name, k=k, tol=tol, variant="gram").fit(D)
    free = sc.get_encoder(name, k=k, tol=tol, variant="gram-free", precision=precision).fit(D)
    # the variant a call ran comes back with its codes (encoders keep no per-call state to read later)
    info_a, info_b = gram.encode_with_info(x), free.encode_with_info(x)
    a, b = info_a.codes, info_b.codes
    assert (info_a.variant, info_b.variant) == ("gram", "gram-free")
    assert info_b.precision == ("bfloat16" if precision == "bfloat16" else str(dtype).removeprefix("torch."))
    assert _support(a.numpy()) == _support(b.numpy())
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_gram_free_omp_matches_sklearn(coherent):
    D, x = coherent.dictionary.atoms.numpy(), coherent.x.numpy()
    ref = orthogonal_mp_gram(D @ D.T, D @ x.T, n_nonzero_coefs=7).T
    ours = sc.get_encoder("omp", k=7, variant="gram-free").fit(coherent.dictionary).encode(coherent.x)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-9)


def test_gram_free_mp_hand_example():
    atoms = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    codes = sc.get_encoder("mp", k=2, variant="gram-free").fit(atoms).encode(torch.tensor([[1.0, 1.0]],
                                                                                           dtype=torch.float64))
    # correlations (1, 1.4) -> atom 1 with 1.4, residual (0.16, -0.12) -> atom 0 with 0.16
    torch.testing.assert_close(codes, torch.tensor([[0.16, 1.4]], dtype=torch.float64))


@pytest.mark.parametrize("precision", ["full", "bfloat16"])
def test_gram_free_non_unit_atoms(coherent, precision):
    scales = torch.linspace(0.3, 3.0, 96, dtype=torch.float64)
    scaled = sc.Dictionary(coherent.dictionary.atoms * scales[:, None])
    ours = sc.get_encoder("omp", k=5, variant="gram-free", precision=precision).fit(scaled).encode(coherent.x)
    unit = sc.get_encoder("omp", k=5, variant="gram").fit(coherent.dictionary).encode(coherent.x)
    torch.testing.assert_close(ours * scales, unit)


def test_low_precision_picks_are_certified_or_recomputed():
    """bfloat16 scores cannot rank atoms whose correlations differ by less than their rounding: the best
    few are re-scored exactly, and rows where an atom outside them might still win are recomputed in full
    precision, so the pick is always the full product's."""
    from sparsecode_encoders.greedy import BF16_ERROR, CANDIDATES, Correlations
    torch.manual_seed(0)
    d, ties = 16, CANDIDATES + 2
    other = torch.randn(48, d)
    other[:, :ties] = 0                              # atoms that see none of the tied coordinates
    atoms = torch.cat([torch.eye(d), torch.nn.functional.normalize(other, dim=1)])
    lead = torch.tensor([1e-4, 1e-3, 1e-2, 5.0, 6.0, 7.0])    # atom 5's lead over nine others at 10
    r = torch.zeros(6, d)
    r[:, :ties] = 10.0
    r[:, 5] += lead
    r[:, ties:] = 0.3 * torch.randn(6, d - ties)
    full = r @ atoms.T
    bound = BF16_ERROR * r.norm(dim=1)
    assert (lead[:3] < bound[:3]).all() and (lead[3:] > 2 * bound[3:]).all()
    corr = Correlations(atoms, torch.ones(atoms.shape[0]), torch.bfloat16)
    pick, value = corr.pick(r)
    assert torch.equal(pick, torch.full((6,), 5)) and torch.equal(full.abs().argmax(1), pick)
    assert corr.recomputed == 3                      # the three near-ties, and only they
    torch.testing.assert_close(value, full[:, 5], rtol=0, atol=0)


def test_low_precision_picks_leave_out_the_atoms_asked():
    """Gradient pursuit picks among the atoms not yet selected: the certified pick with atoms left out
    is the full-precision argmax over the rest, whether it is certified or recomputed."""
    from sparsecode_encoders.greedy import Correlations
    g = torch.Generator().manual_seed(3)
    atoms = torch.nn.functional.normalize(torch.randn(200, 24, generator=g), dim=1)
    r = torch.randn(40, 24, generator=g)
    full = (r @ atoms.T).abs()
    order = full.argsort(dim=1, descending=True)
    for left_out in (1, 3, 12):                   # 12: more than the candidates re-scored
        exclude = order[:, :left_out]
        expected = full.scatter(1, exclude, -1.0).argmax(dim=1)
        for low in (torch.bfloat16, None):
            pick, value = Correlations(atoms, torch.ones(200), low).pick(r, exclude=exclude)
            assert torch.equal(pick, expected)
            torch.testing.assert_close(value, (r @ atoms.T).gather(1, pick[:, None]).squeeze(1))


@pytest.mark.parametrize("name", ["omp", "mp"])
def test_budget_chooses_the_variant(coherent, name):
    D = sc.Dictionary(coherent.dictionary.atoms)
    gram_bytes = 96 * 96 * 8
    small = sc.get_encoder(name, k=4, memory=gram_bytes // 2).fit(D)
    # the variant and working memory a call planned come back with its codes, not as encoder state
    info = small.encode_with_info(coherent.x)
    codes = info.codes
    assert info.variant == "gram-free"
    assert not D.has_gram(torch.float64, "cpu")           # nothing n_atoms^2 was allocated
    assert info.working_bytes <= gram_bytes // 2
    large = sc.get_encoder(name, k=4, memory="1GB").fit(D)
    large_info = large.encode_with_info(coherent.x)
    torch.testing.assert_close(large_info.codes, codes)
    assert large_info.variant == "gram" and D.has_gram(torch.float64, "cpu")


def test_budget_errors_name_the_budget(coherent):
    # one signal needs at least n_atoms correlations (96 x 8 bytes): 500 bytes cannot hold them
    enc = sc.get_encoder("omp", k=4, memory=500).fit(coherent.dictionary)
    with pytest.raises(ValueError, match="memory budget 500 B is too small: one signal"):
        enc.encode(coherent.x)
    enc = sc.get_encoder("omp", k=4, memory="10KB", variant="gram").fit(coherent.dictionary)
    with pytest.raises(ValueError, match=r"memory budget 10 KB is too small for variant='gram'.*73.7 KB"):
        enc.encode(coherent.x)


def test_small_blocks_and_threads_change_nothing(coherent):
    ref = sc.get_encoder("omp", k=6, threads=1).fit(coherent.dictionary).encode(coherent.x)
    before = torch.get_num_threads()
    for variant in ("gram", "gram-free"):
        enc = sc.get_encoder("omp", k=6, threads=3, chunk=7, variant=variant).fit(coherent.dictionary)
        torch.testing.assert_close(enc.encode(coherent.x), ref, atol=1e-12, rtol=1e-10)
    assert torch.get_num_threads() == before              # the workers' single-thread setting is undone


def test_run_blocks_covers_every_row_once_and_raises():
    seen = torch.zeros(103, dtype=torch.long)

    def work(start, stop):
        seen[start:stop] += 1

    run_blocks(103, 10, 3, work)
    assert torch.equal(seen, torch.ones(103, dtype=torch.long))

    # blocks of equal size, as many as a multiple of the workers, never larger than asked
    spans = []
    run_blocks(4096, 1323, 2, lambda start, stop: spans.append((start, stop)))
    assert sorted(spans) == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    spans.clear()
    run_blocks(103, 10, 3, lambda start, stop: spans.append(stop - start))
    assert max(spans) <= 10 and len(spans) % 3 == 0 and sum(spans) == 103

    def fail(start, stop):
        raise ValueError(f"block {start}")

    with pytest.raises(ValueError, match="block"):
        run_blocks(40, 10, 2, fail)


@pytest.mark.parametrize("fields,match", [({"variant": "fast"}, "variant must be one of auto, gram, gram-free"),
                                          ({"chunk": 0}, "chunk must be >= 1"),
                                          ({"threads": -1}, "threads must be >= 0"),
                                          ({"precision": "half"}, "precision must be one of auto, bfloat16, full"),
                                          ({"memory": "lots"}, "'lots'")])
def test_config_is_checked(fields, match):
    with pytest.raises(ValueError, match=match):
        sc.get_encoder("omp", **fields)


def test_amortised_floor_is_the_top_k_of_the_correlations():
    x, atoms = torch.randn(37, 8), torch.randn(50, 8)
    values, indices = amortised_floor(x, atoms, 3, budget=2_000)      # a few signals per block
    ref = (x @ atoms.T).topk(3, dim=1)
    torch.testing.assert_close(values, ref.values)
    assert torch.equal(indices, ref.indices)


def test_scale_samples_shrink_with_the_cell():
    assert scale_samples(256, 4096, 576) == 256
    assert scale_samples(256, 16384, 576) == 64
    assert scale_samples(256, 65536, 2304) == 32
    assert scale_samples(10, 65536, 2304) == 10


def test_bench_scale_cli_writes_json_and_figure(tmp_path):
    out, fig = tmp_path / "scale.json", tmp_path / "scale.png"
    result = CliRunner().invoke(app, ["bench", "scale", "--n-atoms", "48,96", "--d", "16", "--k", "3",
                                      "--n-samples", "40", "--repeats", "1", "--device", "cpu", "--memory", "30KB",
                                      "--encoders", "omp,mp,topk,spams-omp", "--out", str(out), "--figure", str(fig)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["bench"] == "scale" and saved["memory"] == "30KB"
    rows = {(r["n_atoms"], r["encoder"]): r for r in saved["rows"]}
    assert set(rows) == {(n, e) for n in (48, 96) for e in ("floor", "omp", "mp", "topk", "spams-omp")}
    for key in ("signals_per_s", "ratio_to_floor", "peak_memory_mb", "f1", "l0", "variant", "setup_s"):
        assert key in rows[48, "omp"], key
    assert rows[48, "omp"]["f1"] > 0.9 and rows[48, "omp"]["l0"] == pytest.approx(3)
    assert rows[48, "floor"]["ratio_to_floor"] == 1.0
    # 96 x 96 Gram matrices (36.9 KB in float32, 73.7 KB in float64 for SPAMS) do not fit 30 KB
    assert rows[96, "omp"]["variant"] == "gram-free"
    assert "Gram matrix of 73.7 KB" in rows[96, "spams-omp"]["skipped"] and "signals_per_s" not in rows[96, "spams-omp"]
    assert fig.stat().st_size > 1000
    assert "skipped spams-omp at n_atoms=96" in " ".join(result.output.split())


def test_bench_scale_cli_rejects_bad_lists():
    result = CliRunner().invoke(app, ["bench", "scale", "--n-atoms", "4k"])
    assert result.exit_code == 2
    assert "--n-atoms takes whole numbers separated by commas, got '4k'" in result.output


def test_run_blocks_nested_and_after_fork():
    """A call inside a block of another call finishes (it drains its own blocks), and a forked child
    gets worker threads of its own."""
    import os
    import sys
    seen = torch.zeros(16, dtype=torch.long)

    def outer(start, stop):
        for i in range(start, stop):
            run_blocks(4, 1, 2, lambda a, b, i=i: seen.__setitem__(slice(4 * i + a, 4 * i + b), 1))

    run_blocks(4, 1, 2, outer)
    assert bool((seen == 1).all())
    if sys.platform.startswith("linux"):
        pid = os.fork()
        if pid == 0:                                   # the child: exit 0 only if run_blocks finishes
            try:
                got = []
                run_blocks(8, 1, 2, lambda a, b: got.append(a))
                os._exit(0 if sorted(got) == list(range(8)) else 1)
            except BaseException:
                os._exit(1)
        import signal
        import time
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("run_blocks hung in a forked child")
        assert os.waitstatus_to_exitcode(status) == 0
