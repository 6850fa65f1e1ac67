"""Run several encoders on one shared dictionary and measure them side by side."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import _io, distributed, metrics
from ._validation import as_tensor, check_positive, resolve_device
from .data import Signals, as_signals, with_dictionary
from .dictionary import Dictionary
from .encoder import Encoded, Encoder, suggest
from .encoder_file import load_encoder
from .learning import learn_dictionary, learning_methods, method_options
from .registry import encoder_class, encoder_names, get_encoder
from .synthetic import SparseData
from .training import progress_callback

log = logging.getLogger(__name__)
_UNSET = object()

#: Tokens of a streamed store held in memory for calibrating sparsity knobs and checking shapes.
CALIBRATION_TOKENS = 4096

#: Column order of a comparison table (a row omits what is undefined for it).
COLUMNS = ("encoder", "k", "lam", "l1_coefficient", "fvu", "mse", "l0", "precision", "recall", "f1", "exact_support", "code_mcc",
           "nmse_db", "dictionary_mcc",
           "objective", "objective_gap", "objective_excess", "uncertified", "dead", "dense", "encode_s",
           "signals_per_s",
           "flops_per_signal", "fit_s")


@dataclass
class Comparison:
    """One row per encoder (a dict of metrics) and the settings that produced them."""

    rows: list[dict]
    settings: dict = field(default_factory=dict)

    def row(self, encoder: str) -> dict:
        for r in self.rows:
            if r["encoder"] == encoder:
                return r
        raise KeyError(f"no row for encoder {encoder!r}; rows: {[r['encoder'] for r in self.rows]}")

    def columns(self) -> list[str]:
        present = {key for r in self.rows for key in r}
        return [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))

    def knobs_note(self) -> str:
        """Which shared knobs were derived from the problem (see `defaults.default_knobs`), in words;
        empty when the user set them."""
        derived = self.settings.get("derived") or {}
        parts = []
        if "k" in derived:
            parts.append(f"k={derived['k']}")
        if "lam" in derived:
            parts.append(f"lam={derived['lam']:.3g}")
        return f"{' '.join(parts)} derived from the data (none given)" if parts else ""

    def title(self) -> str:
        """One line on what was compared: sizes, and the knobs derived from the data."""
        s = self.settings
        head = ", ".join(f"{key}={s[key]:,}" if isinstance(s.get(key), int) else f"{key}={s[key]}"
                         for key in ("n_samples", "d", "n_atoms") if s.get(key) is not None)
        note = self.knobs_note()
        return f"Comparison of {len(self.rows)} encoders" + (f" on {head}" if head else "") + (f"; {note}" if note else "")

    def to_text(self, width: int | None = None) -> str:
        """The rows as a plain-text table of at most `width` characters (None: every column); the
        columns that do not fit are named under it (`save` or `to_pandas` keeps them all)."""
        from .table import text_table
        return text_table(self.rows, self.columns(), self.title(), width)

    def __str__(self) -> str:
        import shutil
        return self.to_text(shutil.get_terminal_size((120, 24)).columns)

    __repr__ = __str__

    def to_pandas(self):
        """The rows as a pandas DataFrame, one row per encoder, columns in table order (pandas is
        optional: an ImportError names it)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("Comparison.to_pandas needs pandas: pip install pandas") from err
        return pd.DataFrame(self.rows, columns=self.columns())

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return buf.getvalue()

    def save(self, path) -> Path:
        """Write `.json` (rows and settings) or `.csv` (rows), chosen by the suffix, atomically.
        An existing file is replaced only if it holds comparison results (see `check_out`)."""
        path = self.check_out(path)
        if path.suffix == ".csv":
            _io.write_text(path, self.to_csv())
        else:
            _io.write_json(path, {"format": FORMAT, "settings": self.settings, "rows": self.rows})
        return path

    @staticmethod
    def check_out(path) -> Path:
        """Check before any work that `path` can take comparison results: a writable `.json` or `.csv`
        that is new or already holds results (ours: a JSON object with rows, a CSV starting with the
        encoder column); anything else is the user's and is refused."""
        path = _io.check_writable(path, "results file", suffixes=(".json", ".csv"))
        return _io.check_replace(path, "comparison results file", _is_results)


#: marker of a saved comparison's JSON
FORMAT = "sparsecode.comparison"


def _is_results(path: Path) -> bool:
    if path.suffix == ".csv":
        with open(path, encoding="utf-8") as fh:
            return fh.readline().startswith("encoder,")
    obj = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(obj, dict) and (obj.get("format") == FORMAT or ("rows" in obj and "settings" in obj))


class Unreachable(ValueError):
    """A target L0 the encoder cannot reach with any value of its knob (found before searching)."""


#: Signals on which `calibrate` checks, before searching, that the target L0 is reachable at all.
REACH_SAMPLE = 256


def calibrate(name: str, dictionary: Dictionary, x: torch.Tensor, target_l0: float, *, params: dict | None = None,
              x_train: torch.Tensor | None = None, rel_tol: float = 0.02, max_steps: int = 40) -> tuple[Encoder, float]:
    """Set an encoder's sparsity knob (`k`, `lam` or another penalty) so its mean L0 on `x` is `target_l0`.

    `k` is searched over integers (bisection on the monotone L0(k)); `lam` by bisection on
    log(lam) between lam_max = max |x D^T| (all codes zero) and lam_max * 1e-6, and any other
    penalty knob over the same range divided by the encoder's `lam_per_unit` (the lasso penalty one
    unit of that knob amounts to). Stops when the
    L0 is within `rel_tol` of the target (at least 0.05 absolute), or returns the closest value
    found. Returns the fitted encoder and its mean L0.

    An encoder with an `inference_knob` (a threshold only encoding reads) is fitted once, where its
    `knob` is k at k = the target rounded, and that threshold is bisected on the fitted encoder
    between its densest and its all-zero value (`Encoder.inference_range`); a target above its L0 at
    the densest value is `Unreachable`.

    Before searching, the target is checked against what the encoder can reach: above n_atoms,
    above `max_k` (k knob), above d for an encoder that solves the lasso (its solution is unique
    with at most d non-zeros for data in general position, and about min(d, n_atoms) as lam -> 0),
    and, for other encoders, above the L0 at the densest end of the knob's range, measured on
    `REACH_SAMPLE` signals. An unreachable target raises
    `Unreachable` (a ValueError) at once, with the reason.
    """
    check_positive("target_l0", target_l0, allow_zero=False)
    params = dict(params or {})
    cls = encoder_class(name)
    if cls.knob is None:
        raise ValueError(f"encoder {name!r} has no sparsity knob to calibrate (knob is None)")
    tol = max(rel_tol * target_l0, 0.05)
    if cls.inference_knob is not None:
        return _calibrate_at_inference(name, cls, dictionary, x, target_l0, params, x_train, tol, max_steps)
    fitted: dict = {}
    cache: dict = {}
    report = progress_callback()
    if cls.knob == "k":
        densest = cls.max_k(dictionary.n_atoms, dictionary.d)
        steps = 2 + max(1, math.ceil(math.log2(max(densest, 2))))
    else:
        scale = float((x @ dictionary.atoms_as(x.dtype, x.device).T).abs().max())
        scale /= cls.lam_per_unit(dictionary.n_atoms, dictionary.d)
        densest = scale * 1e-6
        steps = max_steps
    what = f"calibrating {name}'s {cls.knob} to L0 {target_l0:g}"

    def fit_at(value):
        if value not in fitted:
            enc = get_encoder(name, **{**params, cls.knob: value})
            # only trained encoders take training data (a store's token range would fail elsewhere)
            fitted[value] = enc.fit(dictionary, x_train) if cls.trainable else enc.fit(dictionary)
        return fitted[value]

    def l0_at(value):
        if value not in cache:
            enc = fit_at(value)
            cache[value] = (enc, metrics.mean_l0(enc.encode(x)))
            if report is not None:      # a bar with the time left: searches take minutes on large problems
                report(what, min(len(cache), steps), steps, float("nan"))
        return cache[value][1]

    if report is not None:
        report(what, 0, steps, float("nan"))
    if cls.knob == "k" and target_l0 <= min(densest, dictionary.n_atoms):
        # Where an encoder's L0 is its k (OMP, TopK: exactly k non-zeros), the first try is the answer
        # and no search, nor the costly reach check at the densest k, is needed.
        first = max(1, round(target_l0))
        if abs(l0_at(first) - target_l0) <= tol:
            if report is not None:
                report(what, steps, steps, float("nan"))
            return cache[first]
    _check_reachable(name, cls, dictionary, x, target_l0, tol, fit_at, densest)
    if cls.knob == "k":
        low, high = 1, densest
        while high - low > 1:
            mid = (low + high) // 2
            if l0_at(mid) < target_l0:
                low = mid
            else:
                high = mid
        candidates = [low, high]
    else:
        lo, hi = math.log(densest), math.log(scale)        # L0 falls as lam grows
        candidates = []
        for _ in range(max_steps):
            mid = math.exp((lo + hi) / 2)
            candidates.append(mid)
            l0 = l0_at(mid)
            if abs(l0 - target_l0) <= tol:
                break
            if l0 > target_l0:
                lo = math.log(mid)
            else:
                hi = math.log(mid)
    best = min(candidates, key=lambda v: abs(l0_at(v) - target_l0))
    if report is not None:
        report(what, steps, steps, float("nan"))
    enc, l0 = cache[best]
    if abs(l0 - target_l0) > tol:
        log.warning("%s: calibrated %s=%.4g gives L0=%.3f, target %.3f", name, cls.knob, best, l0, target_l0)
    return enc, l0


def _calibrate_at_inference(name, cls, dictionary: Dictionary, x, target_l0, params, x_train, tol,
                            max_steps) -> tuple[Encoder, float]:
    """`calibrate` for an encoder with an inference knob: one fit, then `calibrate_inference`."""
    if target_l0 > dictionary.n_atoms:
        raise Unreachable(f"target_l0={target_l0:g} is more than the dictionary's n_atoms={dictionary.n_atoms}")
    if cls.knob == "k":
        params = {**params, "k": min(max(1, round(target_l0)), cls.max_k(dictionary.n_atoms, dictionary.d))}
    enc = get_encoder(name, **params)
    enc = enc.fit(dictionary, x_train) if cls.trainable else enc.fit(dictionary)
    return _bisect_inference(enc, x, target_l0, tol, max_steps)


def calibrate_inference(encoder: Encoder, x, target_l0: float, *, rel_tol: float = 0.02,
                        max_steps: int = 40) -> tuple[Encoder, float]:
    """Set a fitted encoder's `inference_knob` (a threshold only encoding reads) so its mean L0 on `x` is
    `target_l0`, by bisection between its densest and its all-zero value; nothing is refitted.

    Returns a copy sharing the fitted state (`Encoder.retuned`) and its mean L0; within `rel_tol` of
    the target (at least 0.05 absolute), else the closest value found, with a warning. A target above
    the L0 at the densest value raises `Unreachable`. This is what `calibrate` does after fitting such an
    encoder; use it on an encoder trained elsewhere (e.g. with its own dictionary by `learn_dictionary`).
    """
    check_positive("target_l0", target_l0, allow_zero=False)
    if not isinstance(encoder, Encoder) or encoder.inference_knob is None:
        raise ValueError(f"{getattr(encoder, 'name', encoder)!r} has no inference knob to calibrate "
                         "(inference_knob is None)")
    if not encoder.is_fitted:
        raise RuntimeError(f"encoder {encoder.name!r} is not fitted: calibrate_inference sets a threshold on a "
                           "fitted encoder")
    x = as_tensor(x, "x")
    return _bisect_inference(encoder, x, target_l0, max(rel_tol * target_l0, 0.05), max_steps)


def _bisect_inference(enc: Encoder, x, target_l0, tol, max_steps) -> tuple[Encoder, float]:
    knob = enc.inference_knob
    report = progress_callback()
    what = f"calibrating {enc.name}'s {knob} to L0 {target_l0:g}"
    if report is not None:
        report(what, 0, max_steps, float("nan"))
    lo, hi = enc.inference_range(x)
    found: dict = {}

    def l0_at(value: float) -> float:
        if value not in found:
            tuned = enc.retuned(**{knob: value})
            found[value] = (tuned, metrics.mean_l0(tuned.encode(x)))
            if report is not None:
                report(what, min(len(found), max_steps), max_steps, float("nan"))
        return found[value][1]

    densest = l0_at(lo)
    if densest + tol < target_l0:
        raise Unreachable(f"target_l0={target_l0:g} is out of {enc.name}'s reach: at its densest {knob}={lo:.3g} "
                          f"its mean L0 is {densest:.3g}; train it denser (its {enc.knob})")
    # L0 falls as the knob grows: keep L0(lo) > target > L0(hi)
    for _ in range(0 if abs(densest - target_l0) <= tol else max_steps):
        mid = (lo + hi) / 2
        if mid in (lo, hi):            # no float between them: the closest value is one of the two
            break
        l0 = l0_at(mid)
        if abs(l0 - target_l0) <= tol:
            break
        if l0 > target_l0:
            lo = mid
        else:
            hi = mid
    if report is not None:
        report(what, max_steps, max_steps, float("nan"))
    best = min(found, key=lambda v: abs(found[v][1] - target_l0))
    tuned, l0 = found[best]
    if abs(l0 - target_l0) > tol:
        log.warning("%s: calibrated %s=%.4g gives L0=%.3f, target %.3f", enc.name, knob, best, l0, target_l0)
    return tuned, l0


def _check_reachable(name, cls, dictionary: Dictionary, x, target_l0, tol, fit_at, densest) -> None:
    """Raise `Unreachable` when no knob value can give `target_l0` (see `calibrate`)."""
    n_atoms, d = dictionary.n_atoms, dictionary.d
    if target_l0 > n_atoms:
        raise Unreachable(f"target_l0={target_l0:g} is more than the dictionary's n_atoms={n_atoms}")
    if cls.knob == "k" and target_l0 > densest:
        raise Unreachable(f"target_l0={target_l0:g} is more than {name} can reach here (k is at most {densest})")
    if cls.solves_lasso and target_l0 > d:
        raise Unreachable(f"target_l0={target_l0:g} is more than d={d}: a lasso solution has at most d non-zeros "
                          f"(data in general position), whatever lam")
    if cls.solves_lasso:
        return       # near lam = 0 the lasso keeps min(d, n_atoms) atoms: nothing to measure, and slow to solve
    sample = x[:REACH_SAMPLE]
    per_signal = (fit_at(densest).encode(sample) != 0).sum(1).double()
    # a margin of three standard errors keeps a subsample's noise from refusing a reachable target
    margin = 3 * float(per_signal.std()) / math.sqrt(len(per_signal)) if len(per_signal) > 1 else 0.0
    reach = float(per_signal.mean())
    if reach + tol + margin < target_l0:
        knob = f"k={densest}" if cls.knob == "k" else f"{cls.knob}={densest:.3g} (its lam_max * 1e-6)"
        raise Unreachable(f"target_l0={target_l0:g} is out of {name}'s reach: at its densest setting, {knob}, "
                          f"its mean L0 is {reach:.3g} (on {len(per_signal)} signals)")


def compare(encoders: Sequence, data, dictionary=None, *, k: int | None = None, lam: float | None = None,
            encoder_params: dict[str, dict] | None = None, target_l0: float | None = None,
            x_train=None, joint: bool = False, n_atoms: int | None = None, seed: int = 0,
            reference: str | None = "auto", repeats: int = 1, device=None,
            callback: Callable[[str, str], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None, batch_size: int = 4096,
            gap_reference=_UNSET) -> Comparison:
    """Encode `data` with every encoder on one shared dictionary and measure each.

    Parameters
    ----------
    encoders : names from the registry, e.g. ``["fista", "omp", "spams-omp"]``, or already fitted
        Encoder objects / paths of saved trained encoders (used as they are). With ``joint=True``:
        dictionary learning methods (see `learning_methods()`).
    data : SparseData (with true codes and dictionary), an array x (n, d), a dict
        ``{"x": ..., "codes": ...}``, or an `ActivationStore` / a range of one (``store.tokens(start,
        n)``): a store is read batch by batch and every metric accumulated over all its tokens, so
        it may be larger than memory (calibration with `target_l0` uses its first 4,096 tokens).
    dictionary : a Dictionary, atoms (n_atoms, d), a saved dictionary path, or "true"/None for
        the synthetic data's own dictionary.
    k, lam : set on every encoder that has that config field. `lam` is always the lasso penalty
        ``0.5 ||x - z D||^2 + lam ||z||_1`` per signal; encoders with another penalty name it otherwise
        (relu, mlp, ito, gated: `l1_coefficient`) and are set through `encoder_params`. Where not given
        (and no `target_l0` calibrates them), they are derived from the problem by
        `defaults.default_knobs` (k: the true codes' L0, else min(16, d // 2, n_atoms); lam: 0.1 x the
        median lam_max of the signals), recorded in ``settings["derived"]`` and named in the title.
    encoder_params : per-encoder config fields, ``{"fista": {"lam": 0.05}}``; they win over k/lam.
    target_l0 : calibrate each encoder's knob so its mean L0 matches (see `calibrate`). The lasso
        solvers share one `lam`: the first is calibrated, and the others solve the same problem at its
        lam (their L0 agree to the solvers' tolerance), so their rows compare solvers, not penalties.
    x_train : training signals for trainable encoders (and for learning, with joint=True).
    joint : paper c's "unknown D and Z": each method learns its own dictionary (n_atoms atoms,
        default the true dictionary's) from x_train, then encodes the data; rows report dictionary
        MCC and code MCC against the truth (latents matched), FVU and L0.
    seed : seed of every training run.
    reference : the lasso solver whose optimum at each row's (lam, positive) is the reference of
        `objective_gap` and `objective_excess`: an encoder name that solves the lasso (run tightly
        converged: tol 1e-9 on the duality gap where it has those options), "none"/None for no
        reference, or "auto" (the default): "fista", but only when an encoder of the comparison
        solves the lasso and the problem is small (n_atoms * n_samples <= `AUTO_REFERENCE_MAX`).
        Each reference solve runs once per (lam, positive) and is reused by every row; it is shown
        as its own step in a progress display (`training.progress`). Only rows of encoders that
        solve the lasso (`Encoder.solves_lasso`) get `objective`, `objective_gap` and
        `objective_excess`: for other encoders the lasso objective is not what they minimise.
        `gap_reference` is the former name of this argument.
    repeats : encode this many times and report the median time.
    callback : called as ``callback(encoder, "start"|"done")`` for progress display.
    progress : called as ``progress(encoder, signals_done, signals_total)`` after each batch of a store.
    batch_size : signals per batch when streaming a store.

    Returns
    -------
    Comparison with one row per encoder.
    """
    if gap_reference is not _UNSET:
        warnings.warn("compare(gap_reference=...) is now compare(reference=...)", DeprecationWarning, stacklevel=2)
        reference = gap_reference
    items = list(encoders)
    if not items:
        raise ValueError("no encoders given")
    if lam is not None:
        check_positive("lam", lam)
    device = resolve_device(device)
    from .activations import as_token_range
    stream = as_token_range(data)
    if stream is not None:
        if joint:
            raise ValueError("a joint comparison learns from x_train: give it tensors, not an activation store")
        check_positive("batch_size", batch_size, allow_zero=False)
        data = {"x": stream.head(CALIBRATION_TOKENS)}
    if joint:
        return _compare_joint(items, data, x_train, n_atoms, encoder_params or {}, seed, device, callback,
                              k if k is not None else getattr(data, "k", None), lam)
    names = []
    for item in items:
        if isinstance(item, str) and not item.endswith(".safetensors"):
            encoder_class(item)                      # unknown names fail before any work
            names.append(item)
        else:
            names.append(_loaded(item).name)
    unknown = set(encoder_params or {}) - set(names)
    if unknown:
        raise ValueError(f"options given for encoders not compared: {sorted(unknown)}")
    d = with_dictionary(data, dictionary, device)
    if k is None and isinstance(data, SparseData):
        k = data.k
    derived = {}
    if target_l0 is None and (k is None or lam is None):     # calibration sets the knobs itself
        from .defaults import default_knobs
        knobs = default_knobs(d.x, d.dictionary, d.codes)
        derived = {key: knobs[key] for key, given in (("k", k), ("lam", lam)) if given is None}
        k, lam = derived.get("k", k), derived.get("lam", lam)
    if x_train is not None and as_token_range(x_train) is None:
        x_train = as_tensor(x_train, "x_train", device=device, dtype=d.x.dtype)
    n_samples = d.x.shape[0] if stream is None else stream.n_tokens
    solver = _choose_reference(reference, items, names, d, n_samples)
    settings = {"encoders": names, "n_samples": n_samples, "d": d.dictionary.d, "n_atoms": d.dictionary.n_atoms,
                "k": k, "lam": lam, "target_l0": target_l0, "device": str(device), "dtype": str(d.x.dtype),
                "encoder_params": encoder_params or {}, "reference": solver, "seed": seed, "derived": derived}
    references: dict[tuple, torch.Tensor] = {}
    rows = []
    lasso_lams: dict = {}     # calibrated once per lasso problem: its other solvers then solve the same one
    for item, name in zip(items, names):
        if callback:
            callback(name, "start")
        if isinstance(item, str) and not item.endswith(".safetensors"):
            params = (encoder_params or {}).get(name, {})
            problem = lasso_problem(name, params) if target_l0 is not None else None
            try:
                if problem in lasso_lams:
                    enc, fit_s = _prepare(name, d, k, lasso_lams[problem], params, None, x_train, seed)
                else:
                    enc, fit_s = _prepare(name, d, k, lam, params, target_l0, x_train, seed)
                    if problem is not None:
                        lasso_lams[problem] = enc.config.lam
                        settings.setdefault("lasso_lam_calibrated_by", []).append(name)
            except Unreachable as err:
                log.warning("%s skipped: %s", name, err)
                rows.append({"encoder": name, "skipped": str(err)})
                if callback:
                    callback(name, "done")
                continue
        else:
            enc, fit_s = _loaded(item), 0.0
            if enc.dictionary.n_atoms != d.dictionary.n_atoms or enc.dictionary.d != d.dictionary.d:
                raise ValueError(f"encoder {name!r} was fitted to a ({enc.dictionary.n_atoms}, {enc.dictionary.d}) "
                                 f"dictionary, the comparison uses ({d.dictionary.n_atoms}, {d.dictionary.d})")
        rows.append(_measure(enc, d, solver, references, repeats, fit_s, stream, batch_size, progress))
        if callback:
            callback(name, "done")
    for key in [key for key in derived if not any(key in r for r in rows)]:
        del derived[key]                     # no encoder has that knob: nothing was derived for it
    return Comparison(rows, settings)


#: Above this many atoms a row has no code_mcc: the Hungarian matching of latents takes n_atoms^2
#: memory and n_atoms^3 time (42 s at 16,384 atoms on the 2-core machine, against a second for the
#: encoders); precision/recall/F1 of the supports measure the same recovery without matching.
CODE_MCC_MAX_ATOMS = 4096

#: `reference="auto"` runs the reference solver only up to this many n_atoms * n_samples (a
#: tightly converged FISTA on 1,024 atoms and 4,096 signals takes seconds on a CPU; on an imported
#: SAE of 16k latents, minutes).
AUTO_REFERENCE_MAX = 1 << 22
AUTO_REFERENCE = "fista"


def _choose_reference(reference, items, names, d: Signals, n_samples: int) -> str | None:
    """The reference solver's name, or None (see `compare`'s `reference`)."""
    if reference is None or reference == "none":
        return None
    if not isinstance(reference, str):
        raise TypeError(f"reference takes an encoder name, 'auto' or 'none', got {reference!r}")
    if reference == "auto":
        lasso_rows = [n for item, n in zip(items, names) if _solves_lasso(item, n)]
        size = d.dictionary.n_atoms * n_samples
        if not lasso_rows:
            return None
        if size > AUTO_REFERENCE_MAX:
            log.warning("no objective gap: the reference solver is off for n_atoms * n_samples = %d > %d "
                        "(reference='auto'); ask for one with reference=%r (--reference %s)",
                        size, AUTO_REFERENCE_MAX, AUTO_REFERENCE, AUTO_REFERENCE)
            return None
        return AUTO_REFERENCE
    cls = encoder_class(reference)
    if not cls.solves_lasso:
        lasso = [n for n in encoder_names() if _solves_lasso(n, n)]
        raise ValueError(f"reference {reference!r} does not solve the lasso objective; lasso solvers: "
                         f"{', '.join(lasso)} (or 'auto', 'none')")
    return reference


def lasso_problem(name: str, params: dict) -> tuple | None:
    """What, besides `lam`, defines the lasso problem encoder `name` solves with config `params` (its sign
    constraint), or None when it solves none with a calibratable `lam` (a lam given in `params` is kept).
    Solvers of one problem at one lam reach one solution, so calibrating one of them calibrates all."""
    cls = encoder_class(name)
    if not cls.solves_lasso or cls.knob != "lam" or "lam" in params:
        return None
    return (bool(params.get("positive", getattr(cls.Config, "positive", False))),)


def _solves_lasso(item, name) -> bool:
    if isinstance(item, Encoder):
        return bool(item.solves_lasso)
    if isinstance(item, str) and not item.endswith(".safetensors"):
        try:
            return bool(encoder_class(name).solves_lasso)
        except Exception:      # a broken plug-in solves nothing
            return False
    return False               # trained encoders (saved files) are amortised, not solvers


def _shared_knobs(method: str, k, lam) -> dict:
    """The comparison's k and lam, for the learning methods that take them (and were set)."""
    fields = method_options(method)
    return {key: value for key, value in (("k", k), ("lam", lam)) if key in fields and value is not None}


def _loaded(item) -> Encoder:
    if isinstance(item, Encoder):
        if item.dictionary is None:
            raise ValueError(f"encoder object {item.name!r} is not fitted; pass its name to have it fitted")
        return item
    return load_encoder(item)


def _prepare(name, d: Signals, k, lam, params, target_l0, x_train, seed) -> tuple[Encoder, float]:
    cls = encoder_class(name)
    fields = set(cls.Config.__dataclass_fields__)
    config = {}
    if "k" in fields and k is not None:
        config["k"] = k
    if "lam" in fields and lam is not None:
        config["lam"] = lam
    if "seed" in fields:
        config["seed"] = seed
    config.update(params)
    if cls.trainable and x_train is None:
        raise ValueError(f"encoder {name!r} is trained: give training signals (x_train; on the command line "
                         "--n-train for synthetic data)")
    start = time.perf_counter()
    if target_l0 is not None:
        enc, _ = calibrate(name, d.dictionary, d.x, target_l0, params=config, x_train=x_train)
    else:
        enc = get_encoder(name, **config)
        enc.fit(d.dictionary, x_train) if cls.trainable else enc.fit(d.dictionary)
    return enc, time.perf_counter() - start


def _compare_joint(methods, data, x_train, n_atoms, params, seed, device, callback, k, lam) -> Comparison:
    known = learning_methods()
    for m in methods:
        if not isinstance(m, str) or m not in known:
            raise ValueError(f"joint comparison takes dictionary learning methods; {m!r} is not one."
                             f"{suggest(str(m), known)} Methods: {', '.join(known)}")
    unknown = set(params) - set(methods)
    if unknown:
        raise ValueError(f"options given for methods not compared: {sorted(unknown)}")
    d = as_signals(data, device)
    true = d.dictionary
    true_atoms = None if true is None else true.atoms
    n_atoms = n_atoms or (None if true is None else true.n_atoms)
    if n_atoms is None:
        raise ValueError("joint comparison needs n_atoms when the data has no true dictionary")
    x_train = d.x if x_train is None else as_tensor(x_train, "x_train", device=device, dtype=d.x.dtype)
    rows = []
    for method in methods:
        if callback:
            callback(method, "start")
        start = time.perf_counter()
        options = {**_shared_knobs(method, k, lam), **params.get(method, {})}
        learned = learn_dictionary(x_train, method, n_atoms, seed=seed, **options)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        info = learned.encoder.encode_with_info(d.x)
        encode_s = time.perf_counter() - start
        codes = info.codes
        x_hat = learned.dictionary.decode(codes)
        row = {"encoder": method, "fvu": metrics.fvu(d.x, x_hat), "mse": metrics.mse(d.x, x_hat),
               "l0": metrics.mean_l0(codes)}
        if d.codes is not None:
            row["code_mcc"] = metrics.code_mcc(d.codes, codes)
        if true_atoms is not None:
            row["dictionary_mcc"] = metrics.dictionary_mcc(true_atoms, learned.dictionary.atoms)
        row.update(dead=metrics.dead_fraction(codes), dense=metrics.dense_fraction(codes), encode_s=encode_s,
                   signals_per_s=d.x.shape[0] / max(encode_s, 1e-12),
                   flops_per_signal=learned.encoder.flops_per_signal(info), fit_s=fit_s)
        rows.append(row)
        if callback:
            callback(method, "done")
    settings = {"joint": True, "methods": list(methods), "n_samples": d.x.shape[0], "n_train": x_train.shape[0],
                "n_atoms": n_atoms, "d": d.x.shape[1], "seed": seed, "params": params}
    return Comparison(rows, settings)


def timed_encode(enc: Encoder, x: torch.Tensor, repeats: int = 1, warmup: bool = False) -> tuple[float, torch.Tensor]:
    """Median wall time of `repeats` encodes of x (synchronising CUDA), and the codes."""
    seconds, info = timed_encode_info(enc, x, repeats, warmup)
    return seconds, info.codes


def timed_encode_info(enc: Encoder, x: torch.Tensor, repeats: int = 1, warmup: bool = False) -> tuple[float, Encoded]:
    """Median wall time of `repeats` encodes of x (synchronising CUDA), and the last `Encoded`."""
    if warmup:
        enc.encode(x[: min(64, x.shape[0])])      # caches, allocator, thread pools
    times = []
    for _ in range(max(1, repeats)):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        info = enc.encode_with_info(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), info


def _measure(enc: Encoder, d: Signals, reference, references, repeats, fit_s, stream=None,
             batch_size: int = 4096, progress=None) -> dict:
    """One comparison row: `d.x` encoded at once, or the `stream` (a store's tokens) batch by batch.
    Both accumulate the set-level metrics the same way (`metrics.MetricAccumulator`); only encoders
    that solve the lasso get its objective and, against `reference`, the gap to its optimum."""
    name = enc.name
    row = {"encoder": name}
    for knob in dict.fromkeys(("k", "lam", enc.knob, enc.inference_knob)):
        if knob is not None and hasattr(enc.config, knob):
            row[knob] = getattr(enc.config, knob)
    lasso = bool(enc.solves_lasso)
    row_lam = enc.config.lam if lasso else None          # a lasso solver's config has the lam it solves at
    positive = bool(getattr(enc.config, "positive", False))
    acc = metrics.MetricAccumulator(d.dictionary.n_atoms)
    uncertified = last = None
    objective = ref = trivial = None
    if stream is None:
        n = d.x.shape[0]
        encode_s, info = timed_encode_info(enc, d.x, repeats)
        last = info
        codes, uncertified = info.codes, info.uncertified
        objective = _accumulate(acc, d.x, codes, d.dictionary, row_lam if lasso else None)
        if d.codes is not None:
            row.update(metrics.support_scores(d.codes, codes))
            row["exact_support"] = metrics.exact_support_rate(d.codes, codes)
            if d.dictionary.n_atoms <= CODE_MCC_MAX_ATOMS:
                row["code_mcc"] = metrics.code_mcc(d.codes, codes)
            else:
                log.info("%s: code_mcc skipped: its one-to-one matching of %d latents costs n_atoms^3 time and "
                         "n_atoms^2 memory (limit %d); support scores stand in", name, d.dictionary.n_atoms,
                         CODE_MCC_MAX_ATOMS)
            row["nmse_db"] = metrics.nmse_db(d.codes, codes)        # of the codes (compressed-sensing convention)
        if lasso and reference is not None:
            ref = _reference_objective(d, row_lam, positive, reference, references)
            trivial = metrics.lasso_objective(d.x, torch.zeros_like(codes), d.dictionary.atoms, 0.0, d.dictionary.bias)
    else:
        # under a launcher each rank encodes its contiguous run of the batches (its shards) and
        # the sums are reduced exactly: the row is the whole store's
        group = distributed.current()
        mine = group.part(-(-stream.n_tokens // batch_size))
        lo, hi = mine.start * batch_size, min(mine.stop * batch_size, stream.n_tokens)
        part = type(stream)(stream.store, stream.start + lo, hi - lo, stream.normalize)
        n, encode_s, flops = 0, 0.0, 0.0
        key = ("store", row_lam, positive, reference)
        totals = [0.0, 0.0] if lasso and reference is not None and key not in references else None
        for xb in part.batches(batch_size):
            xb = xb.to(device=d.x.device, dtype=d.x.dtype)
            seconds, info = timed_encode_info(enc, xb)
            last = info
            encode_s += seconds
            flops += enc.flops_per_signal(info) * xb.shape[0]      # it depends on the batch (iterations)
            _accumulate(acc, xb, info.codes, d.dictionary, row_lam if lasso else None)
            if info.uncertified is not None:
                uncertified = (uncertified or 0) + info.uncertified
            if totals is not None:
                # the same batches for every encoder: the reference totals are computed once per (lam, positive)
                batch = Signals(xb, None, d.dictionary)
                totals[0] += float(_reference_objective(batch, row_lam, positive, reference, references,
                                                        keep=False).sum())
                totals[1] += float(metrics.lasso_objective(xb, torch.zeros_like(info.codes), d.dictionary.atoms, 0.0,
                                                           d.dictionary.bias).sum())
            n += xb.shape[0]
            if progress is not None:
                progress(name, n, part.n_tokens)
        (acc,) = distributed.reduce_accumulators(group, [acc])
        n, encode_s = stream.n_tokens, group.max(encode_s)        # the job's time: its slowest rank
        flops = float(group.sum(torch.tensor([flops], dtype=torch.float64))) / n
        counts = group.gather(uncertified)
        uncertified = None if all(c is None for c in counts) else sum(c or 0 for c in counts)
        if totals is not None:
            references[key] = group.sum(torch.tensor(totals, dtype=torch.float64)).tolist()
        if lasso:
            objective = torch.tensor([acc.objective_sum / n], dtype=torch.float64)
            if reference is not None:
                ref, trivial = (torch.tensor([t / n], dtype=torch.float64) for t in references[key])
    row.update(acc.result())
    if lasso and ref is not None:
        gap = metrics.relative_gap(objective, ref, trivial)
        row["objective_excess"] = metrics.excess_objective(objective, ref)
        if not math.isnan(gap):
            row["objective_gap"] = gap
        else:
            log.warning("%s: the lasso optimum at lam=%g is ~0 (exact reconstruction), so a relative gap is "
                        "undefined; objective_excess (%.3g per signal) is the absolute gap", name, row_lam,
                        row["objective_excess"])
    if uncertified is not None:
        row["uncertified"] = uncertified
    row.update(encode_s=encode_s, signals_per_s=n / encode_s if encode_s > 0 else float("inf"),
               flops_per_signal=enc.flops_per_signal(last) if stream is None else flops, fit_s=fit_s)
    log.info("%s: %s", name, {k_: round(v, 4) if isinstance(v, float) else v for k_, v in row.items()})
    return row


def _accumulate(acc: metrics.MetricAccumulator, x, codes, dictionary: Dictionary, lam: float | None):
    """Add a batch's reconstructions (and, given `lam`, its lasso objectives) to `acc`; returns the
    objectives (n,) or None."""
    objective = None if lam is None else metrics.lasso_objective(x, codes, dictionary.atoms, lam, dictionary.bias)
    acc.update(x, dictionary.decode(codes), codes, objective)
    return objective


#: signals per step of a watched reference solve (see `_reference_objective`)
REFERENCE_CHUNK = 256


def _reference_objective(d: Signals, lam: float, positive: bool, solver: str, cache: dict,
                         keep: bool = True) -> torch.Tensor:
    """Per-signal lasso objective of the reference solver at (lam, positive) on `d.x`. The fitted
    solver (float64 dictionary, its Lipschitz constant and Gram matrix) is made once per comparison
    and kept in `cache`; so is the objective unless `keep` is False (a streamed store's batches)."""
    key = (lam, positive)
    if key in cache:
        return cache[key]
    ref = _reference_solver(d.dictionary, lam, positive, solver, cache)
    what = f"reference {solver} (lam={lam:g}{', positive' if positive else ''})"
    report = progress_callback()
    n = d.x.shape[0]
    # in chunks only where someone watches: the bar's time left needs steps, the solve itself does not
    chunk = n if report is None else max(REFERENCE_CHUNK, -(-n // 20))
    if report is not None:
        report(what, 0, n, float("nan"))
    start = time.perf_counter()
    parts = []
    for lo in range(0, n, chunk):
        x64 = d.x[lo:lo + chunk].to(torch.float64)
        parts.append(metrics.lasso_objective(x64, ref.encode(x64), d.dictionary.atoms, lam, d.dictionary.bias))
        if report is not None:
            report(what, min(lo + chunk, n), n, float("nan"))
    objective = torch.cat(parts)
    log.info("%s: %.3g s", what, time.perf_counter() - start)
    if keep:
        cache[key] = objective
    return objective


def _reference_solver(dictionary: Dictionary, lam: float, positive: bool, solver: str, cache: dict) -> Encoder:
    key = ("solver", lam, positive)
    if key not in cache:
        params = encoder_class(solver).reference_params(lam, positive)
        cache[key] = get_encoder(solver, **params).fit(dictionary.to(dtype=torch.float64))
    return cache[key]
