"""Speed benchmark: our solvers against the C++ and scikit-learn references in one run."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from . import metrics
from .compare import timed_encode
from ._validation import resolve_device
from .registry import get_encoder
from .synthetic import make_sparse_data

log = logging.getLogger(__name__)

#: (encoder, reference it is compared with, config fields from the knobs).
SPEED_GROUPS = (
    ("omp", "spams-omp", "k"), ("spams-omp", "spams-omp", "k"), ("sklearn-omp", "spams-omp", "k"),
    ("fista", "spams-lasso", "lam"), ("ista", "spams-lasso", "lam"), ("spams-lasso", "spams-lasso", "lam"),
    ("sklearn-lasso", "spams-lasso", "lam"),
)
SLOW = {"sklearn-omp", "sklearn-lasso", "ista"}   # timed once: each run takes seconds


def speed(n_samples: int = 4096, d: int = 256, n_atoms: int = 1024, k: int = 16, lam: float = 0.05,
          repeats: int = 5, threads: int = 0, device="cpu", seed: int = 0,
          encoders: tuple[str, ...] | None = None,
          callback: Callable[[str], None] | None = None) -> list[dict]:
    """Median throughput of each encoder on one synthetic problem, with its ratio to the reference.

    Our encoders run on `device`; SPAMS and scikit-learn on the CPU (float64, as they need).
    Support F1 against the planted codes and, for lasso solvers, the relative objective gap to
    SPAMS's LARS solution show that the ratios compare equal answers.
    """
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    data = make_sparse_data(n_samples, d, n_atoms, k, seed=seed)
    x = data.x.to(device)
    dictionary = data.dictionary.to(device)
    rows, throughput, objectives = [], {}, {}
    for name, reference, knob in SPEED_GROUPS:
        if encoders is not None and name not in encoders:
            continue
        if callback:
            callback(name)
        params = {knob: k if knob == "k" else lam}
        if name.startswith("spams"):
            params["threads"] = threads or -1
        try:
            enc = get_encoder(name, **params).fit(dictionary)
        except ImportError as err:
            log.warning("skipping %s: %s", name, err)
            continue
        seconds, codes = timed_encode(enc, x, 1 if name in SLOW else repeats, warmup=True)
        throughput[name] = n_samples / seconds
        row = {"encoder": name, "reference": reference, "signals_per_s": throughput[name],
               "f1": metrics.support_scores(data.codes, codes.cpu())["f1"], "l0": metrics.mean_l0(codes.cpu())}
        if knob == "lam":
            objectives[name] = metrics.lasso_objective(data.x, codes.cpu(), data.dictionary.atoms, lam)
        rows.append(row)
    for row in rows:
        ref = row["reference"]
        row["ratio"] = row["signals_per_s"] / throughput[ref] if ref in throughput else float("nan")
        if row["encoder"] in objectives and ref in objectives:
            row["objective_gap"] = metrics.relative_gap(objectives[row["encoder"]], objectives[ref])
    return rows
