"""Comparisons and training that stream an activation store shard by shard give the in-memory numbers."""
import json

import pytest
import torch

import sparsecode as sc
from sparsecode import _io, metrics
from sparsecode.activations import ActivationStore, FORMAT


def write_store(folder, x, shard_tokens, scale=None):
    """A store holding x (n, d) in shards of `shard_tokens` tokens, written as the extractor lays it out."""
    folder.mkdir()
    shards = []
    for i, part in enumerate(x.split(shard_tokens)):
        name = f"shard-{i:05d}.safetensors"
        _io.write_tensors(folder / name, {"x": part.contiguous()})
        shards.append({"file": name, "n_tokens": part.shape[0]})
    manifest = {"format": FORMAT, "version": 1, "model": "test", "site": "resid", "layer": 0, "d": x.shape[1],
                "dtype": "float32", "n_tokens": x.shape[0], "shards": shards, "keys": ["x"]}
    if scale is not None:
        manifest["normalization"] = {"kind": "unit_mean_squared_norm", "scale": scale}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return ActivationStore(folder)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    # a non-zero mean makes FVU's dataset mean matter; shards of 70 tokens do not align with batches of 64
    data = sc.synthetic.make_sparse_data(n_samples=300, d=24, n_atoms=48, k=3, noise=0.02, seed=3)
    x = data.x + 0.5
    store = write_store(tmp_path_factory.mktemp("s") / "store", x, 70, scale=0.8)
    return x * 0.8, data.dictionary, store


def test_accumulator_equals_the_set_level_metrics():
    torch.manual_seed(1)
    x = torch.randn(103, 7, dtype=torch.float64) * 3 + 10      # large mean: raw sums of squares would cancel
    x_hat = x + 0.1 * torch.randn_like(x)
    codes = torch.zeros(103, 9, dtype=torch.float64)
    codes[:, 0] = 1.0                                          # atom 0 fires on every signal: dense
    codes[::2, 3] = -2.0
    codes[5, 4] = 1.0                                          # atoms 1, 2, 5..8 never fire: dead
    acc = metrics.MetricAccumulator(9)
    for lo, hi in ((0, 1), (1, 40), (40, 41), (41, 103)):
        acc.update(x[lo:hi], x_hat[lo:hi], codes[lo:hi], torch.arange(lo, hi, dtype=torch.float64))
    got = acc.result()
    assert got["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-12)
    assert got["mse"] == pytest.approx(metrics.mse(x, x_hat), rel=1e-12)
    assert got["l0"] == pytest.approx(1 + 52 / 103 + 1 / 103, rel=1e-12)
    assert got["dead"] == pytest.approx(6 / 9)
    assert got["dense"] == pytest.approx(2 / 9)                # atom 0 (all) and atom 3 (52 of 103 > 50%)
    assert got["objective"] == pytest.approx(51.0)             # mean of 0..102


def test_streamed_comparison_equals_in_memory(problem):
    x, dictionary, store = problem
    kwargs = dict(dictionary=dictionary, k=3, lam=0.05, device="cpu")
    names = ["omp", "fista"]
    in_memory = sc.compare(names, x, **kwargs)
    seen = []
    streamed = sc.compare(names, store, batch_size=64, progress=lambda name, done, total: seen.append((name, done, total)),
                          **kwargs)
    assert streamed.settings["n_samples"] == 300
    for name in names:
        a, b = in_memory.row(name), streamed.row(name)
        # only the lasso solver's row has an objective (and a gap to the reference)
        keys = ("fvu", "mse", "l0", "dead", "dense") + (("objective", "objective_gap") if name == "fista" else ())
        assert ("objective" in b) == (name == "fista")
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (name, key)
    assert streamed.row("fista")["uncertified"] == 0
    assert ("omp", 300, 300) in seen and ("fista", 64, 300) in seen


def test_streaming_a_token_range(problem):
    x, dictionary, store = problem
    part = sc.compare(["omp"], store.tokens(100, 150), dictionary=dictionary, k=3, device="cpu", batch_size=32,
                      reference=None).row("omp")
    ref = sc.compare(["omp"], x[100:250], dictionary=dictionary, k=3, device="cpu", reference=None).row("omp")
    for key in ("fvu", "mse", "l0", "dead", "dense"):
        assert part[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="start=300 is outside the store's 300 tokens"):
        store.tokens(300)


@pytest.mark.parametrize("method", ["topk", "relu"])
def test_training_streams_a_store_like_the_same_tensor(problem, method):
    """With batches as large as the store (one full batch per step), streaming and in-memory training
    see the same signals every step; they differ only in the order within a batch, which full-batch
    gradients do not see."""
    x, dictionary, store = problem
    opts = {"steps": 30, "batch_size": 512, "seed": 2, **({"k": 3} if method == "topk" else {})}
    a = sc.get_encoder(method, **opts).fit(dictionary, x)
    b = sc.get_encoder(method, **opts).fit(dictionary, store)
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    torch.testing.assert_close(a.encode(x), b.encode(x), rtol=1e-4, atol=1e-5)


def test_learning_streams_and_a_range_limits_the_data(problem):
    x, _, store = problem
    seen = []
    original = type(store).batches

    def spy(self, batch_size=4096, **kw):
        for xb in original(self, batch_size, **kw):
            seen.append((kw.get("start", 0), kw.get("max_tokens"), xb.x.shape[0]))
            yield xb
    try:
        type(store).batches = spy
        learned = sc.learn_dictionary(store.tokens(0, 200), "topk", 32, k=3, steps=7, batch_size=64, seed=0)
    finally:
        type(store).batches = original
    assert learned.dictionary.atoms.shape == (32, 24) and len(learned.losses) == 7
    # the head sample (200 tokens, one read), then the training's 8 lanes of 25 tokens, each read in
    # batches of its 8 rows a step (3 full ones and a rest of 1 per pass), never past the range
    assert seen[0] == (0, 200, 200)
    lanes = sorted({(start, n) for start, n, _ in seen[1:]})
    assert lanes == [(25 * s, 25) for s in range(8)]
    for lane in lanes:
        assert [size for start, n, size in seen[1:] if (start, n) == lane][:5] == [8, 8, 8, 1, 8]
    with pytest.raises(ValueError, match="needs its signals in memory"):
        sc.learn_dictionary(store, "sparse-coding", 8)
