import json

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import sparsecode as sc
from sparsecode.cli import app

runner = CliRunner()


def test_list_shows_every_encoder():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("fista", "omp", "spams-lasso", "cvxpy-lasso"):
        assert name in result.output


def test_compare_prints_table_and_saves(tmp_path):
    out = tmp_path / "res.json"
    result = runner.invoke(app, ["compare", "--encoders", "omp,fista", "--n-samples", "200", "--d", "16",
                                 "--n-atoms", "32", "--k", "3", "--set", "fista.lam=0.05", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # the table is headed by the file keys (one name per column on screen and in the file)
    assert "omp" in result.output and "fvu" in result.output and "code_mcc" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["encoder"] == "fista" and rows[1]["lam"] == 0.05
    assert rows[0]["l0"] == 3.0


def test_compare_target_l0(tmp_path):
    out = tmp_path / "res.csv"
    result = runner.invoke(app, ["compare", "--encoders", "omp,fista", "--n-samples", "300", "--d", "16",
                                 "--n-atoms", "32", "--k", "3", "--target-l0", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("encoder,")


def test_compare_from_files(tmp_path):
    data = sc.synthetic.make_sparse_data(n_samples=100, d=16, n_atoms=32, k=3, seed=0)
    save_file({"x": data.x, "codes": data.codes}, str(tmp_path / "data.safetensors"))
    data.dictionary.save(tmp_path / "dict")
    result = runner.invoke(app, ["compare", "--encoders", "omp", "--k", "3", "--data",
                                 str(tmp_path / "data.safetensors"), "--dictionary", str(tmp_path / "dict.safetensors")])
    assert result.exit_code == 0, result.output
    assert "omp" in result.output


def test_compare_errors_exit_2(tmp_path):
    cases = [
        (["--encoders", "fistaa"], "Did you mean 'fista'"),
        (["--encoders", "fista", "--set", "fista.lamb=1"], "Did you mean 'lam'"),
        (["--encoders", "fista", "--set", "omp.k=1"], "not among --encoders"),
        (["--encoders", "fista", "--lam", "-1"], "lam must be >= 0"),
        (["--encoders", "omp", "--k", "12", "--d", "8", "--n-atoms", "16"], "k=12 is larger than d=8"),
        (["--encoders", "omp", "--dictionary", str(tmp_path / "none.safetensors")], "not found"),
        (["--encoders", "omp", "--out", str(tmp_path / "r.txt")], "must end in .json or .csv"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["compare", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    result = runner.invoke(app, ["compare", "--encoders", "omp", "--dictionary", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "not a safetensors file" in result.output


def test_bench_speed_small(tmp_path):
    out = tmp_path / "speed.json"
    result = runner.invoke(app, ["bench", "speed", "--n-samples", "128", "--d", "32", "--n-atoms", "64",
                                 "--k", "4", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["encoder"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["spams-omp"]["ratio"] == 1.0
    assert abs(rows["omp"]["f1"] - rows["spams-omp"]["f1"]) < 0.01
    assert abs(rows["fista"]["objective_gap"]) < 1e-3


def test_train_saves_dictionary_and_encoder(tmp_path):
    out = tmp_path / "learned"
    result = runner.invoke(app, ["train", "--method", "topk", "--n-atoms", "16", "--set", "k=3", "--set", "steps=100",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    D = sc.Dictionary.load(tmp_path / "learned.safetensors")
    assert D.atoms.shape == (16, 8)
    enc = sc.load_encoder(tmp_path / "learned-encoder.safetensors")
    assert enc.name == "topk" and enc.config.k == 3 and enc.config.steps == 100
    # the saved pair goes straight into a comparison on the learned dictionary
    data = sc.synthetic.make_sparse_data(n_samples=100, seed=5)
    save_file({"x": data.x}, str(tmp_path / "x.safetensors"))
    result = runner.invoke(app, ["compare", "--encoders", f"{tmp_path / 'learned-encoder.safetensors'},omp",
                                 "--k", "3", "--data", str(tmp_path / "x.safetensors"),
                                 "--dictionary", str(tmp_path / "learned.safetensors")])
    assert result.exit_code == 0, result.output
    assert "topk" in result.output


def test_train_errors(tmp_path):
    result = runner.invoke(app, ["train", "--method", "topkk", "--n-atoms", "4", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Did you mean 'topk'" in result.output
    result = runner.invoke(app, ["train", "--method", "topk", "--n-atoms", "4", "--set", "kk=2",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Did you mean 'k'" in result.output


def test_compare_joint_and_learned_encoders(tmp_path):
    out = tmp_path / "joint.json"
    result = runner.invoke(app, ["compare", "--joint", "--encoders", "sparse-coding,topk", "--set",
                                 "sparse-coding.inference=omp", "--set", "topk.steps=100", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["encoder"] for r in rows] == ["sparse-coding", "topk"]
    assert all(0 <= r["dictionary_mcc"] <= 1 for r in rows)
    result = runner.invoke(app, ["compare", "--encoders", "topk,fista", "--set", "topk.steps=100"])
    assert result.exit_code == 0, result.output
