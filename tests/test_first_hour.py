"""What a new user meets first: synthetic files, derived knobs, readable results, the HTML report."""
import base64
import html.parser
import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import sparsecode as sc
from sparsecode import training
from sparsecode.cli import app
from sparsecode.defaults import default_k, default_knobs, lam_max
from sparsecode.recovery import recovery
from sparsecode.report import report
from sparsecode.table import fit_columns, format_value, text_table


# --- defaults from data --------------------------------------------------------------------------
def test_default_k_rule():
    assert default_k(8, 16) == 4            # half the dimension
    assert default_k(576, 2304) == 16       # capped at 16
    assert default_k(64, 3) == 3            # never more atoms than there are
    assert default_k(1, 10) == 1            # at least one


def test_default_lam_is_a_tenth_of_the_median_lam_max():
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    x = torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    # by hand: |x D^T| rows are (2, 0, 1.2), (0, 3, 2.4), (1, 1, 1.4): maxima 2, 3, 1.4; median 2
    assert lam_max(x, sc.Dictionary(atoms)).tolist() == pytest.approx([2.0, 3.0, 1.4])
    knobs = default_knobs(x, atoms)
    assert knobs == {"k": 1, "lam": pytest.approx(0.2)}
    # a bias is taken off the signals first: x - b = (1, 0), (-1, -3), (0, 1)
    biased = sc.Dictionary(atoms, bias=torch.tensor([1.0, 0.0]))
    assert lam_max(x, biased).tolist() == pytest.approx([1.0, 3.0, 1.0])
    # with true codes, k is their mean number of non-zeros
    codes = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert default_knobs(x, atoms, codes)["k"] == 2          # round(7 / 3)


def test_default_knobs_bad_input():
    with pytest.raises(ValueError, match="d=2"):
        default_knobs(torch.zeros(3, 5), torch.eye(2))
    with pytest.raises(ValueError, match="lam_max = 0"):
        default_knobs(torch.zeros(3, 2), torch.eye(2))


def test_compare_derives_knobs_it_was_not_given():
    data = sc.synthetic.make_sparse_data(n_samples=200, d=8, n_atoms=16, k=3, seed=4, noise=0.05)
    # signals without codes on an 8-dim dictionary: omp's own default k=16 > d would fail; k = d // 2
    res = sc.compare(["omp", "fista"], {"x": data.x}, data.dictionary, reference=None)
    expected = default_knobs(data.x, data.dictionary)
    assert res.settings["derived"] == expected and expected["k"] == 4
    assert res.row("omp")["k"] == 4 and res.row("omp")["l0"] == pytest.approx(4.0)
    assert res.row("fista")["lam"] == pytest.approx(expected["lam"])
    assert "k=4" in res.title() and "derived from the data" in res.title()
    # the user's knobs win and nothing is derived
    res = sc.compare(["omp", "fista"], data, lam=0.05, reference=None)
    assert res.settings["derived"] == {} and res.row("omp")["k"] == 3 and res.row("fista")["lam"] == 0.05
    assert "derived" not in res.title()


# --- readable results ----------------------------------------------------------------------------
ROWS = [{"encoder": "omp", "k": 3, "fvu": 0.0123456, "l0": 3.0, "f1": 1.0, "signals_per_s": 12345.6,
         "flops_per_signal": 601, "dead": 0.0},
        {"encoder": "fista", "lam": 0.05, "fvu": 2e-5, "l0": 4.1, "f1": 0.9, "signals_per_s": 2000.0,
         "flops_per_signal": 106232, "dead": 0.125}]
COLUMNS = ["encoder", "k", "lam", "fvu", "l0", "f1", "dead", "signals_per_s", "flops_per_signal"]


def test_format_value():
    assert format_value(12345.6) == "12,346" and format_value(2e-5) == "2.00e-05"
    assert format_value(0.0123456) == "0.01235" and format_value(None) == "-" and format_value(float("nan")) == "-"
    assert format_value(106232) == "106,232" and format_value(True) == "True"


def test_fit_columns_keeps_the_important_ones_in_order():
    assert fit_columns(ROWS, COLUMNS, None) == (COLUMNS, [])
    # widths with 3 extra each: encoder 10, k 4, lam 7, fvu 11, l0 6, f1 6, dead 8, signals_per_s 16, flops 19
    shown, left = fit_columns(ROWS, COLUMNS, 1 + 10 + 11 + 6 + 6)
    assert shown == ["encoder", "fvu", "l0", "f1"] and left == ["k", "lam", "dead", "signals_per_s",
                                                                "flops_per_signal"]
    shown, _ = fit_columns(ROWS, COLUMNS, 1 + 10 + 11 + 6 + 6 + 16 + 4)
    assert shown == ["encoder", "k", "fvu", "l0", "f1", "signals_per_s"]      # table order, not priority order
    assert fit_columns(ROWS, COLUMNS, 5)[0] == ["encoder"]                    # the name always stays


def test_text_table_fits_its_width_and_names_what_it_left_out():
    text = text_table(ROWS, COLUMNS, "title", width=40)
    lines = text.splitlines()
    assert lines[0] == "title"
    assert all(len(line) <= 40 for line in lines[1:-1])
    # with 2 extra each: encoder 9, fvu 10, l0 4, f1 4 (28 with the rule), then signals_per_s (15) does not
    # fit, k (3) and lam (6) do, dead (7) does not
    assert lines[1].split() == ["encoder", "k", "lam", "fvu", "l0", "f1"]
    assert lines[2].split() == ["omp", "3", "-", "0.01235", "3", "1"]
    assert lines[-1] == "(not shown to fit 40 columns: dead, signals_per_s, flops_per_signal)"


@pytest.fixture(scope="module")
def result():
    data = sc.synthetic.make_sparse_data(n_samples=128, d=16, n_atoms=32, k=3, seed=5)
    return sc.compare(["omp", "mp"], data, reference=None)


def test_comparison_str_and_repr_are_a_table(result):
    text = result.to_text(width=None)
    assert text.splitlines()[0] == result.title() == "Comparison of 2 encoders on n_samples=128, d=16, n_atoms=32"
    header = text.splitlines()[1].split()
    assert header == result.columns()
    omp_line = text.splitlines()[2].split()
    assert omp_line[0] == "omp" and omp_line[header.index("l0")] == "3"
    assert repr(result) == str(result) and "{" not in str(result)


def test_to_pandas(result):
    pd = pytest.importorskip("pandas")
    frame = result.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == result.columns()
    assert frame["encoder"].tolist() == ["omp", "mp"]
    assert frame.loc[0, "fvu"] == result.row("omp")["fvu"]


def test_to_pandas_without_pandas_names_it(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)          # import pandas now raises ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_pandas()


# --- calibration ---------------------------------------------------------------------------------
def test_calibration_of_an_exact_k_encoder_takes_one_encode_and_reports_progress():
    # noisy signals: OMP keeps selecting until k (noiseless ones it stops once the residual is zero)
    data = sc.synthetic.make_sparse_data(n_samples=200, d=16, n_atoms=32, k=3, seed=6, noise=0.05)
    seen = []
    with training.progress(lambda what, step, steps, loss: seen.append((what, step, steps))):
        enc, l0 = sc.calibrate("omp", data.dictionary, data.x, 5.0)
    assert enc.config.k == 5 and l0 == 5.0
    assert all(what == "calibrating omp's k to L0 5" for what, _, _ in seen)
    steps = [s for _, s, _ in seen]
    assert steps[0] == 0 and steps[-1] == seen[-1][2] and len(seen) == 3          # start, the one try, done
    # a lasso knob: a search, with a step per tried value
    seen.clear()
    with training.progress(lambda what, step, steps, loss: seen.append((what, step, steps))):
        enc, l0 = sc.calibrate("fista", data.dictionary, data.x, 5.0)
    assert abs(l0 - 5.0) <= 0.1 and len(seen) >= 3 and seen[-1][1] == seen[-1][2]


def test_reference_solve_reports_progress_in_steps():
    data = sc.synthetic.make_sparse_data(n_samples=600, d=16, n_atoms=32, k=3, seed=7)
    seen = []
    with training.progress(lambda what, step, steps, loss: seen.append((what, step, steps))):
        res = sc.compare(["fista"], data, lam=0.05, reference="fista")
    ref = [(s, n) for what, s, n in seen if what.startswith("reference fista")]
    assert ref[0] == (0, 600) and ref[-1] == (600, 600) and len(ref) == 4        # 0, 256, 512, 600
    assert abs(res.row("fista")["objective_gap"]) < 1e-4


# --- synth -> compare ----------------------------------------------------------------------------
def test_synth_writes_signals_and_dictionary_that_compare_reads(tmp_path):
    runner = CliRunner()
    out = tmp_path / "signals.safetensors"
    r = runner.invoke(app, ["synth", "--out", str(out), "--n-samples", "100", "--d", "8", "--n-atoms", "16",
                            "--k", "3", "--data-seed", "2"])
    assert r.exit_code == 0, r.output
    tensors = load_file(str(out))
    dictionary = sc.Dictionary.load(tmp_path / "signals-dictionary.safetensors")
    same = sc.synthetic.make_sparse_data(100, 8, 16, 3, seed=2)
    assert torch.equal(tensors["x"], same.x) and torch.equal(tensors["codes"], same.codes)
    assert torch.equal(dictionary.atoms, same.dictionary.atoms)
    # the compare the README shows next: on an 8-dim problem without --k, k comes from the true codes
    r = runner.invoke(app, ["compare", "--encoders", "omp,fista", "--data", str(out), "--dictionary",
                            str(tmp_path / "signals-dictionary.safetensors"), "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "derived from the data" in r.output
    res = __import__("json").loads((tmp_path / "r.json").read_text())
    omp = next(row for row in res["rows"] if row["encoder"] == "omp")
    assert omp["k"] == 3 and omp["f1"] > 0.7
    # a second run replaces its own files; a foreign file is refused
    assert runner.invoke(app, ["synth", "--out", str(out)]).exit_code == 0
    foreign = tmp_path / "mine.safetensors"
    from safetensors.torch import save_file
    save_file({"weights": torch.zeros(2)}, str(foreign))
    r = runner.invoke(app, ["synth", "--out", str(foreign)])
    assert r.exit_code == 2 and "refusing to overwrite" in r.output
    r = runner.invoke(app, ["synth", "--out", str(tmp_path / "s.npy")])
    assert r.exit_code == 2 and ".safetensors" in r.output


def test_cli_table_fits_a_narrow_terminal(tmp_path, monkeypatch):
    from sparsecode import cli
    from rich.console import Console
    buf = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buf, width=70, force_terminal=True, color_system=None))
    cli.print_table(ROWS, COLUMNS, title="t")
    text = buf.getvalue()
    assert "…" not in text and all(len(line) <= 70 for line in text.splitlines())
    assert "not shown at this width: flops_per_signal (all columns: --out FILE.json or .csv)" in " ".join(text.split())


# --- the HTML report -----------------------------------------------------------------------------
class _Page(html.parser.HTMLParser):
    """Checks nesting and collects tables and images."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.cells, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if {"td", "th"} & set(self.stack):
            self.cells.append(data)


@pytest.fixture(scope="module")
def html_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rep")
    path = folder / "sweep.jsonl"
    recovery("paper-c", out=path, encoders=["fista", "omp"], grid={"n_atoms": [8, 16], "d": [4], "k": [2]},
             seeds=1, n_samples=32)
    report(path, folder / "out")
    return folder / "out"


def test_report_html_is_self_contained_and_well_formed(html_report):
    page = _Page()
    text = (html_report / "report.html").read_text()
    page.feed(text)
    page.close()
    assert page.errors == [] and page.stack == []
    assert text.startswith("<!DOCTYPE html>")
    pngs = sorted(p.name for p in html_report.glob("*.png"))
    assert len(page.images) == len(pngs) >= 2
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")          # no file beside the page is needed
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert img["alt"]
    # the ranking table is there with both encoders
    assert "omp" in page.cells and "fista" in page.cells and "code MCC" in page.cells
    assert "src=\"http" not in text and "<script" not in text


def _browser():
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no Chromium on PATH (apt-get install chromium-headless-shell)")
def test_report_html_renders_in_headless_chromium(html_report, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", (html_report / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1200)
    # rendered figures and tables: many rows hold non-white pixels, and more than text alone would give
    assert (pixels < 200).any(axis=1).mean() > 0.2 and pixels.std() > 20


def test_target_l0_on_a_store_with_training_tokens(tmp_path):
    """`compare --target-l0 --data activations:STORE --n-train N` passes the store's training range to
    the comparison; encoders that are not trained must not be given it (they refused a token range)."""
    from test_streaming import write_store
    data = sc.synthetic.make_sparse_data(n_samples=300, d=24, n_atoms=48, k=3, noise=0.05, seed=8)
    store = write_store(tmp_path / "store", data.x, 70)
    res = sc.compare(["omp", "fista"], store.tokens(100, 200), data.dictionary, target_l0=5,
                     x_train=store.tokens(0, 100), reference=None)
    assert res.row("omp")["k"] == 5 and res.row("omp")["l0"] == pytest.approx(5.0)
    assert abs(res.row("fista")["l0"] - 5.0) <= 0.25
