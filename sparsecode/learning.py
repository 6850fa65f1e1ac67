"""Learning a dictionary from signals: `learn_dictionary(x, method=..., n_atoms=...)`.

Methods:
- any encoder of the registry that can learn its own decoder (`Encoder.learns_dictionary`: "relu",
  "topk", "mlp", "binary-topk", "binary-entropy"): encoder and dictionary trained together;
- "sparse-coding": alternate codes from an inference encoder (any untrained one whose knob is k or
  lam: "fista", "omp", ...) on the current dictionary with a least-squares dictionary update (MOD), atoms renormalised, unused atoms
  resampled from the worst-reconstructed signals;
- "sklearn": scikit-learn's MiniBatchDictionaryLearning; "spams": SPAMS trainDL.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint, distributed
from ._validation import as_tensor, check_int_range, check_positive
from .dictionary import Dictionary
from .encoder import Encoder, suggest, to_numpy64
from .ops import unit_rows
from .registry import encoder_class, encoder_names, get_encoder
from .training import progress_callback

log = logging.getLogger(__name__)


@dataclass
class LearnedDictionary:
    """A learned dictionary, the encoder that produces its codes, and the training loss history."""

    dictionary: Dictionary
    encoder: Encoder
    losses: list[float] = field(default_factory=list)


def learning_methods() -> list[str]:
    """Names accepted by `learn_dictionary`."""
    trainable = [n for n in encoder_names() if _class_where(n, lambda cls: cls.learns_dictionary)]
    return [*trainable, *REFERENCE_METHODS]


def method_options(method: str) -> tuple[str, ...]:
    """The options `learn_dictionary` takes for `method` (besides seed): a reference method's keyword-only
    parameters, or the config fields of the encoder that learns."""
    if method in REFERENCE_METHODS:
        return tuple(name for name, p in inspect.signature(REFERENCE_METHODS[method]).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed")
    return tuple(encoder_class(method).Config.__dataclass_fields__)


def inference_methods() -> list[str]:
    """Encoders alternating sparse coding can take its codes from: untrained ones set by k or lam."""
    return [n for n in encoder_names() if _class_where(n, lambda cls: not cls.trainable and cls.knob in ("k", "lam"))]


def _class_where(name: str, test) -> bool:
    try:
        cls = encoder_class(name)
    except Exception:   # a broken plug-in can do nothing
        return False
    return bool(test(cls))


def learn_dictionary(x, method: str = "topk", n_atoms: int = 16, *, y=None, seed: int = 0,
                     input_scale: float = 1.0, **params) -> LearnedDictionary:
    """Learn `n_atoms` atoms from signals x (n, d).

    Parameters
    ----------
    x : (n, d) signals (torch or numpy); for trainable methods also an activation store or a range of
        one (``store.tokens(start, n)``), streamed batch by batch.
    method : see `learning_methods()`.
    n_atoms : atoms to learn.
    y : (n, d_out) targets for a transcoder (trainable methods only); default x.
    seed : seed of the initialisation and of the data order.
    input_scale : the factor x was multiplied by (an activation store's normalisation scale, when
        x comes from ``store.load(normalize=True)``); recorded as the dictionary's `input_scale`
        (and so the trained encoder's), for `evaluate` and `export` on raw activations.
    params : the method's options: the encoder's config fields for trainable methods; for
        "sparse-coding" `inference` ("fista"/"omp"), `k`, `lam`, `n_iter`, `resample`; for
        "sklearn" and "spams" `lam`, `n_iter`, `batch_size`.

    Returns
    -------
    LearnedDictionary(dictionary, encoder, losses)
    """
    from .activations import as_token_range
    streamed = as_token_range(x) is not None
    if not streamed:
        x = as_tensor(x, "x")
    check_int_range("n_atoms", n_atoms, 1)
    check_positive("input_scale", input_scale, allow_zero=False)
    learned = _learn(x, method, n_atoms, y, seed, params, streamed)
    if input_scale != 1.0:
        learned.dictionary.metadata["input_scale"] = float(input_scale)
    return learned


def _learn(x, method, n_atoms, y, seed, params, streamed: bool) -> LearnedDictionary:
    methods = learning_methods()
    if method not in methods:
        raise ValueError(f"unknown dictionary learning method {method!r}.{suggest(method, methods)} "
                         f"Methods: {', '.join(methods)}")
    if streamed and method in REFERENCE_METHODS:
        raise ValueError(f"method {method!r} needs its signals in memory; give x as a tensor "
                         "(e.g. store.load(n_tokens)) or use a trainable method, which streams the store")
    if method in REFERENCE_METHODS:
        if y is not None:
            raise ValueError(f"method {method!r} learns an autoencoding dictionary; transcoders (y) need a "
                             "trainable method")
        learn = REFERENCE_METHODS[method]
        _check_options(method, params)
        return learn(x, n_atoms, seed=seed, **params)
    enc = get_encoder(method, seed=seed, **params)
    dictionary = enc.learn(x, n_atoms, y)
    return LearnedDictionary(dictionary, enc, enc.losses)


def _check_options(method: str, params: dict) -> None:
    """A reference method's options are its keyword-only parameters: name an unknown one, with the list."""
    valid = method_options(method)
    for name in params:
        if name not in valid:
            raise ValueError(f"method {method!r} has no option {name!r}.{suggest(name, valid)} "
                             f"Options: {', '.join(valid)}")


def _alternating(x, n_atoms, *, seed=0, inference="fista", k=None, lam=0.1, n_iter=30, resample=True,
                 ridge=1e-6, checkpoint_every=0) -> LearnedDictionary:
    """Alternating minimisation: codes by `inference` on D, then D = argmin ||X - Z D||^2 (MOD).
    Within a `checkpoint.checkpoints` block it checkpoints every `checkpoint_every` iterations (0: every
    10 minutes) and resumes from a checkpoint of the same settings.

    Under a launcher (`sparsecode.distributed`) it is data-parallel: every rank holds the whole x (and
    so draws the same initial atoms) but encodes only its part (`Group.part`); the MOD system's sums
    (Z^T Z, Z^T X), the squared residuals and the atoms' use counts are summed over the ranks, so
    every rank solves the same system and N ranks follow one process's path up to float rounding.
    Unused atoms restart from the worst-reconstructed signals of the whole x (`Group.worst`)."""
    allowed = inference_methods()
    if inference not in allowed:
        raise ValueError(f"inference must be an untrained encoder set by k or lam, got {inference!r}."
                         f"{suggest(str(inference), allowed)} Choices: {', '.join(allowed)}")
    check_int_range("n_iter", n_iter, 1)
    check_int_range("checkpoint_every", checkpoint_every, 0)
    check_positive("lam", lam)
    settings = dict(seed=seed, inference=inference, k=k, lam=lam, n_iter=n_iter, resample=resample, ridge=ridge)
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    if n >= n_atoms:
        atoms = x[torch.randperm(n, generator=gen)[:n_atoms]].clone()
    else:
        atoms = torch.randn(n_atoms, d, generator=gen, dtype=x.dtype).to(x.device)
    atoms = atoms + 1e-3 * torch.randn(atoms.shape, generator=gen, dtype=x.dtype).to(x.device)
    atoms = unit_rows(atoms)
    if encoder_class(inference).knob == "k":
        knob = {"k": k if k is not None else max(1, min(d, n_atoms) // 4)}
    else:
        knob = {"lam": lam}
    enc = get_encoder(inference, **knob)
    losses = []
    callback = progress_callback()
    eye = torch.eye(n_atoms, dtype=x.dtype, device=x.device)
    saver = checkpoint.Checkpointer(f"sparse-coding ({inference})", {
        "settings": settings, "n_atoms": n_atoms, "data": checkpoint.data_checksum(x), "dtype": str(x.dtype)},
        checkpoint_every)
    first, saved = 0, saver.resume()
    if saved is not None:
        atoms = saved["atoms"].to(atoms)
        checkpoint.set_rng_state(saved, gen)
        first, losses = int(saved["step"]), saved["losses"].tolist()
    group = distributed.current()
    mine = group.part(n)
    x_mine = x[mine.start:mine.stop]
    for it in range(first, n_iter):
        codes = enc.fit(Dictionary(atoms)).encode(x_mine) if len(mine) else x.new_zeros(0, n_atoms)
        squares = (x_mine - codes @ atoms) ** 2
        parts = (codes.T @ codes, codes.T @ x_mine, (codes != 0).sum(0).to(x.dtype), squares.sum().reshape(1))
        if group.distributed:           # one all-reduce; alone, no copy of the n_atoms^2 Gram matrix
            totals = group.sum(torch.cat([p.reshape(-1) for p in parts])).split([p.numel() for p in parts])
            parts = tuple(t.view_as(p) for t, p in zip(totals, parts))
        gram, moment, use, square_sum = parts
        losses.append(float(square_sum[0] / (n * d)))
        atoms_new = torch.linalg.solve(gram + ridge * gram.diagonal().mean().clamp_min(1e-12) * eye, moment)
        used = use > 0
        atoms = torch.where(used[:, None], atoms_new, atoms)
        if resample and not bool(used.all()):
            unused = (~used).nonzero().flatten()[:n]            # at most one atom per signal
            (worst,) = group.worst(len(unused), squares.sum(1), x_mine)
            atoms[unused] = worst + 1e-3 * torch.randn(len(worst), d, generator=gen, dtype=x.dtype).to(x.device)
        atoms = unit_rows(atoms)
        if saver.due(it + 1, n_iter):
            saver.save(it + 1, {"atoms": atoms, "losses": torch.tensor(losses, dtype=torch.float64),
                                **checkpoint.rng_state(gen)})
        if callback is not None:
            callback(f"sparse-coding ({inference})", it + 1, n_iter, losses[-1])
        log.info("sparse-coding: iteration %d/%d mse %.6g, %d unused atoms", it + 1, n_iter, losses[-1],
                 int((~used).sum()))
    saver.finish()
    dictionary = Dictionary(atoms, metadata={"learned_by": f"sparse-coding/{inference}"})
    return LearnedDictionary(dictionary, enc.fit(dictionary), losses)


def _sklearn(x, n_atoms, *, seed=0, lam=0.1, n_iter=100, batch_size=256) -> LearnedDictionary:
    from sklearn.decomposition import MiniBatchDictionaryLearning
    model = MiniBatchDictionaryLearning(n_components=n_atoms, alpha=lam, max_iter=n_iter, batch_size=batch_size,
                                        random_state=seed, transform_algorithm="lasso_lars", transform_alpha=lam)
    model.fit(to_numpy64(x))
    atoms = torch.from_numpy(model.components_).to(device=x.device, dtype=x.dtype)
    dictionary = Dictionary(atoms, normalize=True, metadata={"learned_by": "sklearn MiniBatchDictionaryLearning"})
    return LearnedDictionary(dictionary, get_encoder("sklearn-lasso", lam=lam).fit(dictionary))


def _spams(x, n_atoms, *, seed=0, lam=0.1, n_iter=200, batch_size=256) -> LearnedDictionary:
    try:
        spams = importlib.import_module("spams")
    except ImportError:
        raise ImportError("method 'spams' needs SPAMS: pip install spams-bin") from None
    np.random.seed(seed)       # trainDL draws its initial atoms from numpy's global generator
    columns = np.asfortranarray(to_numpy64(x).T)
    init = np.asfortranarray(columns[:, np.random.permutation(columns.shape[1])[:n_atoms]]) \
        if columns.shape[1] >= n_atoms else None
    atoms = spams.trainDL(columns, D=init, K=n_atoms, lambda1=lam, mode=2, iter=n_iter, batchsize=batch_size,
                          numThreads=-1, verbose=False)
    atoms = torch.from_numpy(np.ascontiguousarray(atoms.T)).to(device=x.device, dtype=x.dtype)
    dictionary = Dictionary(atoms, normalize=True, metadata={"learned_by": "spams trainDL"})
    return LearnedDictionary(dictionary, get_encoder("spams-lasso", lam=lam).fit(dictionary))


#: Learning methods that are not encoders of the registry, and the function of each.
REFERENCE_METHODS = {"sparse-coding": _alternating, "sklearn": _sklearn, "spams": _spams}
