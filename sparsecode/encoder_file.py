"""The trained-encoder file: ``PATH.safetensors`` (network and dictionary) beside ``PATH.json``.

Only safetensors and JSON are read, never pickle. The JSON names the encoder (a registry name),
its config and the dictionary's `input_scale`; `load_encoder` rebuilds the encoder through the
registry and lets it restore its own network (`TrainableEncoder.restore`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import _io
from .dictionary import Dictionary
from .encoder import Encoder
from .registry import get_encoder

#: marker of a saved encoder's JSON
ENCODER_FORMAT = "sparsecode.encoder"


def save_encoder(enc: Encoder, path) -> Path:
    """Write `PATH.safetensors` (network and dictionary) and `PATH.json` (name, config and the
    dictionary's `input_scale`, the factor its training signals were multiplied by); the path rule
    is `_io.paired`'s. Refuses to replace files that are not a saved encoder. Returns the tensors' path."""
    if not enc.trainable:
        raise TypeError(f"encoder {enc.name!r} is not trained: it has no network to save")
    if not enc.is_fitted:
        raise RuntimeError(f"encoder {enc.name!r} is not trained: nothing to save")
    tensors_path, meta_path = _io.paired(path)
    _io.check_pair(path, ENCODER_FORMAT, "sparsecode encoder")
    tensors = {f"net.{k}": v for k, v in enc.net.state_dict().items()}
    tensors["dictionary.atoms"] = enc.dictionary.atoms
    if enc.dictionary.bias is not None:
        tensors["dictionary.bias"] = enc.dictionary.bias
    _io.write_tensors(tensors_path, tensors)
    _io.write_json(meta_path, {"format": ENCODER_FORMAT, "encoder": enc.name, "d_in": enc.d_in,
                               "n_atoms": enc.dictionary.n_atoms, "input_scale": enc.dictionary.input_scale,
                               "config": dataclasses.asdict(enc.config)})
    return tensors_path


def load_encoder(path) -> Encoder:
    """Rebuild a trained encoder written by `save_encoder` (safetensors + JSON only)."""
    tensors_path, meta_path = _io.paired(path)
    meta = _io.read_json(meta_path, "sparsecode encoder description",
                         {"encoder": str, "d_in": int, "n_atoms": int, "config": dict}, format=ENCODER_FORMAT)
    tensors = _io.read_tensors(tensors_path, "encoder")
    if "dictionary.atoms" not in tensors:
        raise ValueError(f"{tensors_path} lacks its dictionary (tensor 'dictionary.atoms'); it has "
                         f"{', '.join(sorted(tensors)) or 'nothing'}")
    enc = get_encoder(meta["encoder"], **meta["config"])
    if not enc.trainable:
        raise ValueError(f"{meta_path}: {meta['encoder']!r} is not a trained encoder")
    atoms = tensors["dictionary.atoms"]
    if atoms.ndim != 2 or atoms.shape[0] != meta["n_atoms"]:
        raise ValueError(f"{tensors_path}: dictionary.atoms has shape {tuple(atoms.shape)} but {meta_path.name} "
                         f"says n_atoms={meta['n_atoms']}")
    scale = meta.get("input_scale", 1.0)
    dictionary = Dictionary(atoms, tensors.get("dictionary.bias"),
                            metadata={} if scale == 1.0 else {"input_scale": float(scale)})
    state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
    enc.restore(dictionary, meta["d_in"], state, source=str(tensors_path))
    return enc
