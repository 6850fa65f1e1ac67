"""Recovery sweeps (resume, impossible cells), calibration, and the report."""
import json
import re

import pytest
from typer.testing import CliRunner

import sparsecode as sc
from sparsecode.cli import app
from sparsecode.recovery import read_results, recovery
from sparsecode.report import report

TINY = dict(encoders=["fista", "omp", "topk"], grid={"n_atoms": [8, 16], "d": [4], "k": [2, 5]}, seeds=2,
            n_samples=64, n_train=128, encoder_params={"topk": {"steps": 60}})
TIMING = {"encode_s", "signals_per_s", "fit_s"}


def _stable(records):
    return [{"cell": r["cell"], "rows": [{k: v for k, v in row.items() if k not in TIMING} for row in r["rows"]]}
            for r in records]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "full.jsonl"
    return path, recovery("paper-c", out=path, **TINY)


def test_sweep_writes_every_cell_and_skips_impossible_ones(sweep):
    path, records = sweep
    header, *lines = path.read_text().splitlines()
    assert json.loads(header)["format"] == "sparsecode.recovery"
    assert len(lines) == len(records) == 2 * 2 * 2          # n_atoms x k x seeds
    cells = [json.loads(line)["cell"] for line in lines]
    assert {(c["n_atoms"], c["k"], c["seed"]) for c in cells} == {(n, k, s) for n in (8, 16) for k in (2, 5)
                                                                   for s in (0, 1)}
    for rec in records:
        omp = next(r for r in rec["rows"] if r["encoder"] == "omp")
        if rec["cell"]["k"] > rec["cell"]["d"]:
            assert "k=5 > d=4" in omp["skipped"]
        else:
            assert omp["l0"] == pytest.approx(2.0)
        fista = next(r for r in rec["rows"] if r["encoder"] == "fista")
        if rec["cell"]["k"] > rec["cell"]["d"]:      # no lam gives a lasso solution more than d non-zeros
            assert "target_l0=5 is more than d=4" in fista["skipped"] and "matched_l0" not in fista
        else:
            assert fista["matched_l0"] and "code_mcc" in fista


def test_lasso_solvers_in_a_cell_share_the_calibrated_lam(tmp_path):
    # the preset's fista solves the non-negative lasso: ista (signed) is calibrated apart, admm shares its lam
    (record,) = recovery("paper-c", out=tmp_path / "r.jsonl", encoders=["fista", "ista", "admm", "omp"],
                         grid={"n_atoms": [16], "d": [8], "k": [3]}, seeds=1, n_samples=128)
    fista, ista, admm = (next(r for r in record["rows"] if r["encoder"] == name) for name in ("fista", "ista", "admm"))
    assert admm["lam"] == ista["lam"] != fista["lam"] and admm["matched_l0"] and ista["matched_l0"]
    assert admm["l0"] == pytest.approx(ista["l0"], abs=0.05) and abs(ista["l0"] - 3) <= 0.06


def test_impossible_k_larger_than_n_atoms(tmp_path):
    records = recovery("paper-c", out=tmp_path / "r.jsonl", encoders=["fista"], grid={"n_atoms": [4], "d": [8],
                                                                                      "k": [6]}, seeds=1, n_samples=32)
    assert "k=6 > n_atoms=4" in records[0]["skipped"] and records[0]["rows"] == []


def test_resume_skips_finished_cells_and_matches(sweep, tmp_path):
    path, records = sweep
    lines = path.read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])   # header, 3 cells, half a cell
    seen = []
    resumed = recovery("paper-c", out=partial, callback=lambda i, n, rec: seen.append(rec), **TINY)
    assert _stable(resumed) == _stable(records)
    assert len(partial.read_text().splitlines()) == len(lines)
    for first, again in zip(lines[:4], partial.read_text().splitlines()[:4]):
        assert first == again                                # finished cells were not rerun


@pytest.mark.parametrize("name", ["fista", "omp", "topk"])
def test_calibration_hits_target(name):
    data = sc.synthetic.make_sparse_data(n_samples=300, d=16, n_atoms=32, k=3, noise=0.02, seed=2)
    params = {"steps": 80} if name == "topk" else {}
    enc, l0 = sc.calibrate(name, data.dictionary, data.x, 5.0, params=params, x_train=data.x)
    assert abs(l0 - 5.0) <= max(0.02 * 5.0, 0.05) or (name == "topk" and abs(l0 - 5.0) <= 0.1)


def test_report_renders_every_figure_and_the_table(sweep, tmp_path):
    path, records = sweep
    summary = report(path, tmp_path / "rep")
    for name in ("phase_transition.png", "mcc_vs_n.png", "pareto.png"):
        png = tmp_path / "rep" / name
        assert png.is_file() and png.stat().st_size > 5000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = summary.read_text()
    assert "## Ranking" in text and "phase_transition.png" in text and "k=5 > d=4" in text
    # the table's code MCC of each encoder is the mean over its runs
    for name in ("fista", "omp", "topk"):
        values = [r["code_mcc"] for rec in records for r in rec["rows"] if r["encoder"] == name and "code_mcc" in r]
        row = re.search(rf"\| `{name}` \| (\d+) \| ([0-9.]+) \|", text)
        assert int(row.group(1)) == len(values)
        assert float(row.group(2)) == pytest.approx(sum(values) / len(values), abs=6e-4)


def test_snr_figure_for_compressed_sensing(tmp_path):
    path = tmp_path / "cs.jsonl"
    recovery("compressed-sensing", out=path, encoders=["omp", "fista"], grid={"snr_db": [10, 30]}, seeds=1,
             n_samples=32)
    report(path, tmp_path / "rep")
    assert (tmp_path / "rep" / "nmse_vs_snr.png").stat().st_size > 5000


def test_bad_input():
    with pytest.raises(ValueError, match="unknown preset 'paper'.*Did you mean 'paper-c'"):
        recovery("paper")
    with pytest.raises(ValueError, match="unknown encoder 'fistaa'"):
        recovery("paper-c", encoders=["fistaa"])
    with pytest.raises(ValueError, match="unknown grid axes"):
        recovery("paper-c", grid={"atoms": [3]})


def test_cli_bench_recovery_and_report(tmp_path):
    out = tmp_path / "r.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "recovery", "--encoders", "omp,fista", "--grid", "n_atoms=8,16",
                                 "--grid", "d=8", "--seeds", "1", "--n-samples", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(read_results(out)) == 2
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r-report" / "report.md").is_file()
    result = runner.invoke(app, ["bench", "recovery", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset" in result.output


def test_threshold_encoders_are_calibrated_and_matched_l0_is_measured(tmp_path):
    # batch-topk is trained once and its inference threshold set to the planted k; mp with k steps may pick
    # an atom twice, so its row is matched only where its measured L0 is k
    records = recovery("paper-c", out=tmp_path / "r.jsonl", encoders=["batch-topk", "mp", "omp"],
                       grid={"n_atoms": [16], "d": [8], "k": [3]}, seeds=1, n_samples=256, n_train=256,
                       encoder_params={"batch-topk": {"steps": 60}})
    rows = {r["encoder"]: r for r in records[0]["rows"]}
    topk = rows["batch-topk"]
    assert abs(topk["l0"] - 3) <= 0.06 and topk["matched_l0"] and topk["threshold"] > 0 and topk["k"] == 3
    for name in ("mp", "omp"):
        assert rows[name]["matched_l0"] == (abs(rows[name]["l0"] - 3) <= 0.06)
    assert rows["omp"]["matched_l0"] and rows["mp"]["l0"] <= 3
