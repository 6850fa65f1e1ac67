"""Files the user owns: the path rule, atomic writes and the umask, output checks, almost-right inputs,
and recovery results files (foreign files, interrupted lines, resumes with other settings)."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsecode as sc
from sparsecode import _io
from sparsecode.recovery import read_results, recovery
from sparsecode.report import report
from sparsecode.encoder_file import load_encoder

#: the cheapest sweep: OMP needs no training and no calibration
CHEAP = dict(encoders=["omp"], grid={"n_atoms": [8], "d": [4], "k": [2]}, seeds=1, n_samples=32, n_train=0,
             device="cpu")


def _atoms(seed: int, n_atoms: int = 6, d: int = 4) -> torch.Tensor:
    return torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the path rule ---------------------------------------------------------------------------------
def test_stem_strips_only_our_suffixes():
    assert _io.paired("runs/sae.v1") == (_io.Path("runs/sae.v1.safetensors"), _io.Path("runs/sae.v1.json"))
    assert _io.paired("sae.v1.safetensors") == _io.paired("sae.v1.json") == _io.paired("sae.v1")
    assert _io.sibling("out.v2", "-encoder") == _io.Path("out.v2-encoder")
    assert _io.sibling("r.v1.jsonl", "-report", suffixes=(".jsonl",)) == _io.Path("r.v1-report")
    assert _io.stem(".json") == _io.Path(".json")          # a name that is only a suffix is a name


def test_dotted_dictionary_names_are_distinct_files(tmp_path):
    v1, v2 = sc.Dictionary(_atoms(1)), sc.Dictionary(_atoms(2))
    assert v1.save(tmp_path / "sae.v1") == tmp_path / "sae.v1.safetensors"
    v2.save(tmp_path / "sae.v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae.v1.json", "sae.v1.safetensors", "sae.v2.json",
                                                          "sae.v2.safetensors"]
    assert torch.equal(sc.Dictionary.load(tmp_path / "sae.v1").atoms, v1.atoms)
    assert torch.equal(sc.Dictionary.load(tmp_path / "sae.v2.json").atoms, v2.atoms)


def test_dotted_encoder_names_are_distinct_files(tmp_path, small):
    encoders = {}
    for version, steps in (("v1", 5), ("v2", 40)):
        enc = sc.get_encoder("topk", k=3, steps=steps).fit(small.dictionary, small.x)
        enc.save(tmp_path / f"enc.{version}")
        encoders[version] = enc
    for version, enc in encoders.items():
        again = load_encoder(tmp_path / f"enc.{version}")
        assert torch.equal(again.encode(small.x), enc.encode(small.x))
    assert again.config.steps == 40
    first = [next(iter(load_encoder(tmp_path / f"enc.{v}").net.parameters())) for v in ("v1", "v2")]
    assert not torch.equal(*first)                           # two files, two different networks


def test_writers_refuse_files_of_another_kind(tmp_path):
    (tmp_path / "notes.json").write_text('{"mine": true}')
    with pytest.raises(FileExistsError, match="notes.json exists and is not a sparsecode dictionary"):
        sc.Dictionary(_atoms(1)).save(tmp_path / "notes")
    save_file({"x": torch.ones(2, 2)}, str(tmp_path / "data.safetensors"))
    with pytest.raises(FileExistsError, match="data.safetensors exists without a sparsecode dictionary description"):
        sc.Dictionary(_atoms(1)).save(tmp_path / "data")
    assert json.loads((tmp_path / "notes.json").read_text()) == {"mine": True}
    assert torch.equal(load_file(str(tmp_path / "data.safetensors"))["x"], torch.ones(2, 2))
    sc.Dictionary(_atoms(1)).save(tmp_path / "d")
    sc.Dictionary(_atoms(2)).save(tmp_path / "d")            # its own kind is replaced
    assert torch.equal(sc.Dictionary.load(tmp_path / "d").atoms, _atoms(2))


# --- atomic writes keep the umask ----------------------------------------------------------------
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_new_files_get_the_umask_mode(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        sc.Dictionary(_atoms(1)).save(tmp_path / "d")
        _io.write_text(tmp_path / "t.txt", "x")
        recovery("paper-c", out=tmp_path / "r.jsonl", **CHEAP)
    finally:
        os.umask(old)
    for name in ("d.safetensors", "d.json", "t.txt", "r.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("old")
    path.chmod(0o640)
    _io.write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


# --- outputs checked before any work --------------------------------------------------------------
def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        _io.check_writable(tmp_path / "dir", "--out")
    with pytest.raises(NotADirectoryError, match="file is a file, not a folder"):
        _io.check_writable(tmp_path / "file" / "deeper" / "r.json", "--out")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        _io.check_writable(tmp_path / "file", "--out", folder=True)
    with pytest.raises(ValueError, match="must end in .json or .csv"):
        _io.check_writable(tmp_path / "r.txt", "--out", suffixes=(".json", ".csv"))
    assert _io.check_writable(tmp_path / "new" / "deeper" / "r.json", "--out") == tmp_path / "new" / "deeper" / "r.json"
    assert not (tmp_path / "new").exists()                  # nothing is created by a check


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="no permission to write in"):
            _io.check_writable(ro / "r.json", "--out")
    finally:
        ro.chmod(0o700)


# --- reading JSON: one helper, the file and the problem named -----------------------------------
def test_read_json_names_file_and_problem(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="cfg.json holds a JSON list, but SAE config is a JSON object"):
        _io.read_json(path, "SAE config")
    path.write_text('{"d_in": "8"}')
    with pytest.raises(ValueError, match="'d_in' must be an integer, got '8'"):
        _io.read_json(path, "SAE config", {"d_in": int})
    with pytest.raises(ValueError, match="lacks 'd_sae'"):
        _io.read_json(path, "SAE config", {"d_sae": int})
    path.write_text('{"d_in": true}')
    with pytest.raises(ValueError, match="'d_in' must be an integer, got True"):
        _io.read_json(path, "SAE config", {"d_in": int})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        _io.read_json(path, "SAE config")
    with pytest.raises(FileNotFoundError, match="SAE config not found"):
        _io.read_json(tmp_path / "nope.json", "SAE config")


# --- loaders that name the file and what is wrong -------------------------------------------------
def test_dictionary_given_a_json_or_pickle_file_says_what_it_is(tmp_path):
    (tmp_path / "cfg.json").write_text('{"d_in": 4}')
    with pytest.raises(ValueError, match="cfg.json is not a sparsecode dictionary description"):
        sc.Dictionary.load(tmp_path / "cfg.json")
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="model.pt is a .pt file, not a sparsecode dictionary.*pickles are never read"):
        sc.Dictionary.load(tmp_path / "model.pt")


def _trained(tmp_path, small):
    enc = sc.get_encoder("topk", k=3, steps=10).fit(small.dictionary, small.x)
    enc.save(tmp_path / "enc")
    return tmp_path / "enc.safetensors", load_file(str(tmp_path / "enc.safetensors"))


def test_encoder_files_with_nan_wrong_shapes_or_no_dictionary(tmp_path, small):
    path, tensors = _trained(tmp_path, small)
    name = next(k for k in tensors if k.startswith("net.") and tensors[k].ndim == 2)
    bad = dict(tensors)
    bad[name] = bad[name].clone()
    bad[name][1, 0] = float("nan")
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=f"enc.safetensors: tensor '{name}' contains NaN or Inf \\(first at row 1\\)"):
        load_encoder(path)
    bad = dict(tensors)
    bad[name] = torch.zeros(bad[name].shape[0] + 1, bad[name].shape[1], dtype=bad[name].dtype)
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=rf"{name} has shape \({bad[name].shape[0]}, .*needs"):
        load_encoder(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith("dictionary.")}, str(path))
    with pytest.raises(ValueError, match="lacks its dictionary"):
        load_encoder(path)


def _saelens(folder, cfg: dict, n: int = 6, d: int = 4):
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(d, n, generator=gen), "b_enc": torch.zeros(n),
               "W_dec": torch.randn(n, d, generator=gen), "b_dec": torch.zeros(d)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_sae_configs_that_are_almost_right(tmp_path):
    from sparsecode.sae_formats import load_sae
    with pytest.raises(ValueError, match="cfg.json lacks 'd_in'"):
        load_sae(_saelens(tmp_path / "a", {"d_sae": 6}))
    folder = _saelens(tmp_path / "b", {})
    (folder / "cfg.json").write_text("[4, 6]")
    with pytest.raises(ValueError, match="cfg.json holds a JSON list"):
        load_sae(folder)
    with pytest.raises(ValueError, match="k=7 must be an integer between 1 and the number of latents \\(6\\)"):
        load_sae(_saelens(tmp_path / "c", {"d_in": 4, "d_sae": 6, "architecture": "topk", "k": 7}))


def test_pickle_that_fails_under_weights_only(tmp_path):
    from sparsecode.sae_formats import load_sae
    folder = tmp_path / "ae"
    folder.mkdir()
    torch.save({"encoder.weight": torch.ones(6, 4), "extra": np.arange(3)}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": 4,
                                                                "dict_size": 6}}))
    with pytest.raises(ValueError, match="ae.pt cannot be read safely with torch.load\\(weights_only=True\\)"):
        load_sae(folder, allow_pickle=True)
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "dict_size": 6}}))
    with pytest.raises(ValueError, match="config.json \\(trainer\\) lacks 'activation_dim'"):
        load_sae(folder, allow_pickle=True)


# --- errors that blame the right thing ------------------------------------------------------------
@pytest.mark.parametrize("snr_db", [float("nan"), float("inf"), "20"])
def test_snr_db_is_checked_where_it_is_given(snr_db):
    with pytest.raises(ValueError, match="snr_db must be a finite number of decibels"):
        sc.synthetic.make_sparse_data(16, 4, 8, 2, snr_db=snr_db)


def test_unknown_option_of_a_reference_learner(small):
    with pytest.raises(ValueError, match="method 'sklearn' has no option 'n_iters'. Did you mean 'n_iter'.*"
                                         "Options: lam, n_iter, batch_size"):
        sc.learn_dictionary(small.x, "sklearn", 8, n_iters=3)
    with pytest.raises(ValueError, match="method 'sparse-coding' has no option 'foo'"):
        sc.learn_dictionary(small.x, "sparse-coding", 8, foo=1)


def test_a_broken_plugin_is_named(monkeypatch):
    from importlib.metadata import EntryPoint
    from sparsecode import registry
    table = {**registry._entry_points(), "broken": EntryPoint("broken", "no_such_module_xyz:Enc", registry.GROUP)}
    monkeypatch.setattr(registry, "_entry_points", lambda: table)
    with pytest.raises(ImportError, match="encoder 'broken' failed to load from no_such_module_xyz:Enc: "
                                          "ModuleNotFoundError"):
        sc.get_encoder("broken")
    info = {i.name: i for i in registry.available_encoders()}
    assert not info["broken"].available and "no_such_module_xyz" in info["broken"].error
    assert info["omp"].available


# --- recovery results files -----------------------------------------------------------------------
def test_results_file_has_a_header_and_readers_never_write(tmp_path):
    path = tmp_path / "r.jsonl"
    records = recovery("paper-c", out=path, **CHEAP)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "sparsecode.recovery" and header["preset"] == "paper-c"
    assert header["settings"] == {"n_samples": 32, "n_train": 0, "match": "l0", "budget": None, "device": "cpu"}
    assert len(lines) == 2 and read_results(path) == [json.loads(lines[1])]
    assert records[0]["rows"][0]["l0"] == pytest.approx(2.0)
    notes = tmp_path / "notes.txt"
    notes.write_text("line one\n")
    for action in (lambda: read_results(notes), lambda: report(notes, tmp_path / "rep"),
                   lambda: recovery("paper-c", out=notes, **CHEAP)):
        with pytest.raises(ValueError, match="notes.txt is not a sparsecode recovery results file"):
            action()
    assert notes.read_text() == "line one\n" and not (tmp_path / "rep").exists()


def test_an_unterminated_last_record_is_kept_and_a_cut_one_dropped(tmp_path):
    path = tmp_path / "r.jsonl"
    recovery("paper-c", out=path, **{**CHEAP, "seeds": 1})
    full = path.read_text()
    path.write_text(full.rstrip("\n"))                      # the last record lost only its newline
    assert len(read_results(path)) == 1
    assert path.read_text() == full.rstrip("\n")            # reading changed nothing
    recovery("paper-c", out=path, **{**CHEAP, "seeds": 2})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and [json.loads(line)["cell"]["seed"] for line in lines[1:]] == [0, 1]
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])       # interrupted mid-write
    assert len(read_results(path)) == 1
    recovery("paper-c", out=path, **{**CHEAP, "seeds": 2})
    assert [json.loads(line)["cell"]["seed"] for line in path.read_text().splitlines()[1:]] == [0, 1]


def test_resume_runs_only_missing_cells_and_encoders(tmp_path):
    path = tmp_path / "r.jsonl"
    first = recovery("paper-c", out=path, **CHEAP)
    more = recovery("paper-c", out=path, **{**CHEAP, "encoders": ["omp", "mp"], "grid": {**CHEAP["grid"],
                                                                                        "n_atoms": [8, 12]}})
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    # one record for the first run, one for mp on the old cell, one for both on the new cell
    assert [(rec["cell"]["n_atoms"], [r["encoder"] for r in rec["rows"]]) for rec in lines] == \
        [(8, ["omp"]), (8, ["mp"]), (12, ["omp", "mp"])]
    assert [[r["encoder"] for r in rec["rows"]] for rec in more] == [["omp", "mp"], ["omp", "mp"]]
    assert more[0]["rows"][0] == first[0]["rows"][0]       # the finished omp row was not rerun
    assert recovery("paper-c", out=path, **CHEAP) == first and len(path.read_text().splitlines()) == 4


@pytest.mark.parametrize("change, named", [
    ({"n_samples": 48}, "n_samples=32 there, 48 now"),
    ({"match": "none"}, "match='l0' there, 'none' now"),
    ({"budget": 5}, "budget=None there, 5 now"),
    ({"encoder_params": {"omp": {"tol": 0.1}}}, "holds omp run with options {}, not {'tol': 0.1}"),
])
def test_resume_with_other_settings_stops_and_names_the_difference(tmp_path, change, named):
    path = tmp_path / "r.jsonl"
    recovery("paper-c", out=path, **CHEAP)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=named.replace("(", "\\(").replace("{", "\\{").replace("}", "\\}")):
        recovery("paper-c", out=path, **{**CHEAP, **change})
    assert path.read_bytes() == before


def test_presets_do_not_share_a_file(tmp_path):
    from sparsecode.recovery import default_out
    assert default_out("paper-c") != default_out("compressed-sensing")
    path = tmp_path / "r.jsonl"
    recovery("paper-c", out=path, **CHEAP)
    with pytest.raises(ValueError, match="preset='paper-c' there, 'compressed-sensing' now"):
        recovery("compressed-sensing", out=path, **CHEAP)


def test_report_of_a_file_holding_two_presets(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    recovery("paper-c", out=a, **{**CHEAP, "grid": {"n_atoms": [8, 12], "d": [4], "k": [2]}})
    recovery("compressed-sensing", out=b, encoders=["omp"], grid={"snr_db": [10, 30]}, seeds=1, n_samples=16)
    both = tmp_path / "both.jsonl"
    both.write_text(a.read_text() + b.read_text())          # concatenated sweeps
    summary = report(both, tmp_path / "rep").read_text()
    assert "## paper-c" in summary and "## compressed-sensing" in summary
    assert (tmp_path / "rep" / "compressed-sensing-nmse_vs_snr.png").is_file()
    assert (tmp_path / "rep" / "paper-c-mcc_vs_n.png").is_file()


@pytest.mark.parametrize("name, value", [("seeds", 0), ("seeds", -2), ("n_samples", 0), ("n_train", -1)])
def test_counts_are_checked(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"{name} must be >= {0 if name == 'n_train' else 1}, got {value}"):
        recovery("paper-c", out=tmp_path / "r.jsonl", **{**CHEAP, name: value})
    assert not (tmp_path / "r.jsonl").exists()
