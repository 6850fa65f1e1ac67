"""A third-party plug-in (tests/plugin_pkg: one file, one entry point) is discovered through its
distribution's entry points and treated exactly like a built-in encoder: listed, compared, used as
the lasso reference, calibrated, given an iteration budget, used by alternating sparse coding and
matched with a speed reference, all from its capabilities, never its name."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsecode as sc
from sparsecode import bench, learning, recovery, registry

PLUGIN = Path(__file__).parent / "plugin_pkg"
NAME = "cd-lasso"


def _entry_points_txt() -> str:
    """The distribution's entry points, as pip would write them from the plug-in's pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    lines = []
    for group, eps in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in registered by a distribution on sys.path (its .dist-info written to tmp_path), as an
    installed package is: the registry finds it through `importlib.metadata` like any other."""
    dist = tmp_path / "sparsecode_plugin_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsecode-plugin-example\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(_entry_points_txt())
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registry._entry_points.cache_clear()
    yield NAME
    registry._entry_points.cache_clear()


@pytest.fixture(scope="module")
def data():
    return sc.synthetic.make_sparse_data(n_samples=64, d=12, n_atoms=24, k=3, seed=3, dtype=torch.float64)


def test_import_sparsecode_imports_no_encoder_module():
    # the framework reaches encoders only through the registry, lazily: importing it loads none
    code = ("import sys, sparsecode; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('sparsecode_encoders', 'encoders', 'sparsecode_plugin_example')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_the_plugin_is_listed_with_its_knobs(plugin):
    info = {e.name: e for e in sc.available_encoders()}[plugin]
    assert info.available and info.family == "lasso"
    assert info.knobs["lam"][0] == 0.1 and "0.5*||x - z D||^2" in info.knobs["lam"][1]
    cls = sc.encoder_class(plugin)
    assert cls.solves_lasso and not cls.trainable and not cls.learns_dictionary


def test_the_plugin_solves_the_lasso_as_the_built_ins_do(plugin, data):
    ours = sc.get_encoder(plugin, lam=0.05, positive=True).fit(data.dictionary).encode(data.x)
    fista = sc.get_encoder("fista", lam=0.05, positive=True, tol=1e-10).fit(data.dictionary).encode(data.x)
    torch.testing.assert_close(ours, fista, atol=1e-6, rtol=0)


def test_compare_reports_the_plugin_like_a_built_in_lasso_solver(plugin, data):
    # the shared lam reaches it (it has that field); objective and gap because it solves the lasso
    res = sc.compare([plugin, "fista", "omp"], data, lam=0.05)
    row, fista = res.row(plugin), res.row("fista")
    assert row["lam"] == 0.05 and res.settings["reference"] == "fista"
    assert row["objective"] == pytest.approx(fista["objective"], rel=1e-6)
    assert abs(row["objective_gap"]) < 1e-6
    assert "objective" not in res.row("omp")
    assert row["flops_per_signal"] > 2 * 12 * 24
    # and it can be the reference itself: FISTA's gap is then measured against coordinate descent
    res = sc.compare(["fista"], data, lam=0.05, reference=plugin)
    assert res.settings["reference"] == plugin and abs(res.row("fista")["objective_gap"]) < 1e-4


def test_calibration_sets_the_plugins_knob(plugin, data):
    enc, l0 = sc.calibrate(plugin, data.dictionary, data.x, 4.0)
    assert l0 == pytest.approx(4.0, abs=0.1)
    assert sc.metrics.mean_l0(enc.encode(data.x)) == pytest.approx(l0)


def test_a_recovery_budget_reaches_the_plugin_through_its_budget_params(plugin):
    def objective(budget):
        records = recovery.recovery("compressed-sensing", encoders=[plugin], seeds=1, n_samples=48, match="none",
                                    budget=budget, grid={"n_atoms": [24], "d": [12], "k": [3], "snr_db": [30]})
        return records[0]["rows"][0]["objective"]
    # one sweep from zero is far from the optimum that a hundred sweeps reach
    assert objective(1) > objective(100) * 1.01


def test_alternating_sparse_coding_takes_its_codes_from_the_plugin(plugin, data):
    assert plugin in learning.inference_methods()
    assert plugin not in learning.learning_methods()        # it learns no dictionary
    learned = sc.learn_dictionary(data.x, "sparse-coding", 24, inference=plugin, lam=0.05, n_iter=3)
    assert learned.encoder.name == plugin and learned.dictionary.atoms.shape == (24, 12)
    assert learned.losses[-1] < learned.losses[0]


def test_the_speed_benchmark_pairs_it_with_the_reference_of_its_problem(plugin):
    assert bench.speed_reference(plugin) == bench.speed_reference("fista") == "spams-lasso"
    assert bench.speed_reference("omp") == "spams-omp"
