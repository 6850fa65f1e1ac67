"""`sparsecode.data`: every data form becomes the same signals; stores split into training and
comparison ranges; planted data decodes with its dictionary; figures leave the backend alone."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparsecode as sc
from sparsecode import data as sd
from sparsecode.activations import TokenRange
from test_streaming import write_store


def test_every_in_memory_form_gives_the_same_signals(small):
    forms = [small, {"x": small.x, "codes": small.codes}, sd.Signals(small.x, small.codes),
             small.x.numpy(), small.x]
    for form in forms:
        got = sd.as_signals(form)
        assert torch.equal(got.x, small.x)
    assert torch.equal(sd.as_signals(small).codes, small.codes)
    assert sd.as_signals(small).dictionary is small.dictionary
    assert sd.as_signals(small.x).codes is None and sd.as_signals(np.ones((3, 2))).x.dtype == torch.float64
    with pytest.raises(ValueError, match="codes has 2 rows but x has 64"):
        sd.as_signals({"x": small.x, "codes": small.codes[:2]})
    with pytest.raises(ValueError, match="needs an 'x' entry"):
        sd.as_signals({"codes": small.codes})


def test_the_comparison_dictionary_is_given_or_the_datas_own(small, caplog):
    assert torch.equal(sd.with_dictionary(small, "true").dictionary.atoms, small.dictionary.atoms)
    with pytest.raises(ValueError, match="dictionary='true' needs synthetic data"):
        sd.with_dictionary(small.x, None)
    other = sc.synthetic.random_dictionary(20, 16, seed=5, dtype=torch.float64)
    got = sd.with_dictionary(small, other)
    assert got.codes is None and "code metrics skipped" in caplog.text       # 32 true atoms, 20 given
    with pytest.raises(ValueError, match="x has d=16 but the dictionary's atoms have d=4"):
        sd.with_dictionary(small, torch.randn(5, 4))


def test_planted_signals_decode_with_the_given_dictionary_and_split():
    given = sc.Dictionary(torch.randn(12, 6, dtype=torch.float64), torch.arange(6, dtype=torch.float64))
    test, x_train = sd.planted_split(30, 10, k=2, dictionary=given, seed=4, dtype=torch.float64)
    assert test.x.shape == (30, 6) and x_train.shape == (10, 6)
    torch.testing.assert_close(test.x, test.codes @ given.atoms + given.bias)
    assert ((test.codes != 0).sum(1) == 2).all()
    with pytest.raises(ValueError, match="d=5 differ from the dictionary's d=6, n_atoms=12"):
        sd.planted_split(30, 0, d=5, dictionary=given)
    alone, none = sd.planted_split(30, 0, seed=4)
    assert none is None and isinstance(alone, sc.synthetic.SparseData)
    assert (alone.x.shape[1], alone.codes.shape[1]) == (8, 16)                # paper c's default size


def test_a_store_trains_on_its_first_tokens_and_compares_on_the_next(tmp_path):
    x = torch.randn(250, 5) + 2.0
    write_store(tmp_path / "s", x, 60, scale=0.5)
    spec = f"activations:{tmp_path / 's'}"
    source, x_train = sd.comparison_data(spec, 100, 80)
    assert isinstance(source, TokenRange) and (source.start, source.n_tokens) == (80, 100)
    torch.testing.assert_close(source.head(1000), x[80:180] * 0.5)
    torch.testing.assert_close(x_train.head(1000), x[:80] * 0.5)
    read = sd.read_signals(spec, 30, start=10)
    torch.testing.assert_close(read.x, x[10:40] * 0.5)
    assert read.y is None

    streamed = sd.training_data(spec, 120, streams=True)
    assert isinstance(streamed.source, TokenRange) and streamed.source.n_tokens == 120
    assert streamed.input_scale == 0.5
    in_memory = sd.training_data(spec, 120, streams=False)
    torch.testing.assert_close(in_memory.source, x[:120] * 0.5)
    assert sd.open_store(tmp_path / "s") is None                              # a path without the prefix is a file


def test_training_data_scores_a_planted_truth():
    train = sd.training_data(None, 200, streams=True, d=8, n_atoms=16, k=3, seed=0)
    truth = train.truth

    class Oracle:              # the planted codes themselves
        def encode(self, x):
            assert torch.equal(x, truth.x)
            return truth.codes

    scores = train.scores(truth.dictionary, Oracle())
    assert scores["fvu"] < 1e-10 and scores["l0"] == 3.0
    assert scores["dictionary_mcc"] == pytest.approx(1.0) and scores["code_mcc"] == pytest.approx(1.0)


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    code = f"""
import sys, matplotlib
matplotlib.use("pdf")
from sparsecode.plots import firing_histogram, scale_figure
firing_histogram([0.0, 0.02, 0.3, 0.7], r"{tmp_path / 'h.png'}", title="t")
scale_figure([{{"encoder": "omp", "d": 8, "k": 2, "n_atoms": n, "signals_per_s": 10.0 * n}} for n in (16, 32)],
             r"{tmp_path / 's.png'}")
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("h.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_hookpoint_comes_from_the_store_unless_given(tmp_path):
    from sparsecode.activations import DEFAULT_MODEL, Hookpoint
    plain = sc.Dictionary(torch.eye(5))
    alone = Hookpoint.of(plain)
    assert (alone.model, alone.layer, alone.site, alone.scale, alone.seed) == (None, 15, "resid", 1.0, 1)
    store = write_store(tmp_path / "s", torch.randn(40, 5), 20, scale=0.25)
    at = Hookpoint.of(plain, store)
    assert (at.model, at.layer, at.scale) == ("test", 0, 0.25)
    scaled = sc.Dictionary(torch.eye(5), metadata={"input_scale": 0.5})        # the dictionary's record wins
    assert Hookpoint.of(scaled, store, layer=3, site="mlp", model="m") == Hookpoint("m", 3, "mlp", 0.5, 1)
    store.manifest["model"] = DEFAULT_MODEL
    assert Hookpoint.of(plain, store).model is None                             # the embedded SmolLM2
