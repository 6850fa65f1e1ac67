"""Sparse autoencoders trained by other tools, in and out.

Read (the folder's files tell the format):
- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc (d, n)``, ``b_enc``, ``W_dec (n, d)``,
  ``b_dec`` (+ ``threshold`` for JumpReLU); architectures standard (ReLU), topk, jumprelu;
  ``apply_b_dec_to_input`` decides whether ``b_dec`` is subtracted before encoding.
- EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight (n, d)``,
  ``encoder.bias``, ``W_dec (n, d)``, ``b_dec``; ReLU then TopK on ``x - b_dec``.
- dictionary_learning: ``config.json`` + ``ae.safetensors`` or ``ae.pt`` (a pickle: read only when
  allowed, and then with ``torch.load(weights_only=True)``); ``AutoEncoder`` (ReLU on ``x - bias``),
  ``AutoEncoderTopK`` (ReLU, TopK on ``x - b_dec``) and ``BatchTopKSAE`` (its inference path: ReLU
  on ``x - b_dec`` kept above one global threshold), decoder ``decoder.weight (d, n)``; and
  ``JumpReluAutoEncoder`` (``W_enc (d, n)``, ``W_dec (n, d)``, a threshold per latent).

Every flag of a format that changes the maths is either reproduced (folded into the weights
where the tool itself folds it; see `_saelens` and `_sparsify`) or refused by name with the reason.

Every format maps to one `ImportedSAE`: encoder rows, biases, decoder atoms as rows (norms kept as
they are: a non-unit decoder is valid and every encoder accounts for it), activation.
Write: `save_saelens` exports a dictionary and a ReLU/TopK encoder in SAELens's layout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _io
from .ops import topk_relu

log = logging.getLogger(__name__)

FORMATS = {
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.safetensors or ae.pt"),
}


@dataclass
class ImportedSAE:
    """An SAE in sparsecode's orientation: codes = act(W_enc_rows (x - b_dec if centred) + b_enc),
    reconstruction = codes @ atoms + b_dec."""

    format: str
    architecture: str                 # "relu", "topk" or "jumprelu"
    encoder_rows: torch.Tensor        # (n_atoms, d)
    b_enc: torch.Tensor               # (n_atoms,)
    atoms: torch.Tensor               # (n_atoms, d)
    b_dec: torch.Tensor               # (d,)
    center: bool                      # subtract b_dec from the input before encoding
    k: int | None = None
    threshold: torch.Tensor | None = None
    path: str = ""

    def metadata(self, allow_pickle: bool = False) -> dict:
        """What a dictionary of this SAE's decoder records about where it came from."""
        norms = self.atoms.norm(dim=1)
        return {"sae_path": self.path, "sae_format": self.format, "sae_architecture": self.architecture,
                "sae_allow_pickle": allow_pickle, "decoder_norm_min": float(norms.min()),
                "decoder_norm_max": float(norms.max())}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's own encoder on raw inputs x (n, d)."""
        w = self.encoder_rows.to(x)
        inp = x - self.b_dec.to(x) if self.center else x
        pre = inp @ w.T + self.b_enc.to(x)
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold.to(x))
        return topk_relu(pre, self.k)


def detect_format(folder) -> str:
    """Name the format of an SAE folder, or say which files were expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {folder}")
    files = {p.name for p in folder.iterdir()}
    if "cfg.json" in files and "sae_weights.safetensors" in files:
        return "saelens"
    if "cfg.json" in files and "sae.safetensors" in files:
        return "sparsify"
    if "config.json" in files and ("ae.safetensors" in files or "ae.pt" in files):
        return "dictionary_learning"
    expected = "; ".join(f"{name}: {' + '.join(parts)}" for name, parts in FORMATS.items())
    raise ValueError(f"{folder} is not an SAE folder of a known format (found: {', '.join(sorted(files)) or 'nothing'}). "
                     f"Expected {expected}")


def _check_k(k, n: int, where) -> int:
    """A top-k SAE keeps k of its n latents: 1 <= k <= n."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{where}: k={k!r} must be an integer between 1 and the number of latents ({n})")
    return k


def _shape(name: str, tensor: torch.Tensor, shape: tuple, path: Path) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)} but the config says {shape}")
    return tensor


def _need(tensors: dict, names: tuple, path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))})")


_CACHE: dict = {}


def load_sae(folder, allow_pickle: bool = False) -> ImportedSAE:
    """Read an SAE folder of any supported format (see the module docstring)."""
    folder = Path(folder).resolve()
    fmt = detect_format(folder)
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()))
    key = (str(folder), stamp)
    if key not in _CACHE:
        _CACHE[key] = {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning}[fmt](
            folder, allow_pickle)
    return _CACHE[key]


#: SAELens architectures and why they are not run here (the others: standard, topk, jumprelu).
_SAELENS_REFUSED = {
    "gated": "its codes come from two encoder paths (a gate, and magnitudes scaled by exp(r_mag)); sae-file runs "
             "single-path encoders only",
    "batchtopk": "its top-k is taken across a whole batch, so a signal's code depends on the others; SAELens saves "
                 "it for inference as a jumprelu SAE with a threshold (save_inference_model): load that folder",
    "matryoshka_batchtopk": "its top-k is taken across a whole batch; SAELens saves it for inference as a jumprelu "
                            "SAE with a threshold (save_inference_model): load that folder",
}


def _saelens(folder: Path, allow_pickle: bool) -> ImportedSAE:
    """SAELens's maths, each flag of cfg.json honoured or refused by name:

    - apply_b_dec_to_input: b_dec is subtracted before encoding;
    - rescale_acts_by_decoder_norm (topk; SAELens's training default, kept by `save_model`): the
      pre-activations are multiplied by the decoder row norms before the top-k and decoding
      divides by them again; folded as SAELens's `fold_W_dec_norm` does (encoder rows and b_enc
      times the norms, atoms normalised), so codes and reconstructions equal SAELens's; absent,
      it is False (SAELens versions before the flag did not rescale);
    - normalize_activations: "expected_average_only_in" leaves SAELens's `encode` unchanged (it
      scales inputs during training only); where the folder keeps the factor
      (activation_scaler.json), it is folded in as SAELens's `fold_activation_norm_scaling_factor`
      does, so the SAE takes raw activations; "constant_norm_rescale" and "layer_norm" rescale each
      input and then each output by that input's own norm, so codes do not decode linearly: refused;
    - finetuning_scaling_factor (older SAELens): the codes are multiplied per latent before
      decoding: folded into the atoms;
    - reshape_activations="hook_z" (or a hook_z hook name): SAELens flattens (n_heads, d_head)
      into d_in; signals here are rows of that flattened width already, so the maths is unchanged;
    - dtype: the weights are read as stored and run in the input's precision (float32 or float64),
      so a bfloat16 SAE differs from SAELens's own bfloat16 pass by rounding only;
    - architecture: standard (ReLU), topk, jumprelu; gated, batchtopk and transcoders refused.
    """
    cfg = _io.read_json(folder / "cfg.json", "SAELens config", {"d_in": int, "d_sae": int})
    tensors = _io.read_tensors(folder / "sae_weights.safetensors", "SAELens weights")
    _need(tensors, ("W_enc", "W_dec", "b_dec"), folder / "sae_weights.safetensors")
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", "relu")
    if arch == "standard" and act == "topk":
        arch = "topk"                      # older SAELens configs name TopK through the activation
    if arch in _SAELENS_REFUSED:
        raise ValueError(f"{folder}: SAELens architecture {arch!r} is not supported: {_SAELENS_REFUSED[arch]}")
    if "transcoder" in str(arch):
        raise ValueError(f"{folder}: SAELens architecture {arch!r} is a transcoder: its decoder predicts another "
                         "site's activations, so its atoms are not a dictionary of its inputs")
    if arch not in ("standard", "topk", "jumprelu"):
        raise ValueError(f"{folder}: SAELens architecture {arch!r} is not supported "
                         "(supported: standard, topk, jumprelu)")
    if arch == "standard" and act != "relu":
        raise ValueError(f"{folder}: SAELens activation {act!r} is not supported (relu or topk)")
    norm = cfg.get("normalize_activations", "none")
    factor = None
    if norm == "expected_average_only_in":
        scaler = folder / "activation_scaler.json"
        if scaler.is_file():
            factor = _io.read_json(scaler, "SAELens activation scaler").get("scaling_factor")
            if factor is not None and not (isinstance(factor, (int, float)) and factor > 0):
                raise ValueError(f"{scaler}: scaling_factor must be a positive number, got {factor!r}")
    elif norm in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(f"{folder}: normalize_activations={norm!r} rescales each input by its own norm and the "
                         "reconstruction back by it, so the codes do not decode linearly with W_dec (x_hat != codes "
                         "@ W_dec + b_dec); no fixed folding into the weights exists")
    elif norm not in ("none", None):
        raise ValueError(f"{folder}: normalize_activations={norm!r} is not a SAELens setting this reader knows "
                         "(none, expected_average_only_in)")
    d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    path = folder / "sae_weights.safetensors"
    k = None
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise ValueError(f"{folder}: a topk SAE config needs k (or activation_fn_kwargs.k)")
        k = _check_k(k, n, folder / "cfg.json")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescale and arch != "topk":
        raise ValueError(f"{folder}: rescale_acts_by_decoder_norm is set on a {arch!r} SAE; SAELens applies it in "
                         "its TopK SAE, and this reader reproduces it there only")
    threshold = None
    if arch == "jumprelu":
        if "threshold" in tensors:
            threshold = _shape("threshold", tensors["threshold"], (n,), path)
        elif "log_threshold" in tensors:
            threshold = torch.exp(_shape("log_threshold", tensors["log_threshold"], (n,), path))
        else:
            raise ValueError(f"{path}: a jumprelu SAE needs 'threshold' (or 'log_threshold')")
    w_enc = _shape("W_enc", tensors["W_enc"], (d, n), path).T.contiguous()
    b_enc = _shape("b_enc", tensors.get("b_enc", torch.zeros(n, dtype=w_enc.dtype)), (n,), path)
    w_dec = _shape("W_dec", tensors["W_dec"], (n, d), path)
    b_dec = _shape("b_dec", tensors["b_dec"], (d,), path)
    folded = []
    if rescale:
        norms = w_dec.norm(dim=1)
        w_enc, b_enc, w_dec = w_enc * norms[:, None], b_enc * norms, w_dec / norms[:, None]
        folded.append("rescale_acts_by_decoder_norm")
    if cfg.get("finetuning_scaling_factor") or "finetuning_scaling_factor" in tensors:
        _need(tensors, ("finetuning_scaling_factor",), path)
        w_dec = w_dec * _shape("finetuning_scaling_factor", tensors["finetuning_scaling_factor"], (n,), path)[:, None]
        folded.append("finetuning_scaling_factor")
    if factor is not None:
        w_enc, w_dec, b_dec = w_enc * factor, w_dec / factor, b_dec / factor
        folded.append(f"activation_scaler.json scaling_factor={factor:g}")
    if folded:
        log.info("%s: folded into the weights: %s", folder, ", ".join(folded))
    hook = str(cfg.get("hook_name") or (cfg.get("metadata") or cfg.get("meta") or {}).get("hook_name") or "")
    if cfg.get("reshape_activations") == "hook_z" or hook.endswith("hook_z"):
        log.info("%s: a hook_z SAE: signals are the flattened (n_heads * d_head = %d) head outputs", folder, d)
    return ImportedSAE("saelens", {"standard": "relu"}.get(arch, arch), w_enc, b_enc, w_dec, b_dec,
                       bool(cfg.get("apply_b_dec_to_input", True)), None if k is None else int(k), threshold,
                       str(folder))


def _sparsify(folder: Path, allow_pickle: bool) -> ImportedSAE:
    cfg = _io.read_json(folder / "cfg.json", "sparsify config", {"d_in": int, "k": int})
    path = folder / "sae.safetensors"
    tensors = _io.read_tensors(path, "sparsify weights")
    _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise ValueError(f"{folder}: sparsify skip connections (W_skip) are not supported: the output is not "
                         "codes @ W_dec + b_dec")
    for flag in ("embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise ValueError(f"{folder}: sparsify {flag}=True is not supported: the output adds a term that is not "
                             "codes @ W_dec + b_dec")
    if cfg.get("signed"):
        raise ValueError(f"{folder}: sparsify signed=True is not supported: this reader runs the unsigned TopK "
                         "activation (ReLU of the k largest pre-activations)")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{folder}: sparsify activation {activation!r} is not supported (topk)")
    # multi_topk adds a training loss at 4k only; normalize_decoder acts during training: encoding is plain TopK.
    if cfg.get("transcode"):
        log.warning("%s: a transcoder: its decoder predicts the module's output from its input, so errors measured "
                    "against the input signals are not its reconstruction errors", folder)
    d = int(cfg["d_in"])
    n = tensors["encoder.weight"].shape[0]
    if cfg.get("num_latents") and int(cfg["num_latents"]) != n:
        raise ValueError(f"{path}: encoder.weight has {n} latents but cfg.json says num_latents={cfg['num_latents']}")
    return ImportedSAE("sparsify", "topk", _shape("encoder.weight", tensors["encoder.weight"], (n, d), path),
                       _shape("encoder.bias", tensors["encoder.bias"], (n,), path),
                       _shape("W_dec", tensors["W_dec"], (n, d), path), _shape("b_dec", tensors["b_dec"], (d,), path),
                       not cfg.get("transcode", False), _check_k(cfg["k"], n, folder / "cfg.json"), None, str(folder))


def _dictionary_learning(folder: Path, allow_pickle: bool) -> ImportedSAE:
    cfg = _io.read_json(folder / "config.json", "dictionary_learning config")
    trainer = cfg.get("trainer", cfg)
    if not isinstance(trainer, dict):
        raise ValueError(f"{folder / 'config.json'}: 'trainer' must be an object, got {trainer!r}")
    _io.check_keys(trainer, {"activation_dim": int, "dict_size": int}, f"{folder / 'config.json'} (trainer)")
    cls = trainer.get("dict_class", "AutoEncoder")
    if (folder / "ae.safetensors").is_file():
        path = folder / "ae.safetensors"
        tensors = _io.read_tensors(path, "dictionary_learning weights")
    else:
        path = folder / "ae.pt"
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle file; loading one can run code. Convert it to ae.safetensors, or "
                             "allow it explicitly (allow_pickle=True, --allow-pickle): it is then read with "
                             "torch.load(weights_only=True)")
        log.warning("reading %s with torch.load(weights_only=True)", path)
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and torch raise many types for a file that is not plain tensors
            raise ValueError(f"{path} cannot be read safely with torch.load(weights_only=True) (it holds more than "
                             f"tensors, or is not a torch file): {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}. Convert it to ae.safetensors") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{path} does not hold a state dict (names to tensors)")
        _io.check_finite(tensors, path)
    d, n = int(trainer["activation_dim"]), int(trainer["dict_size"])
    if cls == "JumpReluAutoEncoder":
        # its own layout: W_enc (d, n), W_dec (n, d); b_dec is subtracted first only when the config says so
        _need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
        return ImportedSAE("dictionary_learning", "jumprelu", _shape("W_enc", tensors["W_enc"], (d, n), path).T.contiguous(),
                           _shape("b_enc", tensors["b_enc"], (n,), path), _shape("W_dec", tensors["W_dec"], (n, d), path),
                           _shape("b_dec", tensors["b_dec"], (d,), path), bool(trainer.get("apply_b_dec_to_input", False)),
                           None, _shape("threshold", tensors["threshold"], (n,), path), str(folder))
    _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight"), path)
    w_enc = _shape("encoder.weight", tensors["encoder.weight"], (n, d), path)
    b_enc = _shape("encoder.bias", tensors["encoder.bias"], (n,), path)
    atoms = _shape("decoder.weight", tensors["decoder.weight"], (d, n), path).T.contiguous()
    if cls == "AutoEncoder":
        _need(tensors, ("bias",), path)
        return ImportedSAE("dictionary_learning", "relu", w_enc, b_enc, atoms,
                           _shape("bias", tensors["bias"], (d,), path), True, None, None, str(folder))
    if cls == "AutoEncoderTopK":
        _need(tensors, ("b_dec",), path)
        k = int(tensors["k"]) if "k" in tensors else trainer.get("k")
        if k is None:
            raise ValueError(f"{folder}: AutoEncoderTopK needs k (buffer 'k' or trainer.k)")
        k = _check_k(k, n, path)
        return ImportedSAE("dictionary_learning", "topk", w_enc, b_enc, atoms,
                           _shape("b_dec", tensors["b_dec"], (d,), path), True, int(k), None, str(folder))
    if cls == "BatchTopKSAE":
        _need(tensors, ("b_dec", "threshold"), path)
        threshold = float(tensors["threshold"])
        if threshold < 0:
            raise ValueError(f"{path}: BatchTopKSAE threshold is {threshold:g}: its inference threshold was never "
                             "set (it is estimated during training), and its batch top-k makes a code depend on "
                             "the other signals of the batch")
        # inference: ReLU(W (x - b_dec) + b) kept where it exceeds one global threshold
        return ImportedSAE("dictionary_learning", "jumprelu", w_enc, b_enc, atoms,
                           _shape("b_dec", tensors["b_dec"], (d,), path), True, None,
                           torch.full((n,), threshold, dtype=w_enc.dtype), str(folder))
    raise ValueError(f"{folder}: dictionary_learning class {cls!r} is not supported (AutoEncoder, AutoEncoderTopK, "
                     "BatchTopKSAE, JumpReluAutoEncoder)")


def save_saelens(folder, dictionary, encoder_rows: torch.Tensor, b_enc: torch.Tensor | None,
                 architecture: str, k: int | None = None, center: bool = False, threshold=None,
                 metadata: dict | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens's layout: `dictionary` (a
    `Dictionary`) gives W_dec and b_dec, the rest the encoder."""
    return _write_saelens(folder, dictionary.atoms, dictionary.bias, encoder_rows, b_enc, architecture, k, center,
                          threshold, metadata)


def _write_saelens(folder, atoms: torch.Tensor, bias: torch.Tensor | None, encoder_rows: torch.Tensor,
                   b_enc: torch.Tensor | None, architecture: str, k: int | None, center: bool, threshold,
                   metadata: dict | None) -> Path:
    if architecture not in ("relu", "topk", "jumprelu"):
        raise ValueError(f"cannot export architecture {architecture!r} to SAELens (relu, topk, jumprelu)")
    folder = Path(folder)
    n, d = atoms.shape
    dtype = atoms.dtype
    tensors = {"W_enc": encoder_rows.detach().to(dtype).T.contiguous(),
               "b_enc": (torch.zeros(n, dtype=dtype) if b_enc is None else b_enc.detach().to(dtype)),
               "W_dec": atoms.detach(),
               "b_dec": (torch.zeros(d, dtype=dtype) if bias is None else bias.detach())}
    if architecture == "jumprelu":
        tensors["threshold"] = threshold.detach().to(dtype)
    cfg = {"architecture": {"relu": "standard"}.get(architecture, architecture), "d_in": d, "d_sae": n,
           "dtype": str(dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": center,
           "normalize_activations": "none", "activation_fn_str": "topk" if architecture == "topk" else "relu",
           "metadata": metadata or {}}
    if k is not None:
        cfg["k"] = int(k)
        cfg["activation_fn_kwargs"] = {"k": int(k)}
    check_export_folder(folder)
    _io.write_tensors(folder / "sae_weights.safetensors", tensors)
    _io.write_json(folder / "cfg.json", cfg)
    return folder


def check_export_folder(folder) -> Path:
    """An export replaces only an earlier export of ours: a folder already holding another SAE's
    cfg.json (for instance the very folder being converted) or weights without our cfg.json is refused."""
    folder = _io.check_writable(folder, "export folder", folder=True)
    cfg_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"

    _io.check_replace(cfg_path, "SAELens folder exported by sparsecode",
                      lambda path: (_io.read_json(path, "SAELens config").get("metadata") or {}).get("exported_by")
                      == "sparsecode")
    if weights.exists() and not cfg_path.exists():
        raise FileExistsError(f"{weights} exists without the cfg.json of a sparsecode export; refusing to overwrite it")
    return folder


def export_saelens(encoder, folder) -> Path:
    """Export a fitted encoder that is an SAE encoder (relu, topk, sae-file) with its dictionary.

    A dictionary learned on normalised activations (`Dictionary.input_scale` s != 1) is exported
    with s folded into the weights, so the SAELens folder takes raw activations and its
    reconstructions are ours divided by s.
    """
    weights = getattr(encoder, "sae_weights", None)
    if weights is None:
        raise ValueError(f"encoder {encoder.name!r} is not an SAE encoder; SAELens can hold relu, topk and "
                         "jumprelu encoders (sparsecode: relu, topk, sae-file)")
    if encoder.dictionary is None:
        raise ValueError(f"encoder {encoder.name!r} is not fitted: nothing to export")
    w = weights()
    dictionary = encoder.dictionary
    atoms, bias, rows, s = dictionary.atoms, dictionary.bias, w["encoder_rows"], dictionary.input_scale
    if s != 1.0:
        # Trained on s * raw: SAE(s x) / s is the same SAE on raw x with W_enc * s, W_dec / s, b_dec / s
        # (SAELens's fold_activation_norm_scaling_factor); thresholds and top-k act on unchanged
        # pre-activations. The exported SAE takes raw activations: normalize_activations "none".
        atoms, bias, rows = atoms / s, None if bias is None else bias / s, rows * s
    return _write_saelens(folder, atoms, bias, rows, w["b_enc"], w["architecture"], w["k"], w["center"],
                          w["threshold"], {"exported_by": "sparsecode", "encoder": encoder.name,
                                           "input_scale_folded": s})
