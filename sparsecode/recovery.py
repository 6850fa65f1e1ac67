"""Synthetic recovery benchmarks: sweep planted problems over a grid, for many encoders and seeds.

Each cell (one point of the grid, one seed) draws a planted problem, trains the learned encoders
on its training split and compares every encoder on its test split. Comparisons are matched:
by default every encoder's sparsity knob is calibrated so its mean L0 equals the planted k
(``match="l0"``); ``budget=T`` instead gives every iterative encoder T iterations per signal.
Cells append to a JSON-lines file as they finish, so an interrupted sweep resumes where it stopped.

A results file starts with a header line (``format``, the preset and the settings that shape every
cell: sample counts, matching, budget, device); each record after it holds one cell and the
encoders run on it, with their options. A resume appends what is missing (other grid values,
seeds or encoders) and stops, naming the difference, when the settings or an encoder's options
differ from those recorded. A file without the header is not ours: it is never appended to.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import _io
from ._validation import check_int_range, resolve_device
from .compare import compare, lasso_problem
from .encoder import suggest
from .registry import encoder_class
from .synthetic import make_sparse_data

log = logging.getLogger(__name__)

#: grid axes and the generator argument each one sets
AXES = ("n_atoms", "d", "k", "snr_db", "coherence", "power_law")


@dataclass(frozen=True)
class Preset:
    """A named sweep: grid axes (each a list of values), fixed settings, encoders and seeds."""

    name: str
    grid: dict
    encoders: tuple
    fixed: dict = field(default_factory=dict)
    seeds: int = 3
    n_samples: int = 512
    n_train: int = 1024
    encoder_params: dict = field(default_factory=dict)
    description: str = ""


TRAINED = {"steps": 1500, "lr": 3e-3}
#: The SAE variants of SAELens / dictionary_learning: matched by one training, then an inference threshold
#: calibrated to the planted k (`Encoder.inference_knob`).
SAE_VARIANTS = ("jumprelu", "batch-topk", "matryoshka", "gated")
#: Encoders added beside the SAE variants: a pursuit SAE (k distinct atoms) and gradient pursuit (OMP's
#: selection at k). admm, cd and lca reach FISTA's lasso optimum, certified by the same duality gap, so
#: their codes are FISTA's row again, and calibrating their lam re-solves the lasso a dozen times or more
#: per cell (minutes at sae-realistic's sizes); alista's penalty is a training knob, so it could not be
#: matched without a training per bisection step: all four are left to `--encoders`.
NEW_ENCODERS = SAE_VARIANTS + ("mp-sae", "gradient-pursuit")

PRESETS = {
    "paper-c": Preset(
        "paper-c", {"n_atoms": [16, 32, 64], "d": [8, 16], "k": [3]},
        ("relu", "topk", "lista", "fista", "omp", "mp") + NEW_ENCODERS, seeds=3, n_samples=1024, n_train=1024,
        encoder_params={"relu": TRAINED, "topk": TRAINED, "lista": {"steps": 1000, "lr": 3e-3},
                        "fista": {"positive": True}, **{name: TRAINED for name in SAE_VARIANTS}},
        description="Amortisation-gap grid of O'Neill et al. at CPU size (the paper: N in {16..256}, "
                    "M in {8,16,32}, K in {3,9,15}, 5 seeds; scale up with --grid and --seeds)."),
    "compressed-sensing": Preset(
        "compressed-sensing", {"snr_db": [10, 20, 30, 40]},
        ("fista", "ista", "omp", "spams-lasso"), fixed={"d": 250, "n_atoms": 500, "k": 50, "positive": False},
        seeds=2, n_samples=256, n_train=0,
        description="Classical compressed sensing: M=250 measurements of N=500 codes with 10% non-zeros, "
                    "an SNR sweep; code error as NMSE in dB."),
    "sae-realistic": Preset(
        "sae-realistic", {"n_atoms": [256, 1024], "power_law": [0.5, 1.0]},
        ("topk", "fista", "omp") + NEW_ENCODERS, fixed={"d": 64, "k": 8, "firing": "power-law"}, seeds=2,
        n_samples=1024, n_train=2048,
        encoder_params={"topk": TRAINED, "fista": {"positive": True}, **{name: TRAINED for name in SAE_VARIANTS}},
        description="Strong superposition (4-16x more atoms than dimensions) with power-law feature frequencies."),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}.{suggest(name, PRESETS)} Presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def cells(p: Preset) -> list[dict]:
    """Every (grid point, seed) of a preset, as generator settings."""
    unknown = set(p.grid) - set(AXES)
    if unknown:
        raise ValueError(f"unknown grid axes {sorted(unknown)}; axes: {', '.join(AXES)}")
    keys = list(p.grid)
    out = []
    for values in itertools.product(*(p.grid[k] for k in keys)):
        for seed in range(p.seeds):
            out.append({**p.fixed, **dict(zip(keys, values)), "seed": seed})
    return out


def cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


FORMAT = "sparsecode.recovery"


@dataclass
class ResultsFile:
    """What a results file holds: its header lines (one per sweep, more if files were concatenated),
    the cell records, and where an interrupted last line starts (None when the file ends cleanly)."""

    headers: list
    records: list
    cut_at: int | None = None
    needs_newline: bool = False


def _is_record(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("cell"), dict) and isinstance(obj.get("rows", []), list)


def _is_header(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def parse_results(path) -> ResultsFile:
    """Read a results file without changing it. Its first line must be our header (or, for files
    written before headers existed, a cell record); an unfinished last line is left out."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a results file")
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a sparsecode recovery results file (not text)") from None
    lines = text.split("\n")
    tail = lines.pop()                     # "" when the file ends with a newline
    found = ResultsFile([], [])
    offset = 0
    for i, line in enumerate([*lines, tail] if tail else lines):
        last_unterminated = bool(tail) and i == len(lines)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if i == 0 and not (_is_header(obj) or _is_record(obj)):
            raise ValueError(f"{path} is not a sparsecode recovery results file (its first line is not a "
                             "results header)")
        if _is_header(obj):
            found.headers.append(obj)
        elif _is_record(obj):
            found.records.append(obj)
        elif last_unterminated:
            log.warning("%s: leaving out an unfinished last line (an interrupted write)", path)
            found.cut_at = offset
        else:
            raise ValueError(f"{path}: line {i + 1} is not a results record; this is not a sparsecode recovery "
                             "results file (or it was edited)")
        offset += len(line.encode("utf-8")) + 1
    found.needs_newline = bool(tail) and found.cut_at is None
    return found


def read_results(path) -> list[dict]:
    """The finished cell records of a results file (it is only read)."""
    return parse_results(path).records


def _prepare_append(path: Path, found: ResultsFile | None, header: dict) -> None:
    """Make our own file ready for appending: start it with the header, or cut an interrupted last
    line and end the last record with its newline."""
    if found is None:
        _io.write_text(path, json.dumps(header) + "\n")
        return
    if found.cut_at is not None:
        os.truncate(path, found.cut_at)
    elif found.needs_newline:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n")


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _differences(recorded: dict, asked: dict) -> list[str]:
    return [f"{key}={recorded.get(key)!r} there, {asked.get(key)!r} now" for key in sorted(set(recorded) | set(asked))
            if recorded.get(key) != asked.get(key)]


def _check_resumable(path: Path, found: ResultsFile, header: dict, params: dict) -> None:
    """Refuse a file whose recorded settings or encoder options differ from this run's."""
    if not found.headers:
        raise ValueError(f"{path} was written without a settings header (an older sparsecode): it can be "
                         "reported but not resumed; give another --out")
    for recorded in found.headers:
        diff = _differences({"preset": recorded.get("preset"), **recorded.get("settings", {})},
                            {"preset": header["preset"], **header["settings"]})
        if diff:
            raise ValueError(f"{path} holds a sweep with other settings ({'; '.join(diff)}): resume with the same "
                             "settings or give another --out")
    for rec in found.records:
        for name, recorded in (rec.get("encoder_params") or {}).items():
            if name in params and recorded != params[name]:
                raise ValueError(f"{path} holds {name} run with options {recorded}, not {params[name]}: resume with "
                                 "the same options or give another --out")


def default_out(preset_name: str) -> Path:
    """Each preset has its own default results file, so two sweeps never share one by accident."""
    return Path(f"recovery-{preset_name}.jsonl")


def _impossible(name: str, cell: dict) -> str | None:
    k, d, n_atoms = cell.get("k", 3), cell.get("d", 8), cell.get("n_atoms", 16)
    if k > encoder_class(name).max_k(n_atoms, d):
        return f"k={k} > d={d}: {name} cannot select more independent atoms than dimensions"
    return None


def run_cell(cell: dict, encoders, p: Preset, match: str, budget: int | None, device) -> dict:
    """Draw one planted problem and compare every encoder on it."""
    gen = {key: value for key, value in cell.items() if key != "seed"}
    n_atoms, k = gen.get("n_atoms", 16), gen.get("k", 3)
    if k > n_atoms:
        return {"cell": cell, "skipped": f"k={k} > n_atoms={n_atoms}: no such planted problem", "rows": []}
    data = make_sparse_data(p.n_samples + p.n_train, seed=cell["seed"], **gen)
    train, test = data.split(p.n_train) if p.n_train else (None, data)
    rows = []
    lasso_lams: dict = {}
    for name in encoders:
        reason = _impossible(name, cell)
        if reason:
            rows.append({"encoder": name, "skipped": reason})
            continue
        cls = encoder_class(name)
        params = dict(p.encoder_params.get(name, {}))
        if budget is not None:
            params.update(cls.budget_params(budget))
        # k-knob encoders are matched by setting k (compare passes the planted k); inference methods with
        # a penalty knob (lam, l1_coefficient) are calibrated, and so are encoders with an inference knob
        # (one training, then a threshold); other trained penalty-knob encoders would need one training per
        # bisection step, so they keep their penalty. Whether a row is matched is measured, not assumed.
        calibrated = cls.inference_knob is not None or (cls.knob not in (None, "k") and not cls.trainable)
        target = k if match == "l0" and calibrated else None
        # solvers of one lasso problem share the first one's calibrated lam, as `compare` does
        problem = lasso_problem(name, params) if target is not None else None
        shares = problem in lasso_lams
        if shares:
            params["lam"], target = lasso_lams[problem], None
        try:
            res = compare([name], test, k=k, encoder_params={name: params} if params else None, target_l0=target,
                          x_train=None if train is None else train.x, seed=cell["seed"], reference=None,
                          device=device)
            row = res.rows[0]
            if "skipped" not in row:        # an unreachable target: compare skipped the row, with its reason
                row["matched_l0"] = match == "l0" and abs(row["l0"] - k) <= max(0.02 * k, 0.05)
                if problem is not None and not shares:
                    lasso_lams[problem] = row["lam"]
            rows.append(row)
        except (ValueError, ImportError) as err:
            rows.append({"encoder": name, "skipped": str(err)})
    return {"cell": cell, "rows": rows}


def recovery(preset_name: str = "paper-c", *, out=None, encoders=None, grid: dict | None = None,
             seeds: int | None = None, n_samples: int | None = None, n_train: int | None = None,
             encoder_params: dict | None = None, match: str = "l0", budget: int | None = None,
             device=None, callback: Callable[[int, int, dict], None] | None = None) -> list[dict]:
    """Run (or resume) a recovery sweep; returns every cell's record.

    Parameters
    ----------
    preset_name : "paper-c", "compressed-sensing" or "sae-realistic".
    out : JSON-lines results file (see the module docstring); cells and encoders already in it are
        skipped, the others appended as they finish. A file that is not a results file, or that
        holds a sweep with other settings or encoder options, is refused.
    encoders, grid, seeds, n_samples, n_train : override the preset's (grid: axis -> list of
        values, replacing those axes).
    encoder_params : per-encoder options, merged over the preset's.
    match : "l0" (calibrate each encoder to the planted k) or "none" (defaults / encoder_params).
    budget : iterations per signal for iterative encoders (ISTA/FISTA, LISTA unroll, ITO steps).
    callback : ``callback(done, total, record)`` after each cell.
    """
    p = preset(preset_name)
    if match not in ("l0", "none"):
        raise ValueError(f"match must be 'l0' or 'none', got {match!r}")
    for name, value, low in (("budget", budget, 1), ("seeds", seeds, 1), ("n_samples", n_samples, 1),
                             ("n_train", n_train, 0)):
        if value is not None:
            check_int_range(name, value, low)
    params = {name: {**p.encoder_params.get(name, {}), **(encoder_params or {}).get(name, {})}
              for name in set(p.encoder_params) | set(encoder_params or {})}
    p = replace(p, grid={**p.grid, **(grid or {})}, encoders=tuple(encoders or p.encoders),
                seeds=p.seeds if seeds is None else seeds, n_samples=p.n_samples if n_samples is None else n_samples,
                n_train=p.n_train if n_train is None else n_train, encoder_params=params)
    for name in p.encoders:
        encoder_class(name)
    todo = cells(p)
    # as they will read back from the file, so that a resume compares like with like
    run_params = json.loads(json.dumps({name: p.encoder_params.get(name, {}) for name in p.encoders}, default=float))
    header = {"format": FORMAT, "version": 1, "preset": p.name,
              "settings": {"n_samples": p.n_samples, "n_train": p.n_train, "match": match, "budget": budget,
                           "device": resolve_device(device).type}}
    path = None if out is None else Path(out)
    found = None
    if path is not None and (path.is_dir() or (path.exists() and path.stat().st_size)):
        found = parse_results(path)
        _check_resumable(path, found, header, run_params)
    done: dict[str, dict] = {}          # cell key -> {"skipped": why} or {"rows": {encoder: row}}
    for rec in found.records if found else []:
        entry = done.setdefault(cell_key(rec["cell"]), {"rows": {}})
        if "skipped" in rec:
            entry["skipped"] = rec["skipped"]
        entry["rows"].update({row["encoder"]: row for row in rec["rows"]})
    prepared = path is None
    records = []
    for i, cell in enumerate(todo):
        entry = done.setdefault(cell_key(cell), {"rows": {}})
        missing = [] if "skipped" in entry else [name for name in p.encoders if name not in entry["rows"]]
        if missing:
            new = run_cell(cell, missing, p, match, budget, device)
            new.update(preset=p.name, match=match, budget=budget,
                       encoder_params={name: run_params[name] for name in missing})
            if not prepared:
                _prepare_append(path, found, header)
                prepared = True
            if path is not None:
                _append(path, new)
            if "skipped" in new:
                entry["skipped"] = new["skipped"]
            entry["rows"].update({row["encoder"]: row for row in new["rows"]})
        record = {"cell": cell, "rows": [] if "skipped" in entry else [entry["rows"][name] for name in p.encoders],
                  "preset": p.name, "match": match, "budget": budget}
        if "skipped" in entry:
            record["skipped"] = entry["skipped"]
        records.append(record)
        if callback:
            callback(i + 1, len(todo), record)
    return records


def preset_summary(name: str) -> dict:
    return asdict(preset(name))
