"""SAEs from SAELens, sparsify and dictionary_learning: read, run, export."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import sparsecode as sc
from sparsecode.cli import app
from sparsecode.sae_formats import detect_format, export_saelens, load_sae

D_IN, N = 6, 10


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    w = {"enc": torch.randn(N, D_IN, generator=g), "b_enc": 0.1 * torch.randn(N, generator=g),
         "dec": torch.randn(N, D_IN, generator=g) * torch.linspace(0.5, 2.0, N)[:, None],   # non-unit norms
         "b_dec": torch.randn(D_IN, generator=g), "threshold": 0.2 * torch.rand(N, generator=g)}
    x = torch.randn(50, D_IN, generator=g)
    return w, x


def _write_saelens(folder, w, architecture="standard", apply_b_dec=True, k=None, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": w["enc"].T.contiguous(), "b_enc": w["b_enc"], "W_dec": w["dec"], "b_dec": w["b_dec"]}
    if architecture == "jumprelu":
        tensors["threshold"] = w["threshold"]
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", **(extra or {})}
    if k is not None:
        cfg["k"] = k
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _reference(w, x, architecture, center, k=None):
    """Hand-written forward pass of each architecture, in each tool's own orientation."""
    inp = x - w["b_dec"] if center else x
    pre = inp @ w["enc"].T + w["b_enc"]
    if architecture == "relu":
        acts = torch.relu(pre)
    elif architecture == "jumprelu":
        acts = torch.relu(pre) * (pre > w["threshold"]).float()
    else:
        top = torch.relu(pre).topk(k, dim=1)
        acts = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    return acts, acts @ w["dec"] + w["b_dec"]


def _check(folder, w, x, architecture, center, k=None, allow_pickle=False):
    from sparsecode.dictionary import load_sae_dictionary
    dictionary = load_sae_dictionary(folder, allow_pickle=allow_pickle)
    enc = sc.get_encoder("sae-file").fit(dictionary)
    codes = enc.encode(x)
    acts, recon = _reference(w, x, architecture, center, k)
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dictionary.decode(codes), recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dictionary.norms, w["dec"].norm(dim=1))      # norms kept, not normalised
    assert (acts != 0).any()
    return dictionary


@pytest.mark.parametrize("architecture, apply_b_dec", [("standard", True), ("standard", False), ("jumprelu", True),
                                                       ("topk", True)])
def test_saelens(tmp_path, weights, architecture, apply_b_dec):
    w, x = weights
    folder = _write_saelens(tmp_path / "sae", w, architecture, apply_b_dec, k=3 if architecture == "topk" else None)
    assert detect_format(folder) == "saelens"
    _check(folder, w, x, {"standard": "relu"}.get(architecture, architecture), apply_b_dec, k=3)


def test_saelens_old_style_topk_config(tmp_path, weights):
    w, x = weights
    folder = _write_saelens(tmp_path / "sae", w, "standard", True,
                            extra={"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}})
    _check(folder, w, x, "topk", True, k=4)


def test_sparsify(tmp_path, weights):
    w, x = weights
    folder = tmp_path / "layers.3"
    folder.mkdir()
    save_file({"encoder.weight": w["enc"], "encoder.bias": w["b_enc"], "W_dec": w["dec"], "b_dec": w["b_dec"]},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "normalize_decoder": True, "num_latents": N,
                                                 "k": 3, "multi_topk": False, "skip_connection": False,
                                                 "d_in": D_IN}))
    assert detect_format(folder) == "sparsify"
    _check(folder, w, x, "topk", True, k=3)


def _dl_state(w, cls):
    state = {"encoder.weight": w["enc"], "encoder.bias": w["b_enc"], "decoder.weight": w["dec"].T.contiguous()}
    if cls == "AutoEncoder":
        state["bias"] = w["b_dec"]
    else:
        state.update({"b_dec": w["b_dec"], "k": torch.tensor(3, dtype=torch.int32),
                      "threshold": torch.tensor(-1.0)})
    return state


@pytest.mark.parametrize("cls", ["AutoEncoder", "AutoEncoderTopK"])
def test_dictionary_learning_safetensors(tmp_path, weights, cls):
    w, x = weights
    folder = tmp_path / "ae"
    folder.mkdir()
    save_file(_dl_state(w, cls), str(folder / "ae.safetensors"))
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "activation_dim": D_IN,
                                                                "dict_size": N, "k": 3}}))
    assert detect_format(folder) == "dictionary_learning"
    _check(folder, w, x, "relu" if cls == "AutoEncoder" else "topk", True, k=3)


def test_dictionary_learning_pickle_needs_permission(tmp_path, weights):
    w, x = weights
    folder = tmp_path / "ae"
    folder.mkdir()
    torch.save(_dl_state(w, "AutoEncoder"), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D_IN,
                                                                "dict_size": N}}))
    with pytest.raises(ValueError, match="is a pickle file.*allow_pickle=True"):
        load_sae(folder)
    _check(folder, w, x, "relu", True, allow_pickle=True)


def test_classical_encoders_run_on_an_imported_non_unit_decoder(tmp_path, weights):
    w, x = weights
    folder = _write_saelens(tmp_path / "sae", w)
    res = sc.compare(["sae-file", "fista", "omp"], {"x": x}, str(folder), k=3, lam=0.05)
    assert {r["encoder"] for r in res.rows} == {"sae-file", "fista", "omp"}
    assert res.row("fista")["fvu"] < res.row("sae-file")["fvu"] or res.row("fista")["fvu"] < 0.5
    assert res.row("omp")["l0"] == pytest.approx(3.0)


@pytest.mark.parametrize("name, params", [("topk", {"k": 3}), ("relu", {})])
def test_export_import_round_trip(tmp_path, weights, name, params):
    _, x = weights
    data = sc.synthetic.make_sparse_data(n_samples=200, d=D_IN, n_atoms=N, k=2, seed=0)
    enc = sc.get_encoder(name, steps=50, **params).fit(data.dictionary, data.x)
    export_saelens(enc, tmp_path / "out")
    assert detect_format(tmp_path / "out") == "saelens"
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == N
    again = sc.get_encoder("sae-file").fit(str(tmp_path / "out"))
    assert torch.equal(again.encode(x), enc.encode(x))
    assert torch.equal(again.dictionary.atoms, enc.dictionary.atoms)
    # and once more through the exported folder: identical files
    export_saelens(again, tmp_path / "out2")
    assert (tmp_path / "out" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "out2" / "sae_weights.safetensors").read_bytes()


def test_errors(tmp_path, weights):
    w, _ = weights
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not an SAE folder.*found: notes.txt.*cfg.json \\+ sae_weights.safetensors"):
        load_sae(tmp_path / "empty")
    folder = _write_saelens(tmp_path / "gated", w, "gated")
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        load_sae(folder)
    folder = _write_saelens(tmp_path / "bad", w, extra={"d_sae": N + 1})
    with pytest.raises(ValueError, match=r"W_enc has shape \(6, 10\) but the config says \(6, 11\)"):
        load_sae(folder)
    folder = _write_saelens(tmp_path / "norm", w, extra={"normalize_activations": "layer_norm"})
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        load_sae(folder)
    with pytest.raises(ValueError, match="not an SAE encoder"):
        export_saelens(sc.get_encoder("omp", k=2).fit(torch.randn(8, 4)), tmp_path / "x")
    with pytest.raises(ValueError, match="sae-file needs an SAE"):
        sc.get_encoder("sae-file").fit(torch.randn(8, 4))


def test_cli_compare_on_an_sae_folder_and_export(tmp_path, weights):
    w, x = weights
    folder = _write_saelens(tmp_path / "sae", w)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    runner = CliRunner()
    result = runner.invoke(app, ["compare", "--encoders", "sae-file,fista,omp", "--k", "3",
                                 "--data", str(tmp_path / "x.safetensors"), "--dictionary", str(folder)])
    assert result.exit_code == 0, result.output
    assert "sae-file" in result.output
    enc_path = sc.get_encoder("topk", k=2, steps=10).fit(sc.Dictionary(w["dec"]), x).save(tmp_path / "enc")
    result = runner.invoke(app, ["export", "--encoder", str(enc_path), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert detect_format(tmp_path / "exported") == "saelens"
    result = runner.invoke(app, ["compare", "--encoders", "omp", "--dictionary", str(tmp_path)])
    assert result.exit_code == 2 and "not an SAE folder" in " ".join(result.output.split())


@pytest.mark.slow
def test_sparsify_written_by_sparsify_itself(tmp_path):
    """A folder written by EleutherAI's own package (`make test-all` installs eai-sparsify)."""
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    sae = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=N, k=3))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_()
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, N)[:, None])
    sae.save_to_disk(tmp_path / "layers.0")
    x = torch.randn(40, D_IN)
    from sparsecode.dictionary import load_sae_dictionary
    dictionary = load_sae_dictionary(tmp_path / "layers.0")
    codes = sc.get_encoder("sae-file").fit(dictionary).encode(x)
    with torch.no_grad():
        top_acts, top_idx, _ = sae.encode(x)
        expected = torch.zeros(40, N).scatter_(1, top_idx, top_acts)
        torch.testing.assert_close(codes, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dictionary.decode(codes), sae(x).sae_out, atol=1e-5, rtol=1e-5)
