import json

import numpy as np
import pytest
import torch

import sparsecode as sc


@pytest.fixture(scope="module")
def data():
    return sc.synthetic.make_sparse_data(n_samples=400, d=32, n_atoms=64, k=4, seed=11, noise=0.02)


def test_rows_hold_consistent_metrics(data):
    res = sc.compare(["omp", "fista", "mp"], data, lam=0.05)
    assert [r["encoder"] for r in res.rows] == ["omp", "fista", "mp"]
    omp = res.row("omp")
    assert omp["k"] == 4 and omp["l0"] == pytest.approx(4.0)
    assert omp["f1"] > 0.9 and omp["code_mcc"] > 0.9
    codes = sc.get_encoder("omp", k=4).fit(data.dictionary).encode(data.x)
    assert omp["fvu"] == pytest.approx(sc.metrics.fvu(data.x, codes @ data.dictionary.atoms))
    fista = res.row("fista")
    assert fista["lam"] == 0.05
    assert abs(fista["objective_gap"]) < 1e-4          # FISTA is its own reference: gap ~ 0
    assert "objective" not in omp and "objective_gap" not in omp    # OMP does not minimise the lasso objective
    for row in res.rows:
        assert row["signals_per_s"] > 0 and row["flops_per_signal"] > 0
        assert 0 <= row["dead"] <= 1


def test_encoder_params_override_shared_knobs(data):
    res = sc.compare(["omp", "fista"], data, encoder_params={"omp": {"k": 2}, "fista": {"lam": 0.3}})
    assert res.row("omp")["k"] == 2 and res.row("omp")["l0"] == pytest.approx(2.0)
    assert res.row("fista")["lam"] == 0.3


@pytest.mark.parametrize("name", ["fista", "omp", "mp", "spams-lasso"])
def test_target_l0_calibration(data, name):
    res = sc.compare([name], data, target_l0=6.0, reference=None)
    l0 = res.row(name)["l0"]
    tolerance = 0.02 * 6.0 if name not in ("omp", "mp") else 0.5
    assert abs(l0 - 6.0) <= tolerance


def test_lasso_solvers_share_one_calibrated_lam(data, monkeypatch):
    """One problem, several solvers: the first lasso solver is calibrated, the others solve at its lam."""
    import importlib
    compare_module = importlib.import_module("sparsecode.compare")     # the module, not the function
    searched = []
    calibrate = compare_module.calibrate
    monkeypatch.setattr(compare_module, "calibrate", lambda name, *a, **kw: searched.append(name) or
                        calibrate(name, *a, **kw))
    res = sc.compare(["omp", "fista", "admm", "spams-lasso"], data, target_l0=6.0, reference=None)
    assert searched == ["omp", "fista"] and res.settings["lasso_lam_calibrated_by"] == ["fista"]
    lam = res.row("fista")["lam"]
    assert res.row("admm")["lam"] == res.row("spams-lasso")["lam"] == lam
    for name in ("fista", "admm", "spams-lasso"):          # the same solution, so the same L0
        assert abs(res.row(name)["l0"] - 6.0) <= 0.12
    # the non-negative lasso is another problem, calibrated on its own
    res = sc.compare(["fista", "admm"], data, target_l0=6.0, reference=None, encoder_params={"admm": {"positive": True}})
    assert res.settings["lasso_lam_calibrated_by"] == ["fista", "admm"] and res.row("admm")["lam"] != lam


def test_calibrate_returns_knob_value(data):
    enc, l0 = sc.calibrate("fista", data.dictionary, data.x, 3.0)
    assert abs(l0 - 3.0) <= 0.06
    assert enc.config.lam > 0


def test_save_json_and_csv(tmp_path, data):
    res = sc.compare(["omp"], data)
    res.save(tmp_path / "r.json")
    res.save(tmp_path / "r.csv")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"][0]["encoder"] == "omp" and saved["settings"]["n_atoms"] == 64
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("encoder,k,") and lines[1].startswith("omp,4,")
    with pytest.raises(ValueError, match="must end in .json or .csv"):
        res.save(tmp_path / "r.txt")


def test_arrays_and_saved_dictionary(tmp_path, data):
    path = data.dictionary.save(tmp_path / "dict")
    res = sc.compare(["omp"], {"x": data.x.numpy(), "codes": data.codes.numpy()}, path, k=4)
    assert res.row("omp")["f1"] > 0.9
    res = sc.compare(["omp"], data.x, data.dictionary.atoms, k=4)
    assert "f1" not in res.row("omp")                    # no truth given: no code metrics


def test_errors_are_clear(data):
    with pytest.raises(ValueError, match="unknown encoder 'ompp'"):
        sc.compare(["ompp"], data)
    with pytest.raises(ValueError, match="x has d=32 but the dictionary's atoms have d=10"):
        sc.compare(["omp"], data, torch.randn(20, 10), k=2)
    with pytest.raises(ValueError, match="dictionary='true' needs synthetic data"):
        sc.compare(["omp"], data.x)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        sc.compare(["fista"], data, lam=-1.0)
    with pytest.raises(ValueError, match="options given for encoders not compared"):
        sc.compare(["omp"], data, encoder_params={"fista": {"lam": 1.0}})
    assert "target_l0=40 is more than omp can reach" in sc.compare(["omp"], data, target_l0=40).row("omp")["skipped"]
    nan = data.x.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sc.compare(["omp"], {"x": nan}, data.dictionary)


def test_lam_is_only_the_lasso_penalty_and_set_only_when_given(data):
    # Behaviour change: compare's lam used to default to 0.1 and override every encoder with a `lam`
    # field, the SAE penalties included, so relu/ito rows ran at a penalty of another problem. Now
    # `lam` is the lasso's alone, applied only when given; relu, mlp and ito name theirs
    # `l1_coefficient` and keep their own default unless encoder_params sets it.
    res = sc.compare(["relu", "fista", "lista"], data, lam=0.05, x_train=data.x,
                     encoder_params={"relu": {"steps": 5}, "lista": {"steps": 5}})
    relu, fista, lista = res.row("relu"), res.row("fista"), res.row("lista")
    assert relu["l1_coefficient"] == 0.01 and "lam" not in relu
    assert fista["lam"] == 0.05 and lista["lam"] == 0.05      # LISTA's lam is the lasso it unrolls
    # objective and gap only where the encoder solves that lasso (Encoder.solves_lasso)
    assert "objective" in fista and "objective_gap" in fista
    assert not {"objective", "objective_gap"} & (set(relu) | set(lista))
    # not given, lam comes from the data (0.1 x the median lam_max, issue of defaults that fit the
    # problem), is recorded as derived, and still reaches only the lasso's encoders
    res = sc.compare(["fista", "relu"], data, reference=None, x_train=data.x, encoder_params={"relu": {"steps": 5}})
    derived = res.settings["derived"]["lam"]
    lam_max = (torch.as_tensor(data.x) @ data.dictionary.atoms.T).abs().amax(1).median()
    assert derived == pytest.approx(0.1 * float(lam_max), rel=1e-5) and res.settings["lam"] == derived
    assert res.row("fista")["lam"] == derived and "lam" not in res.row("relu")


@pytest.mark.parametrize("name", ["relu", "mlp", "ito"])
def test_l1_coefficient_is_the_lasso_at_lam_per_unit(name):
    # paper c's per-signal loss mean_d (x - zD)^2 + c mean_atoms |z| is (2/d) times the lasso
    # 0.5||x - zD||^2 + lam ||z||_1 at lam = c * d / (2 n_atoms): checked on numbers, not symbols
    cls = sc.encoder_class(name)
    assert cls.knob == "l1_coefficient" and not cls.solves_lasso
    g = torch.Generator().manual_seed(0)
    d, n_atoms, c = 6, 10, 0.3
    atoms, x, z = torch.randn(n_atoms, d, generator=g), torch.randn(d, generator=g), torch.randn(n_atoms, generator=g)
    paper = ((x - z @ atoms) ** 2).mean() + c * z.abs().mean()
    lam = c * cls.lam_per_unit(n_atoms, d)
    lasso = 0.5 * ((x - z @ atoms) ** 2).sum() + lam * z.abs().sum()
    assert float(paper) == pytest.approx(float(2 / d * lasso), rel=1e-6)
