"""On a CUDA GPU the encoders compute what they compute on the CPU: the same supports and codes for the
pursuits (bfloat16 products included), the same lasso optimum, the same streamed metrics, and a budget
taken from the GPU's free memory. Skipped where no GPU is present."""
import numpy as np
import pytest
import torch

import sparsecode as sc

from sparsecode.memory import free_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def coherent():
    """Overcomplete and noisy, so later picks are close calls: 512 atoms in 64 dimensions."""
    return sc.synthetic.make_sparse_data(n_samples=400, d=64, n_atoms=512, k=6, seed=7, noise=0.05,
                                         dtype=torch.float64)


def _support(codes: torch.Tensor) -> list[set]:
    return [set(np.flatnonzero(row)) for row in codes.cpu().numpy()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant,precision", [("gram", "auto"), ("gram-free", "full"), ("gram-free", "auto")])
@pytest.mark.parametrize("name", ["omp", "mp"])
def test_pursuits_on_the_gpu_equal_the_cpu(coherent, name, variant, precision, dtype):
    D, x = coherent.dictionary.to(dtype=dtype), coherent.x.to(dtype)
    cpu = sc.get_encoder(name, k=10, variant="gram").fit(D).encode(x)
    enc = sc.get_encoder(name, k=10, variant=variant, precision=precision).fit(D.to(device="cuda"))
    info = enc.encode_with_info(x.cuda())
    assert info.codes.device.type == "cuda" and info.codes.dtype == dtype and info.variant == variant
    # on a GPU 'auto' multiplies float32 in bfloat16; float64 stays in full precision
    if variant == "gram-free":
        auto_bf16 = precision == "auto" and dtype == torch.float32
        assert info.precision == ("bfloat16" if auto_bf16 else str(dtype).removeprefix("torch."))
    assert _support(info.codes) == _support(cpu)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(info.codes.cpu(), cpu, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["fista", "ista", "admm"])
def test_lasso_on_the_gpu_reaches_the_cpu_optimum(coherent, name):
    D, x = coherent.dictionary, coherent.x[:100]
    lam = 0.05
    cpu = sc.get_encoder(name, lam=lam, tol=1e-8, max_iter=20000).fit(D).encode(x)
    gpu = sc.get_encoder(name, lam=lam, tol=1e-8, max_iter=20000).fit(D.to(device="cuda")).encode(x.cuda())
    objective = lambda z: (0.5 * ((x - z @ D.atoms) ** 2).sum(1) + lam * z.abs().sum(1)).mean().item()
    assert objective(gpu.cpu()) == pytest.approx(objective(cpu), rel=1e-6)


def test_memory_budget_comes_from_the_gpu():
    free, total = torch.cuda.mem_get_info()
    got = free_memory("cuda")
    assert 0 < got <= total and abs(got - free) < 0.05 * total


def test_compare_on_the_gpu_prints_the_cpu_numbers(coherent):
    kwargs = dict(dictionary=coherent.dictionary.to(dtype=torch.float32), k=6, lam=0.05, reference=None,
                  x_train=coherent.x[:200].float(), encoder_params={"topk": {"steps": 300}})
    data = {"x": coherent.x.float(), "codes": coherent.codes.float()}
    on_cpu = sc.compare(["omp", "fista", "topk"], data, device="cpu", **kwargs)
    on_gpu = sc.compare(["omp", "fista", "topk"], data, device="cuda", **kwargs)
    for name in ("omp", "fista", "topk"):
        for metric in ("fvu", "l0", "f1", "code_mcc"):
            a, b = on_cpu.row(name)[metric], on_gpu.row(name)[metric]
            # topk is trained on each device, from its own random draws: close, not equal
            rel = 0.05 if name == "topk" else 1e-3
            assert b == pytest.approx(a, rel=rel, abs=1e-4), (name, metric)


def test_a_store_streams_to_the_gpu_with_the_cpu_metrics(coherent, tmp_path):
    from test_streaming import write_store
    store = write_store(tmp_path / "store", coherent.x.float(), 70, scale=0.8)
    kwargs = dict(dictionary=coherent.dictionary.to(dtype=torch.float32), k=6, lam=0.05, batch_size=64,
                  reference=None)
    on_cpu = sc.compare(["omp", "fista"], store, device="cpu", **kwargs)
    on_gpu = sc.compare(["omp", "fista"], store, device="cuda", **kwargs)
    for name in ("omp", "fista"):
        for metric in ("fvu", "mse", "l0", "dead", "dense"):
            a, b = on_cpu.row(name)[metric], on_gpu.row(name)[metric]
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (name, metric)


def test_training_on_the_gpu_learns(coherent):
    x = coherent.x.float()
    learned = sc.learn_dictionary(x.cuda(), "topk", n_atoms=512, k=6, steps=400, seed=0)
    codes = learned.encoder.encode(x.cuda())
    assert codes.device.type == "cuda" and learned.dictionary.atoms.device.type == "cuda"
    assert sc.metrics.fvu(x.cuda(), codes @ learned.dictionary.atoms) < 0.5
