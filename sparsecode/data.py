"""Data in every form the command line and `compare` take, turned into signals (with their true
codes and dictionary where known).

Forms: a tensor or array x (n, d); a dict ``{"x": ..., "codes": ...}``; `SparseData` (planted,
with its truth); `Signals`; a ``.safetensors`` file with ``x`` (and optionally ``codes``, or
``y``, the targets of a transcoder); an activation store, named on the command line
``activations:FOLDER``, read whole or streamed as a `TokenRange`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import _io, metrics
from ._validation import as_tensor
from .activations.store import ActivationStore, TokenRange
from .dictionary import Dictionary, as_dictionary
from .synthetic import SparseData, make_sparse_data

log = logging.getLogger(__name__)

#: how the command line names an activation store as data: ``activations:FOLDER``
STORE_PREFIX = "activations:"
#: the `--dictionary` value that means the synthetic data's own dictionary
TRUE_DICTIONARY = "true"
#: tokens of a streamed store held in memory to summarise what was learned from it
SUMMARY_TOKENS = 4096


@dataclass(frozen=True)
class Signals:
    """Signals x (n, d), their true codes (n, n_atoms) when known, and a dictionary: the true one,
    or the one a comparison decodes with. `y` (n, d_out) holds a transcoder's targets."""

    x: torch.Tensor
    codes: torch.Tensor | None = None
    dictionary: Dictionary | None = None
    y: torch.Tensor | None = None


def open_store(spec) -> ActivationStore | None:
    """The store named by ``activations:FOLDER``; None for anything else (a file path)."""
    text = str(spec)
    return ActivationStore(text.removeprefix(STORE_PREFIX)) if text.startswith(STORE_PREFIX) else None


def as_signals(data, device=None) -> Signals:
    """Signals, true codes (or None) and true dictionary (or None) of any in-memory data form."""
    y = None
    if isinstance(data, Signals):
        x, codes, true, y = data.x, data.codes, data.dictionary, data.y
    elif isinstance(data, SparseData):
        x, codes, true = data.x, data.codes, data.dictionary
    elif isinstance(data, dict):
        if "x" not in data:
            raise ValueError(f"data dict needs an 'x' entry (n, d); it has {sorted(data)}")
        x, codes, true = data["x"], data.get("codes"), None
    else:
        x, codes, true = data, None, None
    x = as_tensor(x, "x", device=device)
    if codes is not None:
        codes = as_tensor(codes, "codes", device=device, dtype=x.dtype)
        if codes.shape[0] != x.shape[0]:
            raise ValueError(f"codes has {codes.shape[0]} rows but x has {x.shape[0]}")
    if y is not None:
        y = as_tensor(y, "y", device=device, dtype=x.dtype)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} rows but x has {x.shape[0]}")
    return Signals(x, codes, true, y)


def with_dictionary(data, dictionary, device=None) -> Signals:
    """`as_signals(data)` with the dictionary a comparison decodes with: `dictionary` (any form
    `as_dictionary` takes), or for None / "true" the data's own; true codes of another size are
    dropped (code metrics are then skipped)."""
    signals = as_signals(data, device)
    if dictionary is None or (isinstance(dictionary, str) and dictionary == TRUE_DICTIONARY):
        if signals.dictionary is None:
            raise ValueError("dictionary='true' needs synthetic data (SparseData) that carries its dictionary; "
                             "pass a Dictionary, an atoms array or a saved dictionary path")
        dictionary = signals.dictionary
    dictionary = as_dictionary(dictionary).to(device=device, dtype=signals.x.dtype)
    if dictionary.d != signals.x.shape[1]:
        raise ValueError(f"x has d={signals.x.shape[1]} but the dictionary's atoms have d={dictionary.d}")
    codes = signals.codes
    if codes is not None and codes.shape[1] != dictionary.n_atoms:
        codes = None
        log.warning("true codes have a different number of atoms than the dictionary: code metrics skipped")
    return Signals(signals.x, codes, dictionary, signals.y)


def read_signals(path, n_tokens: int | None = None, *, start: int = 0, targets: bool = False) -> Signals:
    """Signals from a ``.safetensors`` file (tensor ``x``; ``codes`` and ``y`` when present) or from
    an activation store (``activations:FOLDER``: `n_tokens` tokens from `start`, normalised by the
    store's recorded scale; with `targets`, the MLP outputs as `y`)."""
    store = open_store(path)
    if store is not None:
        batch = store.load(n_tokens, start=start, normalize=True, targets=targets)
        return Signals(batch.x, y=batch.y)
    tensors = _io.read_tensors(path, "data")
    if "x" not in tensors:
        raise ValueError(f"{path} has no tensor 'x' (signals, shape (n, d)); found {sorted(tensors)}")
    return Signals(tensors["x"], tensors.get("codes"), None, tensors.get("y"))


def load_dictionary(spec: str, allow_pickle: bool = False) -> Dictionary | None:
    """The `--dictionary` of a command: None for "true" (the synthetic data's own), else a saved
    dictionary or an SAE folder's decoder."""
    return None if spec == TRUE_DICTIONARY else as_dictionary(spec, allow_pickle=allow_pickle)


def comparison_data(data, n_samples: int, n_train: int, train_data=None):
    """What to compare on, and what to train on, from files: `(data, x_train)`.

    A store (``activations:FOLDER``) is streamed: its first `n_train` tokens train, the
    `n_samples` after them are compared on. A file is read whole; `train_data` (a file or a store)
    gives the training signals, else there are none.
    """
    store = open_store(data)
    if store is not None:
        source = store.tokens(n_train, n_samples)
        x_train = store.tokens(0, n_train) if n_train else None
    else:
        source, x_train = read_signals(data), None
    if train_data is not None:
        x_train = read_signals(train_data, n_train).x
    return source, x_train


def planted_split(n_samples: int, n_train: int, *, d: int | None = None, n_atoms: int | None = None, k: int = 3,
                  dictionary: Dictionary | None = None, **synthetic):
    """`n_train + n_samples` planted signals, split into `(data, x_train)` (x_train None when
    `n_train` is 0). Planted in `dictionary` when given: `d` and `n_atoms` default to its shape and
    must match it, and the codes are the truth for it. Otherwise `d` defaults to 8 and `n_atoms`
    to 16 (paper c). `synthetic`: the other arguments of `make_sparse_data`."""
    if dictionary is not None:
        given = {"d": d, "n_atoms": n_atoms}
        shape = {"d": dictionary.d, "n_atoms": dictionary.n_atoms}
        wrong = {key: v for key, v in given.items() if v is not None and v != shape[key]}
        if wrong:
            raise ValueError(f"{', '.join(f'{key}={v}' for key, v in wrong.items())} differ from the dictionary's "
                             f"d={dictionary.d}, n_atoms={dictionary.n_atoms}; signals are planted in the given "
                             "dictionary")
        d, n_atoms = dictionary.d, dictionary.n_atoms
    both = make_sparse_data(n_samples + n_train, 8 if d is None else d, 16 if n_atoms is None else n_atoms, k,
                            dictionary=dictionary, **synthetic)
    train, data = both.split(n_train) if n_train else (None, both)
    if dictionary is not None:
        data = Signals(data.x, data.codes)
    return data, None if train is None else train.x


@dataclass(frozen=True)
class TrainingData:
    """What a dictionary learner takes (`source`: signals, or a store's token range it streams),
    the signals in memory its result is summarised on (`x`, and targets `y` of a transcoder),
    the factor the signals were multiplied by (`input_scale`), and the planted truth, if any."""

    source: torch.Tensor | TokenRange
    x: torch.Tensor
    y: torch.Tensor | None = None
    input_scale: float = 1.0
    truth: SparseData | None = None

    def scores(self, dictionary: Dictionary, encoder) -> dict:
        """FVU, L0 and dead fraction of the learned dictionary and encoder on `x` (against `y` for
        a transcoder) and, with a planted truth, dictionary and code MCC."""
        codes = encoder.encode(self.x)
        target = self.x if self.y is None else self.y
        row = {"fvu": metrics.fvu(target, dictionary.decode(codes)), "l0": metrics.mean_l0(codes),
               "dead": metrics.dead_fraction(codes)}
        if self.truth is not None:
            row["dictionary_mcc"] = metrics.dictionary_mcc(self.truth.dictionary.atoms, dictionary.atoms)
            row["code_mcc"] = metrics.code_mcc(self.truth.codes, codes)
        return row


def training_data(data, n_samples: int, *, streams: bool, **synthetic) -> TrainingData:
    """The signals a dictionary is learned from: `data` (a ``.safetensors`` file or
    ``activations:FOLDER``), or None for planted synthetic data (`synthetic`: the arguments of
    `make_sparse_data` besides `n_samples`).

    A store gives `n_samples` tokens, normalised, with the store's scale as `input_scale`; a
    learner that `streams` reads them shard by shard, others (and transcoders of an ``mlp`` store,
    which need the targets) take them in memory.
    """
    if data is None:
        truth = make_sparse_data(n_samples, **synthetic)
        return TrainingData(truth.x, truth.x, truth=truth)
    store = open_store(data)
    if store is None:
        signals = read_signals(data)
        return TrainingData(signals.x, signals.x, signals.y)
    if store.has_targets or not streams:
        batch = store.load(n_samples, normalize=True, targets=store.has_targets)
        return TrainingData(batch.x, batch.x, batch.y, store.scale)
    stream = store.tokens(0, n_samples)
    return TrainingData(stream, stream.head(SUMMARY_TOKENS), None, store.scale)
