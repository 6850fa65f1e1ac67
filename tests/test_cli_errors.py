"""Every expected error of the CLI is one line on stderr and exit code 2, with no traceback; `--debug`
(or SPARSECODE_DEBUG=1) shows the traceback instead. Bad outputs fail before any work."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import sparsecode as sc
from sparsecode.cli import app

runner = CliRunner()


@pytest.fixture
def files(tmp_path):
    """A text file the user owns, a folder, a JSON file that is not ours, a pickle, broken SAE folders."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "cfg.json").write_text('{"d_in": 4}')
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    gen = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(4, 6, generator=gen), "b_enc": torch.zeros(6),
               "W_dec": torch.randn(6, 4, generator=gen), "b_dec": torch.zeros(4)}
    for name, cfg in (("no-d-in", {"d_sae": 6}), ("list-cfg", [4, 6]),
                      ("big-k", {"d_in": 4, "d_sae": 6, "architecture": "topk", "k": 9})):
        (tmp_path / name).mkdir()
        save_file(weights, str(tmp_path / name / "sae_weights.safetensors"))
        (tmp_path / name / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


def _one_line(result, *needles):
    """Exit code 2, exactly one line on stderr, naming every needle, and no traceback anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


def _trained_encoder(path):
    data = sc.synthetic.make_sparse_data(64, 4, 6, 2, seed=0)
    sc.get_encoder("topk", k=2, steps=5).fit(data.dictionary, data.x).save(path)
    return path.with_name(path.name + ".safetensors")


CASES = {
    # readers never write, writers refuse a file of another kind
    "report a text file": (["report", "{t}/notes.txt"], ["notes.txt", "not a sparsecode recovery results file"]),
    "append to a text file": (["bench", "recovery", "--encoders", "omp", "--out", "{t}/notes.txt"],
                              ["notes.txt", "not a sparsecode recovery results file"]),
    # counts
    "no seeds": (["bench", "recovery", "--seeds", "0", "--out", "{t}/r.jsonl"], ["seeds must be >= 1, got 0"]),
    "negative seeds": (["bench", "recovery", "--seeds", "-3", "--out", "{t}/r.jsonl"], ["seeds must be >= 1, got -3"]),
    "no samples": (["compare", "--n-samples", "0"], ["--n-samples must be >= 1, got 0"]),
    "nan snr": (["compare", "--snr-db", "nan"], ["snr_db", "nan"]),
    # outputs checked before any work
    "compare into a folder": (["compare", "--out", "{t}/dir"], ["{t}/dir is a folder"]),
    "compare under a file": (["compare", "--out", "{t}/notes.txt/r.json"], ["notes.txt is a file, not a folder"]),
    "train under a file": (["train", "--n-atoms", "4", "--out", "{t}/notes.txt/d"], ["notes.txt is a file"]),
    "train over a foreign json": (["train", "--n-atoms", "4", "--out", "{t}/cfg"],
                                  ["cfg.json exists and is not a sparsecode dictionary"]),
    "export onto a file": (["export", "--encoder", "{t}/enc.safetensors", "--out", "{t}/notes.txt"],
                           ["notes.txt exists and is not a folder"]),
    "report onto a file": (["report", "{t}/r.jsonl", "--out", "{t}/notes.txt"], ["notes.txt exists and is not a folder"]),
    "bench speed into a folder": (["bench", "speed", "--out", "{t}/dir"], ["{t}/dir is a folder"]),
    "bench recovery into a folder": (["bench", "recovery", "--out", "{t}/dir"], ["{t}/dir is a folder"]),
    "evaluate under a file": (["evaluate", "--dictionary", "{t}/d", "--encoder", "omp", "--out",
                               "{t}/notes.txt/r.json"], ["notes.txt is a file"]),
    "evaluate histogram in a folder": (["evaluate", "--dictionary", "{t}/d", "--encoder", "omp", "--histogram",
                                        "{t}/dir"], ["--histogram", "is a folder"]),
    "extract onto a file": (["extract", "--out", "{t}/notes.txt"], ["notes.txt exists and is not a folder"]),
    # loaders that name the file and the problem
    "json as dictionary": (["compare", "--encoders", "omp", "--dictionary", "{t}/cfg.json", "--d", "4"],
                           ["cfg.json is not a sparsecode dictionary description"]),
    "pickle as dictionary": (["compare", "--encoders", "omp", "--dictionary", "{t}/model.pt"],
                             ["model.pt is a .pt file, not a sparsecode dictionary"]),
    "cfg without d_in": (["compare", "--encoders", "omp", "--dictionary", "{t}/no-d-in", "--d", "4"],
                         ["cfg.json lacks 'd_in'"]),
    "cfg that is a list": (["compare", "--encoders", "omp", "--dictionary", "{t}/list-cfg"],
                           ["cfg.json holds a JSON list"]),
    "top-k above d_sae": (["compare", "--encoders", "omp", "--dictionary", "{t}/big-k"], ["k=9", "(6)"]),
    "unknown learner option": (["train", "--method", "sklearn", "--n-atoms", "4", "--set", "n_iters=3", "--out",
                                "{t}/learned"], ["no option 'n_iters'", "Did you mean 'n_iter'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expected_errors_are_one_line(files, case):
    args, needles = CASES[case]
    before = {p: p.read_bytes() for p in files.rglob("*") if p.is_file()}
    result = runner.invoke(app, [a.format(t=files) for a in args])
    _one_line(result, *(n.format(t=files) for n in needles))
    after = {p: p.read_bytes() for p in files.rglob("*") if p.is_file()}
    assert after == before                                  # nothing written, nothing changed


def test_encoder_files_with_nan_weights_or_no_dictionary(tmp_path):
    path = _trained_encoder(tmp_path / "enc")
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("net.") and tensors[k].ndim == 2)
    bad = {**tensors, name: torch.full_like(tensors[name], float("nan"))}
    save_file(bad, str(path))
    args = ["compare", "--encoders", f"{path},omp", "--d", "4", "--n-atoms", "6", "--k", "2", "--n-train", "0"]
    _one_line(runner.invoke(app, args), f"tensor '{name}' contains NaN or Inf")
    save_file({k: v for k, v in tensors.items() if not k.startswith("dictionary.")}, str(path))
    _one_line(runner.invoke(app, args), "enc.safetensors lacks its dictionary")


def test_a_broken_plugin(monkeypatch):
    from importlib.metadata import EntryPoint
    from sparsecode import registry
    table = {**registry._entry_points(), "broken": EntryPoint("broken", "no_such_module_xyz:Enc", registry.GROUP)}
    monkeypatch.setattr(registry, "_entry_points", lambda: table)
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "broken" in result.stdout and "no_such_module_xyz" in result.stdout
    _one_line(runner.invoke(app, ["compare", "--encoders", "broken,omp"]),
              "encoder 'broken' failed to load from no_such_module_xyz:Enc")


def test_debug_shows_the_traceback(files):
    args = ["report", str(files / "notes.txt")]
    result = runner.invoke(app, ["--debug", *args])
    assert isinstance(result.exception, ValueError) and "not a sparsecode recovery results file" in str(result.exception)
    result = runner.invoke(app, args, env={"SPARSECODE_DEBUG": "1"})
    assert isinstance(result.exception, ValueError)
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SPARSECODE_DEBUG", None)
    plain = subprocess.run([sys.executable, "-m", "sparsecode.cli", *args], capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr + plain.stdout
    assert plain.stderr.strip().splitlines() == [f"error: {files / 'notes.txt'} is not a sparsecode recovery results "
                                                 "file (its first line is not a results header)"]
    debug = subprocess.run([sys.executable, "-m", "sparsecode.cli", "--debug", *args], capture_output=True, text=True,
                           env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr + debug.stdout and "ValueError" in debug.stderr


def test_an_interruption_is_one_line_and_exit_130(tmp_path, monkeypatch):
    import sparsecode.recovery as recovery

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recovery, "run_cell", interrupted)
    result = runner.invoke(app, ["bench", "recovery", "--encoders", "omp", "--out", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 130 and result.stderr.strip().startswith("error: interrupted")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_default_results_file_is_per_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--encoders", "omp", "--grid", "n_atoms=8", "--grid", "d=4", "--seeds", "1", "--n-samples", "16"]
    assert runner.invoke(app, ["bench", "recovery", *args]).exit_code == 0
    assert runner.invoke(app, ["bench", "recovery", "--preset", "compressed-sensing", "--grid", "snr_db=20",
                               "--grid", "d=4", "--grid", "n_atoms=8", "--grid", "k=2", "--seeds", "1",
                               "--encoders", "omp", "--n-samples", "16"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recovery-compressed-sensing.jsonl", "recovery-paper-c.jsonl"]


def test_results_and_exports_replace_only_their_own_kind(files):
    """`compare --out` and `export --out` refuse files that are not theirs, before any work, and leave
    them as they were; an earlier result of theirs is replaced."""
    t = files
    (t / "mine.json").write_text('{"my": "data"}')
    (t / "mine.csv").write_text("a,b\n1,2\n")
    for name in ("mine.json", "mine.csv"):
        result = runner.invoke(app, ["compare", "--encoders", "omp", "--n-samples", "16", "--out", str(t / name)])
        _one_line(result, name, "not a comparison results file")
    assert (t / "mine.json").read_text() == '{"my": "data"}' and (t / "mine.csv").read_text() == "a,b\n1,2\n"
    for name in ("ok.json", "ok.csv"):
        for _ in range(2):           # the second run replaces the first run's results
            result = runner.invoke(app, ["compare", "--encoders", "omp", "--n-samples", "16", "--out", str(t / name)])
            assert result.exit_code == 0, result.output
    assert json.loads((t / "ok.json").read_text())["format"] == "sparsecode.comparison"
    # exporting an SAE folder into itself (or over another tool's SAE) is refused; an export of ours is replaced
    sae = t / "sae"
    sae.mkdir()
    cfg = {"d_in": 4, "d_sae": 6, "architecture": "standard"}
    (sae / "cfg.json").write_text(json.dumps(cfg))
    save_file(load_file(str(t / "no-d-in" / "sae_weights.safetensors")), str(sae / "sae_weights.safetensors"))
    before = (sae / "sae_weights.safetensors").read_bytes()
    _one_line(runner.invoke(app, ["export", "--encoder", str(sae), "--out", str(sae)]), "cfg.json", "refusing")
    assert (sae / "sae_weights.safetensors").read_bytes() == before and json.loads((sae / "cfg.json").read_text()) == cfg
    for _ in range(2):
        result = runner.invoke(app, ["export", "--encoder", str(sae), "--out", str(t / "exported")])
        assert result.exit_code == 0, result.output


def test_a_launch_without_torchruns_variables_is_one_line_naming_the_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["compare", "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: rank 1: could not join the job: WORLD_SIZE is set but LOCAL_RANK is "
                                     "not: start the job with torchrun")
