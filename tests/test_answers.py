"""Every answer is what it claims: objective gaps, typed configs, the comparison's reference,
reachability of a target L0, planted signals for a saved dictionary."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch

import sparsecode as sc
import sys

import sparsecode.sae_formats  # noqa: F401  (sc.sae_formats below)
from sparsecode import metrics, registry

compare_mod = sys.modules["sparsecode.compare"]
from sparsecode.encoder import Encoder, EncoderConfig


@pytest.fixture(scope="module")
def data():
    return sc.synthetic.make_sparse_data(n_samples=200, d=16, n_atoms=32, k=3, seed=5, noise=0.01)


# --- objective gaps ---------------------------------------------------------------------------
def test_relative_gap_is_relative_to_the_optimum_and_absent_when_the_optimum_is_zero():
    obj, ref = torch.tensor([1.5, 2.5]), torch.tensor([1.0, 2.0])
    trivial = torch.tensor([10.0, 10.0])
    assert metrics.relative_gap(obj, ref, trivial) == pytest.approx(1.0 / 3.0)
    assert metrics.excess_objective(obj, ref) == pytest.approx(0.5)
    # optimum 1e-12 against a zero-code objective of 20: the ratio would be 1e11, it is undefined instead
    assert math.isnan(metrics.relative_gap(torch.tensor([1e-3, 0.0]), torch.tensor([1e-12, 0.0]), trivial))
    assert metrics.excess_objective(torch.tensor([1e-3, 0.0]), torch.tensor([0.0, 0.0])) == pytest.approx(5e-4)


def test_lam_zero_reports_the_absolute_gap_not_a_huge_ratio(caplog):
    tiny = sc.synthetic.make_sparse_data(n_samples=8, d=6, n_atoms=12, k=2, seed=5, dtype=torch.float64)
    with caplog.at_level(logging.WARNING):
        row = sc.compare(["fista"], tiny, lam=0.0, reference="sklearn-lasso").row("fista")
    assert "objective_gap" not in row
    # 12 atoms in 6 dimensions reconstruct exactly at lam=0: both objectives are ~0 per signal
    trivial = float((0.5 * tiny.x ** 2).sum(1).mean())
    assert 0 <= row["objective"] < 1e-6 * trivial
    assert abs(row["objective_excess"]) < 1e-6 * trivial
    assert "relative gap is undefined" in caplog.text


# --- typed configs -----------------------------------------------------------------------------
def test_config_fields_are_type_checked_at_construction():
    with pytest.raises(TypeError, match="option positive takes True or False, got 'no'"):
        sc.get_encoder("fista", positive="no")
    with pytest.raises(TypeError, match=r"option k takes an integer, got 3\.0"):
        sc.get_encoder("omp", k=3.0)
    with pytest.raises(TypeError, match="option k takes an integer, got True"):
        sc.get_encoder("omp", k=True)
    with pytest.raises(TypeError, match="option lam takes a number, got '0.1'"):
        sc.get_encoder("fista", lam="0.1")
    with pytest.raises(TypeError, match=r"option memory takes .*, got 4\.5"):
        sc.encoder.MemoryConfig(memory=4.5)
    # the config class itself checks, not only get_encoder
    with pytest.raises(TypeError, match="option steps takes an integer"):
        sc.encoder_class("topk").Config(steps=10.0)
    # lossless conversions: numpy integers to int, ints to float
    enc = sc.get_encoder("omp", k=np.int64(3))
    assert enc.config.k == 3 and type(enc.config.k) is int
    enc = sc.get_encoder("fista", lam=1, positive=np.bool_(True))
    assert enc.config.lam == 1.0 and type(enc.config.lam) is float and enc.config.positive is True


@dataclass(frozen=True)
class _PluginConfig(EncoderConfig):
    mode: Literal["fast", "exact"] = "fast"
    """A choice."""
    limit: int | None = None
    """An optional integer."""
    ratio: float = 0.5
    """A number."""


def test_a_third_party_config_gets_the_same_checks():
    assert _PluginConfig(mode="exact", limit=None, ratio=1).ratio == 1.0
    with pytest.raises(TypeError, match="option mode takes one of 'fast', 'exact', got 'slow'"):
        _PluginConfig(mode="slow")
    with pytest.raises(TypeError, match=r"option limit takes int or None, got 2\.5"):
        _PluginConfig(limit=2.5)
    # --set parses text by the same annotations
    assert sc.encoder.coerce_field(_PluginConfig, "mode", "exact") == "exact"
    with pytest.raises(ValueError, match="mode takes one of"):
        sc.encoder.coerce_field(_PluginConfig, "mode", "slow")
    with pytest.raises(TypeError, match="option ratio"):
        dataclasses.replace(_PluginConfig(), ratio="x")


# --- the reference of the objective gap ---------------------------------------------------------
def test_solves_lasso_is_a_capability_of_the_class():
    assert sc.encoder_class("fista").solves_lasso and sc.encoder_class("sklearn-lasso").solves_lasso
    assert not sc.encoder_class("omp").solves_lasso and not sc.encoder_class("lista").solves_lasso

    class Lasso2(Encoder):
        family = "lasso"

    class NotQuite(Encoder):
        family = "lasso"
        solves_lasso = False

    class Custom(Encoder):
        family = "mine"
        solves_lasso = True

    assert Lasso2.solves_lasso and not NotQuite.solves_lasso and Custom.solves_lasso


def _count_reference_steps():
    seen = []

    def on_step(what, step, steps, loss):
        if what.startswith("reference") and step == steps:
            seen.append(what)
    return seen, on_step


def test_auto_reference_is_computed_once_per_lam_and_only_for_lasso_rows(data):
    seen, on_step = _count_reference_steps()
    with sc.training.progress(on_step):
        res = sc.compare(["fista", "ista", "omp"], data, lam=0.05)
    assert res.settings["reference"] == "fista"
    assert seen == ["reference fista (lam=0.05)"]              # one solve, shared by both lasso rows
    assert abs(res.row("fista")["objective_gap"]) < 1e-4
    assert res.row("ista")["objective_gap"] >= -1e-6
    assert "objective" not in res.row("omp")


def test_reference_matches_each_rows_positivity(data):
    res = sc.compare(["fista"], data, lam=0.05, encoder_params={"fista": {"positive": True}})
    # the reference solves the constrained problem too; against the unconstrained one the gap would be > 0
    assert abs(res.row("fista")["objective_gap"]) < 1e-4


def test_reference_choices(data, monkeypatch):
    res = sc.compare(["omp"], data)
    assert res.settings["reference"] is None                      # no lasso encoder: nothing to refer to
    res = sc.compare(["fista"], data, reference="none")
    row = res.row("fista")
    assert "objective" in row and "objective_gap" not in row and res.settings["reference"] is None
    monkeypatch.setattr(compare_mod, "AUTO_REFERENCE_MAX", 100)
    res = sc.compare(["fista"], data)
    assert res.settings["reference"] is None and "objective_gap" not in res.row("fista")
    with pytest.raises(ValueError, match="reference 'omp' does not solve the lasso objective; lasso solvers: .*fista"):
        sc.compare(["fista"], data, reference="omp")
    with pytest.deprecated_call():
        res = sc.compare(["fista"], data, gap_reference=None)
    assert res.settings["reference"] is None


# --- reachability of a target L0 ----------------------------------------------------------------
class _EP:
    def __init__(self, cls):
        self.cls, self.value = cls, f"tests:{cls.__name__}"

    def load(self):
        return self.cls


@dataclass(frozen=True)
class _CappedConfig(EncoderConfig):
    lam: float = 0.1
    """Threshold."""


class _Capped(Encoder):
    """Soft-thresholded correlations, at most two non-zeros per signal, whatever lam."""

    name = "capped"
    family = "test"
    knob = "lam"
    Config = _CappedConfig
    fits = 0

    def _fit(self, x):
        type(self).fits += 1

    def _encode(self, x):
        c = x @ self.dictionary.atoms_as(x.dtype, x.device).T
        c = torch.sign(c) * torch.clamp_min(c.abs() - self.config.lam, 0)
        keep = c.abs().topk(2, dim=1).indices
        return torch.zeros_like(c).scatter_(1, keep, c.gather(1, keep))


@pytest.fixture
def capped(monkeypatch):
    eps = dict(registry._entry_points())
    eps["capped"] = _EP(_Capped)
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    _Capped.fits = 0
    return _Capped


def test_unreachable_target_is_refused_before_searching(data, capped):
    with pytest.raises(compare_mod.Unreachable, match=r"out of capped's reach: .* its mean L0 is 2 "):
        sc.calibrate("capped", data.dictionary, data.x, 5.0)
    assert capped.fits == 1                                        # the densest end only, no bisection
    enc, l0 = sc.calibrate("capped", data.dictionary, data.x, 1.5)   # reachable: searched as before
    assert abs(l0 - 1.5) <= 0.05 and capped.fits > 2


def test_lasso_target_above_d_is_refused_without_solving(data, monkeypatch):
    calls = []
    monkeypatch.setattr(compare_mod, "get_encoder", lambda *a, **k: calls.append(a) or sc.get_encoder(*a, **k))
    with pytest.raises(compare_mod.Unreachable, match="more than d=16: a lasso solution has at most d non-zeros"):
        sc.calibrate("fista", data.dictionary, data.x, 20.0)
    assert calls == []
    res = sc.compare(["fista", "omp"], data, target_l0=20.0)      # the reachable rows still run
    assert "more than d=16" in res.row("fista")["skipped"]
    assert "more than omp can reach here" in res.row("omp")["skipped"]


# --- a saved dictionary without data: signals are planted in it ----------------------------------
def test_planted_signals_decode_with_the_given_dictionary_and_its_bias():
    atoms = sc.synthetic.random_dictionary(24, 12, seed=3).atoms * 2.0      # non-unit atoms, as SAE decoders
    bias = torch.linspace(-1, 1, 12)
    D = sc.Dictionary(atoms, bias)
    data = sc.synthetic.make_sparse_data(50, 12, 24, 2, dictionary=D, seed=4)
    torch.testing.assert_close(data.x, data.codes @ atoms + bias)
    assert ((data.codes != 0).sum(1) == 2).all()


def test_cli_compare_with_a_dictionary_and_no_data_plants_in_it(tmp_path):
    from typer.testing import CliRunner
    from sparsecode.cli import app
    D = sc.synthetic.random_dictionary(24, 12, seed=3)
    D.save(tmp_path / "dict")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["compare", "--encoders", "omp,fista", "--dictionary",
                                      str(tmp_path / "dict.safetensors"), "--k", "2", "--n-samples", "200",
                                      "--n-train", "0", "--reference", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "planted in" in result.output and "the codes are the truth for it" in " ".join(result.output.split())
    import json
    saved = json.loads(out.read_text())
    assert saved["settings"]["d"] == 12 and saved["settings"]["n_atoms"] == 24 and saved["settings"]["reference"] is None
    omp = {r["encoder"]: r for r in saved["rows"]}["omp"]
    # the codes are the truth for this dictionary: OMP at the planted k recovers nearly every support
    assert omp["f1"] > 0.95 and omp["fvu"] < 0.05
    assert saved["settings"]["data"].startswith("synthetic, planted in")
    result = CliRunner().invoke(app, ["compare", "--encoders", "omp", "--dictionary",
                                      str(tmp_path / "dict.safetensors"), "--d", "20"])
    assert result.exit_code == 2 and "differ from the dictionary's d=12" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["compare", "--encoders", "fista", "--reference", "omp"])
    assert result.exit_code == 2 and "does not solve the lasso objective" in result.output


# --- imported SAE flags: each honoured (against the tool's own maths, written out) or refused -------
D_IN, N_SAE = 6, 10


@pytest.fixture
def sae_weights():
    g = torch.Generator().manual_seed(3)
    w = {"W_enc": torch.randn(D_IN, N_SAE, generator=g), "b_enc": 0.1 * torch.randn(N_SAE, generator=g),
         "W_dec": torch.randn(N_SAE, D_IN, generator=g) * torch.linspace(0.3, 3.0, N_SAE)[:, None],
         "b_dec": torch.randn(D_IN, generator=g), "threshold": 0.2 * torch.rand(N_SAE, generator=g)}
    return w, 2.0 * torch.randn(60, D_IN, generator=g)


def _saelens_folder(folder, tensors, **cfg):
    from safetensors.torch import save_file
    import json
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": N_SAE, "dtype": "float32",
                                                 "apply_b_dec_to_input": True, **cfg}))
    return folder


def _ours(folder, x):
    D = sc.dictionary.load_sae_dictionary(folder)
    codes = sc.get_encoder("sae-file").fit(D).encode(x)
    return codes, D.decode(codes)


def _saelens_topk_rescaled(w, x, k):
    """SAELens's TopK SAE with rescale_acts_by_decoder_norm=True, as its encode/decode read."""
    norms = w["W_dec"].norm(dim=-1)
    hidden_pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    top = hidden_pre.topk(k, dim=-1)
    acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    return acts, (acts / norms) @ w["W_dec"] + w["b_dec"]


def test_saelens_topk_rescaled_by_decoder_norm_equals_saelens(tmp_path, sae_weights):
    w, x = sae_weights
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    folder = _saelens_folder(tmp_path / "sae", tensors, architecture="topk", k=3, rescale_acts_by_decoder_norm=True)
    codes, recon = _ours(folder, x)
    acts, ref = _saelens_topk_rescaled(w, x, 3)
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, ref, atol=1e-5, rtol=1e-5)
    # the flag matters here: the plain top-k of the same weights keeps other latents on some signals
    plain = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).topk(3, dim=-1).indices
    plain_support = torch.zeros_like(codes, dtype=torch.bool).scatter(1, plain, True)
    assert ((codes != 0) != plain_support).any()


def test_saelens_expected_average_only_in(tmp_path, sae_weights):
    import json
    w, x = sae_weights
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    # without a stored factor: SAELens's encode is unchanged by this setting (it scales inputs in training only)
    folder = _saelens_folder(tmp_path / "plain", tensors, architecture="standard",
                             normalize_activations="expected_average_only_in")
    codes, recon = _ours(folder, x)
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, acts @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    # with the factor kept beside a checkpoint: trained on s * x, so on raw x the SAE is SAE(s x) / s
    folder = _saelens_folder(tmp_path / "scaled", tensors, architecture="standard",
                             normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    codes, recon = _ours(folder, x)
    acts = torch.relu((0.25 * x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, (acts @ w["W_dec"] + w["b_dec"]) / 0.25, atol=1e-4, rtol=1e-5)


def test_saelens_finetuning_scaling_factor_is_folded_into_the_atoms(tmp_path, sae_weights):
    w, x = sae_weights
    s = torch.linspace(0.5, 1.5, N_SAE)
    tensors = {**{k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, "finetuning_scaling_factor": s}
    folder = _saelens_folder(tmp_path / "ft", tensors, architecture="standard", finetuning_scaling_factor=True)
    codes, recon = _ours(folder, x)
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, (acts * s) @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg, message", [
    ({"architecture": "standard", "normalize_activations": "constant_norm_rescale"},
     "rescales each input by its own norm"),
    ({"architecture": "standard", "normalize_activations": "layer_norm"}, "do not decode linearly"),
    ({"architecture": "gated"}, "two encoder paths"),
    ({"architecture": "batchtopk", "k": 2}, "across a whole batch"),
    ({"architecture": "jumprelu_transcoder"}, "is a transcoder"),
    ({"architecture": "jumprelu", "rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm is set on a"),
])
def test_saelens_settings_that_cannot_be_reproduced_are_refused_by_name(tmp_path, sae_weights, cfg, message):
    w, _ = sae_weights
    folder = _saelens_folder(tmp_path / "sae", dict(w), **cfg)
    with pytest.raises(ValueError, match=message):
        sc.sae_formats.load_sae(folder)


def test_saelens_hook_z_and_half_precision_weights(tmp_path, sae_weights):
    w, x = sae_weights
    tensors = {k: w[k].to(torch.bfloat16) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    folder = _saelens_folder(tmp_path / "z", tensors, architecture="standard", reshape_activations="hook_z",
                             dtype="bfloat16")
    codes, recon = _ours(folder, x)
    w16 = {k: v.float() for k, v in tensors.items()}       # the stored values, run in the input's precision
    acts = torch.relu((x - w16["b_dec"]) @ w16["W_enc"] + w16["b_enc"])
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, acts @ w16["W_dec"] + w16["b_dec"], atol=1e-4, rtol=1e-5)


def _dl_folder(folder, state, cls, **trainer):
    from safetensors.torch import save_file
    import json
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "ae.safetensors"))
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "activation_dim": D_IN,
                                                                "dict_size": N_SAE, **trainer}}))
    return folder


def test_dictionary_learning_jumprelu_autoencoder(tmp_path, sae_weights):
    w, x = sae_weights
    folder = _dl_folder(tmp_path / "jr", {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
                        "JumpReluAutoEncoder")
    codes, recon = _ours(folder, x)
    # dictionary_learning: pre = x @ W_enc + b_enc (no b_dec subtracted); f = ReLU(pre * (pre > threshold))
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = torch.relu(pre * (pre > w["threshold"]))
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, acts @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    assert ((codes > 0) & (codes < w["threshold"])).sum() == 0 and (codes > 0).any()


def test_dictionary_learning_batch_topk_runs_its_inference_threshold(tmp_path, sae_weights):
    w, x = sae_weights
    state = {"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T,
             "b_dec": w["b_dec"], "k": torch.tensor(3, dtype=torch.int32), "threshold": torch.tensor(0.5)}
    folder = _dl_folder(tmp_path / "btk", state, "BatchTopKSAE", k=3)
    codes, recon = _ours(folder, x)
    post = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    acts = post * (post > 0.5)
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, acts @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    state["threshold"] = torch.tensor(-1.0)
    folder = _dl_folder(tmp_path / "unset", state, "BatchTopKSAE", k=3)
    with pytest.raises(ValueError, match="inference threshold was never set"):
        sc.sae_formats.load_sae(folder)
    folder = _dl_folder(tmp_path / "gated", state, "GatedAutoEncoder")
    with pytest.raises(ValueError, match="class 'GatedAutoEncoder' is not supported.*JumpReluAutoEncoder"):
        sc.sae_formats.load_sae(folder)


def test_sparsify_flags(tmp_path, sae_weights):
    from safetensors.torch import save_file
    import json
    w, x = sae_weights
    folder = tmp_path / "sp"
    folder.mkdir()
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    # multi_topk is a training loss only: encoding is TopK of ReLU on x - b_dec
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "k": 3, "multi_topk": True, "num_latents": N_SAE}))
    codes, recon = _ours(folder, x)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(3, dim=1)
    acts = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(codes, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, acts @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    for flag, message in (("signed", "signed=True is not supported"), ("embed_skip", "embed_skip=True"),
                          ("skip_connection", "skip connections")):
        (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "k": 3, flag: True}))
        with pytest.raises(ValueError, match=message):
            sc.sae_formats.load_sae(folder)


SAELENS_CASES = {
    "topk, rescaled by decoder norms": dict(architecture="topk", k=3, rescale_acts_by_decoder_norm=True),
    "topk": dict(architecture="topk", k=3, rescale_acts_by_decoder_norm=False),
    "standard, b_dec not subtracted": dict(architecture="standard", apply_b_dec_to_input=False),
    "standard": dict(architecture="standard"),
    "jumprelu": dict(architecture="jumprelu"),
    "standard, expected_average_only_in": dict(architecture="standard", normalize_activations="expected_average_only_in"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_saelens_itself_agrees(tmp_path, sae_weights, case):
    """SAELens's own forward pass on each kind of folder we read (`make test-all` installs sae-lens)."""
    sae_lens = pytest.importorskip("sae_lens")
    w, x = sae_weights
    cfg = {"normalize_activations": "none", "device": "cpu", **SAELENS_CASES[case]}
    keys = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if cfg["architecture"] == "jumprelu" else ())
    folder = _saelens_folder(tmp_path / "sae", {k: w[k] for k in keys}, **cfg)
    sae = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    codes, recon = _ours(folder, x)
    with torch.no_grad():
        theirs = sae.encode(x)
        torch.testing.assert_close(codes, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recon, sae.decode(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_saelens_itself_reads_our_export_on_raw_activations(tmp_path):
    """A TopK SAE learned here on normalised activations, exported, then run by SAELens on raw ones."""
    sae_lens = pytest.importorskip("sae_lens")
    g = torch.Generator().manual_seed(8)
    raw = 40.0 * torch.randn(256, 8, generator=g) + 5.0
    s = 1.0 / float((raw ** 2).sum(1).mean().sqrt())
    learned = sc.learn_dictionary(raw * s, "topk", n_atoms=12, input_scale=s, steps=60, k=3)
    sc.sae_formats.export_saelens(learned.encoder, tmp_path / "sae")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    ours = learned.dictionary.decode(learned.encoder.encode(raw * s)) / s
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(sae.encode(raw)), ours, atol=1e-4, rtol=1e-4)


# --- the input scale of a dictionary learned on normalised activations ------------------------------
@pytest.mark.parametrize("method", ["topk", "relu"])
def test_export_folds_the_input_scale_so_saelens_on_raw_inputs_matches(tmp_path, method):
    import json
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(8)
    raw = 40.0 * torch.randn(256, 8, generator=g) + 5.0          # raw activations: large, off-centre
    s = 1.0 / float((raw ** 2).sum(1).mean().sqrt())             # a store's unit-mean-squared-norm scale
    # relu's penalty on its mean-scaled loss is `l1_coefficient`: `lam` is only the lasso's penalty now
    params = {"k": 3} if method == "topk" else {"l1_coefficient": 0.01, "bias": True}
    learned = sc.learn_dictionary(raw * s, method, n_atoms=12, input_scale=s, steps=60, **params)
    assert learned.dictionary.input_scale == pytest.approx(s)
    learned.encoder.save(tmp_path / "enc")
    learned.dictionary.save(tmp_path / "dict")
    assert sc.Dictionary.load(tmp_path / "dict").input_scale == pytest.approx(s)
    enc = sc.load_encoder(tmp_path / "enc.safetensors")
    assert enc.dictionary.input_scale == pytest.approx(s)
    sc.sae_formats.export_saelens(enc, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    t = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert cfg["normalize_activations"] == "none"
    # SAELens's forward pass, by hand, on the raw activations
    sae_in = raw - t["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if method == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        acts = torch.relu(pre)
    theirs = acts @ t["W_dec"] + t["b_dec"]
    codes = enc.encode(raw * s)
    ours = enc.dictionary.decode(codes) / s                       # our reconstruction, back in raw units
    torch.testing.assert_close(acts, codes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-4)
    assert metrics.fvu(raw, theirs) < 1.0
    # and the folder reads back to the same SAE on raw inputs
    back = sc.get_encoder("sae-file").fit(sc.dictionary.load_sae_dictionary(tmp_path / "sae"))
    torch.testing.assert_close(back.encode(raw), codes, atol=1e-4, rtol=1e-4)


# --- spams-omp is ORMP, omp is OMP: both checked against brute force ---------------------------------
def _brute_greedy(atoms, x, k, rule):
    """Greedy selection, all coefficients refitted by least squares after each step. "omp": the atom
    most correlated with the residual; "ormp": the atom that leaves the smallest refitted residual."""
    chosen, r = [], x.copy()
    for _ in range(k):
        scores = {}
        for j in range(atoms.shape[0]):
            if j in chosen:
                continue
            if rule == "omp":
                scores[j] = abs(atoms[j] @ r)
            else:
                basis = atoms[chosen + [j]].T
                scores[j] = -np.linalg.norm(x - basis @ np.linalg.lstsq(basis, x, rcond=None)[0])
        chosen.append(max(scores, key=scores.get))
        basis = atoms[chosen].T
        r = x - basis @ np.linalg.lstsq(basis, x, rcond=None)[0]
    return frozenset(chosen)


def test_spams_omp_is_order_recursive_matching_pursuit_and_omp_is_omp():
    pytest.importorskip("spams")
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((24, 12))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = rng.standard_normal((40, 12))                      # dense signals: the rules disagree here
    D = sc.Dictionary(torch.from_numpy(atoms))
    support = lambda name: [frozenset(np.flatnonzero(z)) for z in
                            sc.get_encoder(name, k=4).fit(D).encode(torch.from_numpy(x)).numpy()]
    omp_truth = [_brute_greedy(atoms, row, 4, "omp") for row in x]
    ormp_truth = [_brute_greedy(atoms, row, 4, "ormp") for row in x]
    assert support("omp") == omp_truth
    assert support("sklearn-omp") == omp_truth
    assert support("spams-omp") == ormp_truth
    agreement = np.mean([a == b for a, b in zip(support("omp"), support("spams-omp"))])
    assert agreement < 0.9                                  # other algorithms, not noise
