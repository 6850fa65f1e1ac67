"""Speed benchmark: our solvers against the C++ and scikit-learn references in one run."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import metrics
from .compare import calibrate, timed_encode
from ._validation import check_int_range, resolve_device
from .memory import fits, format_bytes, memory_budget, rows_within
from .registry import encoder_class, encoder_names, get_encoder
from .synthetic import make_sparse_data

log = logging.getLogger(__name__)

#: Encoders of `speed` by default. Each row's reference is the encoder marked `speed_reference` that
#: solves the same problem (the same knob, k or lam, and the same `solves_lasso`).
SPEED_ENCODERS = ("omp", "spams-omp", "sklearn-omp", "fista", "ista", "spams-lasso", "sklearn-lasso")


def speed_reference(name: str) -> str | None:
    """The registered `speed_reference` encoder that solves the problem `name` solves, or None."""
    cls = encoder_class(name)
    for other in encoder_names():
        try:
            ref = encoder_class(other)
        except Exception:       # a broken plug-in is no one's reference
            continue
        if ref.speed_reference and ref.knob == cls.knob and bool(ref.solves_lasso) == bool(cls.solves_lasso):
            return other
    return None


def speed(n_samples: int = 4096, d: int = 256, n_atoms: int = 1024, k: int = 16, lam: float = 0.05,
          repeats: int = 5, threads: int = 0, device="cpu", seed: int = 0,
          encoders: tuple[str, ...] | None = None,
          callback: Callable[[str], None] | None = None) -> list[dict]:
    """Median throughput of each encoder on one synthetic problem, with its ratio to the reference.

    Our encoders run on `device`; SPAMS and scikit-learn on the CPU (float64, as they need).
    Support F1 against the planted codes and, for lasso solvers, the relative objective gap to
    SPAMS's LARS solution show that the ratios compare equal answers. The timed encodes are
    interleaved, one of each encoder per round, and a row's `ratio` is the median over rounds of the
    reference's time over the encoder's: on a shared machine whose speed drifts between seconds, the
    encoders of one round see the same machine (encoders marked `slow` are timed once).
    """
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    data = make_sparse_data(n_samples, d, n_atoms, k, seed=seed)
    x = data.x.to(device)
    dictionary = data.dictionary.to(device)
    rows, fitted, times, objectives = [], {}, {}, {}
    for name in encoders if encoders is not None else SPEED_ENCODERS:
        cls = encoder_class(name)
        if cls.knob not in ("k", "lam"):
            raise ValueError(f"bench speed times encoders set by k or lam; {name!r} is set by {cls.knob!r}")
        if callback:
            callback(name)
        params = {cls.knob: k if cls.knob == "k" else lam}
        if threads and "threads" in cls.Config.__dataclass_fields__:
            # a thread count the user gave reaches every encoder with that option (SPAMS, the pursuits);
            # left 0, each keeps its own default (all cores)
            params["threads"] = threads
        try:
            enc = get_encoder(name, **params).fit(dictionary)
        except ImportError as err:
            log.warning("skipping %s: %s", name, err)
            continue
        # the first timed encode (caches warmed) also gives the codes that the quality columns check
        seconds, codes = timed_encode(enc, x, 1, warmup=True)
        times[name] = [seconds]
        if not cls.slow:
            fitted[name] = enc
        row = {"encoder": name, "reference": speed_reference(name), "signals_per_s": None,
               "f1": metrics.support_scores(data.codes, codes.cpu())["f1"], "l0": metrics.mean_l0(codes.cpu())}
        if cls.solves_lasso:
            objectives[name] = metrics.lasso_objective(data.x, codes.cpu(), data.dictionary.atoms, lam)
        rows.append(row)
    for _ in range(max(0, repeats - 1)):
        for name, enc in fitted.items():
            times[name].append(timed_encode(enc, x, 1)[0])
    for row in rows:
        name, ref = row["encoder"], row["reference"]
        row["signals_per_s"] = n_samples / float(np.median(times[name]))
        if ref in times and len(times[ref]) == len(times[name]):
            row["ratio"] = float(np.median(np.array(times[ref]) / np.array(times[name])))
        elif ref in times:
            row["ratio"] = row["signals_per_s"] * float(np.median(times[ref])) / n_samples
        else:
            row["ratio"] = float("nan")
        if name in objectives and ref in objectives:
            row["objective_gap"] = metrics.relative_gap(objectives[name], objectives[ref])
    return rows


# --- scale: inference at the sizes of real sparse autoencoders ----------------------------------
#: Encoders of `scale` by default; "floor" rows are the amortised floor itself.
SCALE_ENCODERS = ("omp", "mp", "fista", "topk", "spams-omp")
#: Cell size whose signal count is `n_samples`; larger cells get proportionally fewer signals.
SCALE_REFERENCE_CELL = 4096 * 576
SCALE_MIN_SAMPLES = 32


def scale_samples(n_samples: int, n_atoms: int, d: int) -> int:
    """Signals encoded in a cell: `n_samples` at 4,096 atoms x 576, fewer in proportion to n_atoms * d
    (at least 32), so the big cells take about as long as the small ones."""
    return min(n_samples, max(SCALE_MIN_SAMPLES, int(n_samples * SCALE_REFERENCE_CELL / (n_atoms * d))))


def amortised_floor(x: torch.Tensor, atoms: torch.Tensor, k: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The least any amortised encoder does on this dictionary: ``x @ atoms.T`` and a top-k.

    One product per chunk of signals that fits `budget`, on torch's own threads, as an amortised
    encoder runs it (blocks on worker threads, as the pursuits run, took twice as long for 64 signals
    at 16,384 x 576: each block reads all the atoms). Returns the top-k values and indices.
    """
    n = x.shape[0]
    values = x.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    rows = rows_within(budget, 2 * atoms.shape[0] * x.element_size(), what="signal (x @ atoms.T)", at_most=4096)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        torch.topk(x[start:stop] @ atoms.T, k, dim=1, out=(values[start:stop], indices[start:stop]))
    return values, indices


class _PeakMemory:
    """Peak memory a block of code adds: CUDA's allocator peak, or on the CPU the peak resident set
    (Linux: /proc/self/clear_refs resets it), since tracemalloc does not see torch's allocations."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self.base = _status_kb("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            peak = _status_kb("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self.base) * 1024
        return False


def _status_kb(field: str) -> int | None:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _timed(fn, repeats: int, device: torch.device, alongside=None) -> tuple[float, float]:
    """Median seconds of `repeats` calls of fn and, with `alongside` (another function timed right
    before each call), the median per-call ratio of fn's time to its: a machine whose speed drifts
    between rounds (a shared one does, by 30% within a minute) moves both sides of each ratio alike."""
    def once(f) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times, ratios = [], []
    for _ in range(max(1, repeats)):
        base = once(alongside) if alongside is not None else None
        times.append(once(fn))
        if base is not None:
            ratios.append(times[-1] / base)
    return float(np.median(times)), (float(np.median(ratios)) if ratios else float("nan"))


def _scale_encoder(name: str, dictionary, x: torch.Tensor, k: int, memory, budget: int, fields: set[str],
                  options: dict):
    """The fitted encoder of one scale row, or the reason it is skipped. `options` (config fields) win
    over the row's k and memory."""
    params = {"memory": memory} if "memory" in fields else {}
    cls = encoder_class(name)
    need = dictionary.n_atoms ** 2 * cls.gram_itemsize
    if not fits(budget, need):
        return None, f"it forms a Gram matrix of {format_bytes(need)}, more than the memory budget {format_bytes(budget)}"
    if cls.knob not in (None, "k") and not cls.trainable:
        # Penalty knobs (the lasso's lam): the value giving about the planted L0, found on a small subsample.
        enc, _ = calibrate(name, dictionary, x[:min(64, x.shape[0])], float(k), params={**params, **options},
                           rel_tol=0.1, max_steps=12)
        return enc, None
    if "k" in fields:
        params["k"] = k
    params.update(options)
    if cls.trainable:
        if not {"bias", "steps"} <= fields:
            return None, "a trained encoder without a bias-free one-step configuration"
        # An amortised encoder whose weights are the dictionary's rows: no training, the decoder's own encoder.
        enc = get_encoder(name, **params, bias=False, steps=1).fit(dictionary, x[:1])
        with torch.no_grad():
            enc.net.weight.copy_(dictionary.atoms_as(x.dtype, x.device))
        return enc, None
    return get_encoder(name, **params).fit(dictionary), None


def scale(n_atoms: tuple[int, ...] = (4096, 16384, 65536), d: tuple[int, ...] = (576,), k: tuple[int, ...] = (32,),
          n_samples: int = 256, repeats: int = 3, memory=None, device="cpu", encoders: tuple[str, ...] | None = None,
          encoder_params: dict[str, dict] | None = None, seed: int = 0,
          callback: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Throughput, peak memory and time relative to the amortised floor of inference methods over a grid of
    dictionary sizes (float32, one synthetic problem per cell).

    The floor is ``x @ atoms.T`` plus a top-k on the same dictionary, device and run: what the cheapest
    amortised encoder must do. `n_samples` signals are encoded in a 4,096 x 576 cell and proportionally
    fewer in larger ones (see `scale_samples`). The first encode of each encoder is not timed (it builds
    caches such as a Gram matrix: its time is `setup_s`); `peak_memory_mb` is measured over it, codes
    included. `callback(done, total, what)` reports progress.
    """
    device = resolve_device(device)
    names = tuple(encoders) if encoders is not None else SCALE_ENCODERS
    for name in names:
        encoder_class(name)                     # unknown names fail before any work
    budget = memory_budget(memory, device)
    cells = [(N, dd, kk) for dd in d for kk in k for N in n_atoms]
    for N, dd, kk in cells:
        check_int_range("n_atoms", N, 1)
        check_int_range("d", dd, 1)
        check_int_range("k", kk, 1, min(N, dd), why=" (and at most n_atoms and d)")
    total, done = len(cells) * (len(names) + 1), 0
    rows = []
    for N, dd, kk in cells:
        n = scale_samples(n_samples, N, dd)
        cell = {"n_atoms": N, "d": dd, "k": kk, "n_samples": n}
        data = make_sparse_data(n, dd, N, kk, seed=seed)
        x, dictionary = data.x.to(device), data.dictionary.to(device)
        atoms = dictionary.atoms_as(x.dtype, x.device)
        if callback:
            callback(done, total, f"floor, n_atoms={N} d={dd} k={kk}")
        with _PeakMemory(device) as peak:
            amortised_floor(x, atoms, kk, budget)
        floor = functools.partial(amortised_floor, x, atoms, kk, budget)
        floor_s = _timed(floor, repeats, device)[0]
        rows.append({**cell, "encoder": "floor", "signals_per_s": n / floor_s, "ratio_to_floor": 1.0,
                     "peak_memory_mb": _mb(peak.bytes)})
        done += 1
        for name in names:
            if callback:
                callback(done, total, f"{name}, n_atoms={N} d={dd} k={kk}")
            row = {**cell, "encoder": name}
            try:
                fields = {f.name for f in dataclasses.fields(encoder_class(name).Config)}
                enc, skipped = _scale_encoder(name, dictionary, x, kk, memory, budget, fields,
                                              (encoder_params or {}).get(name, {}))
                if skipped is None:
                    formed = "variant" in fields and fits(budget // 2, N * N * x.element_size())
                    with _PeakMemory(device) as peak:
                        start = time.perf_counter()
                        if formed:
                            # In a comparison over a stream of batches the Gram matrix is formed once and
                            # reused by every batch, so a method that can use one gets it here, in setup_s,
                            # as the first batch of such a stream would (the cell's few signals alone would
                            # not repay it).
                            dictionary.gram(x.dtype, x.device)
                        info = enc.encode_with_info(x)
                        row["setup_s"] = time.perf_counter() - start
                    if formed and info.variant != "gram":
                        # it chose to run without the Gram matrix (on a GPU, say): its memory without one
                        dictionary.release_gram(x.dtype, x.device)
                        with _PeakMemory(device) as peak:
                            info = enc.encode_with_info(x)
                    codes = info.codes
                    # timed interleaved with the floor: the ratio is the median of per-round ratios
                    seconds, ratio = _timed(functools.partial(enc.encode, x), repeats, device, alongside=floor)
                    row.update(signals_per_s=n / seconds, ratio_to_floor=ratio,
                               peak_memory_mb=_mb(peak.bytes), f1=metrics.support_scores(data.codes, codes.cpu())["f1"],
                               l0=metrics.mean_l0(codes))
                    for field in ("variant", "kernel", "precision", "working_bytes"):
                        if getattr(info, field) is not None:
                            row[field] = getattr(info, field)
                    if "lam" in fields:
                        row["lam"] = enc.config.lam
            except ImportError as err:
                skipped = str(err)
            except (MemoryError, RuntimeError) as err:   # torch reports an allocation it cannot make this way
                skipped = f"failed: {err}".splitlines()[0]
            if skipped is not None:
                log.warning("scale: skipping %s at n_atoms=%d d=%d k=%d: %s", name, N, dd, kk, skipped)
                row["skipped"] = skipped
            rows.append(row)
            done += 1
        del data, x, dictionary, atoms
    if callback:
        callback(done, total, "done")
    return rows


def _mb(nbytes) -> float:
    return float("nan") if nbytes is None else nbytes / 1e6


def ranks(n_ranks: int = 2, n_tokens: int = 32768, d: int = 256, n_atoms: int = 1024, k: int = 16,
          lam: float = 0.05, encoders: tuple[str, ...] = ("omp", "fista"), shard_tokens: int = 4096,
          repeats: int = 1, seed: int = 0, train: tuple[str, ...] = ("topk",), train_steps: int = 20,
          train_batch: int = 4096, callback: Callable[[int, int], None] | None = None) -> list[dict]:
    """Speed-up on `n_ranks` processes against one, each process on one CPU thread, on a synthetic
    activation store of `n_tokens` signals, median of `repeats` runs of each:

    - ``work="compare"``: ``sparsecode compare`` over the store under ``torchrun``, one row per
      encoder; ``signals_per_s`` is the job's (tokens over the slowest rank's encoding time);
    - ``work="train"``: data-parallel training of each method of `train` (`train_steps` steps of
      `train_batch` signals streamed from the store) under ``torchrun``; ``signals_per_s`` is the
      signals trained on over the training time (between barriers around `learn`).

    ``wall_s`` is the whole command, start-up (imports, joining the group) and reading included."""
    check_int_range("n_ranks", n_ranks, 2)
    check_int_range("repeats", repeats, 1)
    check_int_range("train_steps", train_steps, 1)
    check_int_range("train_batch", train_batch, n_ranks)
    from .activations import write_store
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    jobs = [("compare", w) for w in (1, n_ranks) for _ in range(repeats)]
    jobs += [(method, w) for method in train for w in (1, n_ranks) for _ in range(repeats)]
    runs: dict[tuple[str, int], list[tuple[dict, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="sparsecode-bench-") as tmp:
        tmp = Path(tmp)
        data = make_sparse_data(n_tokens, d, n_atoms, k, seed=seed)
        write_store(tmp / "store", data.x, shard_tokens)
        data.dictionary.save(tmp / "dictionary.safetensors")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        for i, (work, world) in enumerate(jobs):
            if callback:
                callback(i, len(jobs))
            out = tmp / f"result-{i}.json"
            if work == "compare":
                command = [*launch, f"--nproc-per-node={world}", "-m", "sparsecode", "compare", "--encoders",
                           ",".join(encoders), "--data", f"activations:{tmp / 'store'}", "--dictionary",
                           str(tmp / "dictionary.safetensors"), "--n-train", "0", "--n-samples", str(n_tokens),
                           "--k", str(k), "--lam", str(lam), "--reference", "none", "--device", "cpu", "--out",
                           str(out)]
            else:
                command = [*launch, f"--nproc-per-node={world}", "--no-python", sys.executable, "-c",
                           "import sys; from sparsecode.bench import _train_rank; _train_rank(*sys.argv[1:])",
                           str(tmp / "store"), str(out), work, str(n_atoms), str(k), str(train_steps),
                           str(train_batch)]
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            result = json.loads(out.read_text())
            speeds = {r["encoder"]: r["signals_per_s"] for r in result["rows"]} if work == "compare" else \
                {work: result["signals_per_s"]}
            runs.setdefault((work, world), []).append((speeds, wall))
    rows = []
    for work, names in [("compare", encoders), *(("train", (method,)) for method in train)]:
        for name in names:
            key = "compare" if work == "compare" else name
            one = float(np.median([r[name] for r, _ in runs[key, 1]]))
            many = float(np.median([r[name] for r, _ in runs[key, n_ranks]]))
            wall_one = float(np.median([w for _, w in runs[key, 1]]))
            wall_many = float(np.median([w for _, w in runs[key, n_ranks]]))
            rows.append({"work": work, "encoder": name, "ranks": n_ranks, "n_tokens": n_tokens, "n_atoms": n_atoms,
                         "d": d, "signals_per_s_1": one, "signals_per_s": many, "speedup": many / one,
                         "wall_s_1": wall_one, "wall_s": wall_many, "wall_speedup": wall_one / wall_many})
    return rows


def _train_rank(store: str, out: str, method: str, n_atoms: str, k: str, steps: str, batch_size: str) -> None:
    """One rank of `ranks`' training job (started by torchrun): train `method` on the store, data-parallel;
    rank 0 writes the signals trained on per second."""
    from . import _io, distributed
    from .activations import ActivationStore
    torch.set_num_threads(1)
    group = distributed.setup("cpu")
    try:
        params = {"steps": int(steps), "batch_size": int(batch_size)}
        if "k" in encoder_class(method).Config.__dataclass_fields__:
            params["k"] = int(k)
        enc = get_encoder(method, **params)
        group.barrier()
        start = time.perf_counter()
        enc.learn(ActivationStore(store), int(n_atoms))
        group.barrier()
        elapsed = time.perf_counter() - start
        if group.main:
            _io.write_json(Path(out), {"train_s": elapsed, "signals_per_s": int(steps) * int(batch_size) / elapsed})
    finally:
        distributed.teardown()
