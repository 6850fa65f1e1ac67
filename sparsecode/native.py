"""Compiled CPU kernels: the per-signal loops of the Gram-based pursuits and of the lasso's working sets.

Why: those loops take tens of small steps per signal. As batched torch operations every step costs
microseconds of dispatch and passes over the whole block's state in memory, and Python holds the GIL
between operations, so worker threads hardly overlap (on the 2-core EPYC, batched OMP at 1,024 x 256 ran
as fast on one worker as on two, and FISTA's working sets faster on one). One C call does a block's
whole pursuit, one signal at a time with its state in cache, and ctypes releases the GIL for the call,
so blocks on worker threads run in parallel (the same OMP ran 2.2x faster).

The source, `kernels.c`, ships with the package. It is compiled on first use with the system's C
compiler (``$CC``, else ``cc``) for this machine's instruction set, into a cache folder
(``$XDG_CACHE_HOME/sparsecode``, else ``~/.cache/sparsecode``) under a name drawn from the source, the
flags and the CPU, so an upgrade or another machine sharing the folder builds its own. Where nothing
compiles, `available()` is False, `why_unavailable()` says why, and encoders keep their torch
operations, which are also what runs on a GPU. Encoders choose through their `kernel` option
(`resolve`).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import platform
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = ("auto", "native", "torch")
#: The version kernels.c reports (`sparsecode_kernels_version`); a library that reports another is rebuilt.
VERSION = 1
SOURCE = Path(__file__).with_name("kernels.c")
#: Compiler flags, most specific first: a compiler that rejects one set gets the next.
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp-simd", "-std=gnu11"],
    ["-O3", "-fopenmp-simd", "-std=gnu11"],
    ["-O2", "-std=gnu11"],
)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_state: dict = {}            # "lib": the loaded library or None, "why": the reason it is None


def available() -> bool:
    """Whether the kernels are built (building them now if not tried yet in this process)."""
    return _library() is not None


def why_unavailable() -> str | None:
    """Why `available()` is False (None when it is True)."""
    _library()
    return _state.get("why")


def resolve(kernel: str, device: torch.device) -> bool:
    """Whether an encoder whose `kernel` option is `kernel` runs the compiled kernels for signals on
    `device`: 'torch' never, 'auto' on the CPU where they build, 'native' on the CPU or a ValueError
    that says why it cannot."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return False
    on_cpu = torch.device(device).type == "cpu"
    if kernel == "auto":
        return on_cpu and available()
    if not on_cpu:
        raise ValueError(f"kernel='native' runs on the CPU, not on {torch.device(device)}; use kernel='auto' or "
                         "'torch'")
    if not available():
        raise ValueError(f"kernel='native' is not available here: {why_unavailable()}; use kernel='auto' or 'torch'")
    return True


# --- building -------------------------------------------------------------------------------------
def _cpu_key() -> str:
    """What the build depends on besides the source and flags: the architecture and the CPU's features."""
    key = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    key.append(line.strip())
                if len(key) >= 4:
                    break
    except OSError:
        key.append(platform.processor())
    return "\n".join(key)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsecode"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _build(folder: Path, cc: str) -> tuple[Path | None, str]:
    """Compile kernels.c into `folder` (written under a temporary name and renamed, so a concurrent
    process never loads half a file); returns the library's path, or None and the compiler's complaint."""
    source = SOURCE.read_bytes()
    complaint = ""
    for flags in FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([source, " ".join([cc, *flags]).encode(), _cpu_key().encode()]))
        target = folder / f"kernels-{digest.hexdigest()[:16]}.so"
        if target.exists():
            if not _trusted(target):
                raise OSError(f"{target} belongs to another user or others may write it")
            return target, ""
        folder.mkdir(parents=True, exist_ok=True)
        # a name of its own (machines may share the folder), created by the compiler itself, so it gets
        # the user's umask
        tmp = str(folder / f"{target.stem}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            done = subprocess.run([cc, *flags, "-fPIC", "-shared", "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target, ""
            complaint = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        except (OSError, subprocess.SubprocessError) as err:
            complaint = str(err)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, f"{cc} could not compile {SOURCE.name} ({complaint})"


def _trusted(path: Path) -> bool:
    """Whether a library found in the cache may be loaded: ours, and writable by no one else (loading
    a library runs its code)."""
    info = path.stat()
    return (not hasattr(os, "getuid") or info.st_uid == os.getuid()) and not info.st_mode & 0o022


def _library():
    if "why" in _state:
        return _state["lib"]
    with _lock:
        if "why" not in _state:
            lib, why = _load()
            if lib is None:
                log.warning("compiled kernels unavailable (%s): the pursuits and lasso solvers use torch "
                            "operations on the CPU", why)
            _state["lib"], _state["why"] = lib, why
    return _state["lib"]


def _load():
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC)"
    why = ""
    # the cache, else (it cannot be written, or what it holds does not load) a folder of this process
    for folder in (_cache_dir(), None):
        try:
            if folder is None:
                folder = Path(tempfile.mkdtemp(prefix="sparsecode-kernels-"))
                atexit.register(shutil.rmtree, folder, ignore_errors=True)
            path, why = _build(folder, cc)
        except OSError as err:
            why = f"cannot use {folder}: {err}"
            continue
        if path is None:
            return None, why
        try:
            lib = ctypes.CDLL(str(path))
            if lib.sparsecode_kernels_version() == VERSION:
                break
            why = f"{path} reports version {lib.sparsecode_kernels_version()}, not {VERSION}"
        except (OSError, AttributeError) as err:
            why = f"cannot load {path}: {err}"
    else:
        return None, why
    _declare(lib)
    log.debug("compiled kernels loaded from %s", path)
    return lib, None


def _declare(lib) -> None:
    P, I, U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"omp_gram_{suffix}").argtypes = [I, I, I, P, P, P, P, P, real, P, P]
        for name in ("mp_gram", "gp_gram"):
            getattr(lib, f"{name}_{suffix}").argtypes = [I, I, I, P, P, P, P, P, P]
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double), ("f32f64", ctypes.c_double)):
        getattr(lib, f"lasso_sets_{suffix}").argtypes = [I, I, I, I, P, P, P, P, P, P, P, P, P, P, real, real,
                                                          U, U, U, U, I, U, P, P, P]
        getattr(lib, f"recheck_{suffix}").argtypes = [I, I, I, P, U, P, P, P, U, I, P, P]


# --- the kernels ----------------------------------------------------------------------------------
def _ptr(t: torch.Tensor | None, dtype: torch.dtype | None = None):
    """The data pointer of a contiguous CPU tensor (None for None), its dtype checked: a wrong pointer
    here would be a crash, not an error."""
    if t is None:
        return None
    if t.device.type != "cpu" or not t.is_contiguous() or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"compiled kernels take contiguous CPU tensors of dtype {dtype}, got {t.dtype} on "
                         f"{t.device} (contiguous: {t.is_contiguous()})")
    return t.data_ptr()


def _shapes(**given) -> None:
    """Check the shapes handed to a kernel (name=(tensor or None, expected shape)): C would read or
    write out of bounds where Python raises."""
    for name, (t, shape) in given.items():
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"compiled kernels: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _indices(name: str, t: torch.Tensor | None, high: int) -> None:
    if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
        raise ValueError(f"compiled kernels: {name} holds indices outside [0, {high})")


def _call(fn, *args) -> None:
    if fn(*args) != 0:
        raise MemoryError(f"{fn.__name__}: out of memory for its per-signal workspace")


def omp_gram(alpha: torch.Tensor, gram: torch.Tensor, diag: torch.Tensor, scale: torch.Tensor | None, k: int,
             unexplained: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch OMP from the Gram matrix, one signal at a time (encoders/greedy.py: `omp_chunk` does the same
    steps batched). `alpha` (n, n_atoms) holds ``x @ D.T`` and is overwritten. Returns the picks (n, k) and
    their coefficients (n, k)."""
    n, N = alpha.shape
    dtype = alpha.dtype
    if not 1 <= k <= N:
        raise ValueError(f"compiled kernels: k={k} must be between 1 and n_atoms={N}")
    _shapes(gram=(gram, (N, N)), diag=(diag, (N,)), scale=(scale, (N,)), unexplained=(unexplained, (n,)))
    idx = torch.empty(n, k, dtype=torch.long)
    coef = torch.empty(n, k, dtype=dtype)
    _call(getattr(_library(), f"omp_gram_{_SUFFIX[dtype]}"), n, N, k, _ptr(alpha, dtype), _ptr(gram, dtype),
          _ptr(diag, dtype), _ptr(scale, dtype), _ptr(unexplained, dtype), eps, _ptr(idx), _ptr(coef))
    return idx, coef


def mp_gram(alpha: torch.Tensor, codes: torch.Tensor, gram: torch.Tensor, diag: torch.Tensor,
            scale: torch.Tensor | None, k: int, unexplained: torch.Tensor | None) -> None:
    """Matching pursuit from the Gram matrix: k steps added into `codes` (n, n_atoms); `alpha` holds
    ``x @ D.T`` and is overwritten."""
    _pursuit("mp_gram", alpha, codes, gram, diag, scale, k, unexplained)


def gp_gram(alpha: torch.Tensor, codes: torch.Tensor, gram: torch.Tensor, diag: torch.Tensor,
            scale: torch.Tensor | None, k: int, unexplained: torch.Tensor | None) -> None:
    """Gradient pursuit from the Gram matrix: k steps added into `codes` (n, n_atoms); `alpha` holds
    ``x @ D.T`` and is overwritten."""
    _pursuit("gp_gram", alpha, codes, gram, diag, scale, k, unexplained)


def _pursuit(name, alpha, codes, gram, diag, scale, k, unexplained) -> None:
    n, N = alpha.shape
    dtype = alpha.dtype
    if not 1 <= k <= N:
        raise ValueError(f"compiled kernels: k={k} must be between 1 and n_atoms={N}")
    _shapes(codes=(codes, (n, N)), gram=(gram, (N, N)), diag=(diag, (N,)), scale=(scale, (N,)),
            unexplained=(unexplained, (n,)))
    _call(getattr(_library(), f"{name}_{_SUFFIX[dtype]}"), n, N, k, _ptr(alpha, dtype), _ptr(gram, dtype),
          _ptr(diag, dtype), _ptr(scale, dtype), _ptr(unexplained, dtype), _ptr(codes, dtype))


def lasso_sets(x: torch.Tensor, atoms: torch.Tensor, W: torch.Tensor, z: torch.Tensor, budget: torch.Tensor,
               tol: torch.Tensor, xx: torch.Tensor, bound: float, lam: float, positive: bool, momentum: bool,
               restart: bool, gap_criterion: bool, check_every: int, leave_unresolvable: bool,
               gram: torch.Tensor | None = None, b: torch.Tensor | None = None, b_rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lasso on each signal's working set W (m, w) by (accelerated) proximal gradient, one signal at a
    time (encoders/iterative.py: `_iterate_sets` does it batched): each set's Gram block and right-hand
    side from its atoms (summed in x's dtype, from exact products where float32 atoms meet float64
    state), or gathered from `gram` and rows `b_rows` of `b` (x D^T).
    `z` (m, w), in x's dtype, is the warm start and is overwritten with the answer. Returns the
    iterations used, whether each signal met its `tol`, and the residuals x - z A (m, d)."""
    m, d = x.shape
    w = W.shape[1]
    dtype = x.dtype
    N = atoms.shape[0]
    suffix = "f32f64" if (atoms.dtype, dtype) == (torch.float32, torch.float64) else _SUFFIX[dtype]
    if (gram is None) != (b is None) or (gram is None) != (b_rows is None):
        raise ValueError("compiled kernels: gram, b and b_rows go together")
    _shapes(atoms=(atoms, (N, d)), W=(W, (m, w)), z=(z, (m, w)), budget=(budget, (m,)), tol=(tol, (m,)),
            xx=(xx, (m,)), gram=(gram, (N, N)), b=(b, (None if b is None else b.shape[0], N)), b_rows=(b_rows, (m,)))
    _indices("W", W, N)
    _indices("b_rows", b_rows, 0 if b is None else b.shape[0])
    iters = torch.empty(m, dtype=torch.long)
    met = torch.empty(m, dtype=torch.uint8)
    r = torch.empty(m, d, dtype=dtype)
    _call(getattr(_library(), f"lasso_sets_{suffix}"), m, d, atoms.shape[0], w, _ptr(x, dtype),
          _ptr(atoms, torch.float64 if suffix == "f64" else torch.float32),
          _ptr(gram, dtype), _ptr(b, dtype), _ptr(b_rows, torch.long), _ptr(W, torch.long), _ptr(z, dtype),
          _ptr(budget, torch.long), _ptr(tol, dtype), _ptr(xx, dtype), bound, lam, int(positive), int(momentum),
          int(restart), int(gap_criterion), check_every, int(leave_unresolvable), _ptr(iters), _ptr(met), _ptr(r))
    return iters, met.bool(), r


def recheck(corr: torch.Tensor, atoms: torch.Tensor, r: torch.Tensor, cut: torch.Tensor, positive: bool,
            max_near: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `corr` (m, n_atoms), the product of residual r (m, d) with every atom in bfloat16
    or float32, the largest correlation the dual constraint bounds (one-sided when `positive`) computed
    exactly in r's dtype from the atoms whose `corr` reaches `cut` (m,) (encoders/iterative.py:
    `_Checker` does the same with torch operations). Returns it, and whether each row had more than
    `max_near` such atoms (its value then undefined)."""
    m, N = corr.shape
    dtype = r.dtype
    suffix = "f32f64" if (atoms.dtype, dtype) == (torch.float32, torch.float64) else _SUFFIX[dtype]
    _shapes(atoms=(atoms, (N, r.shape[1])), r=(r, (m, atoms.shape[1])), cut=(cut, (m,)))
    bf16 = corr.dtype == torch.bfloat16
    worst = torch.empty(m, dtype=dtype)
    crowded = torch.empty(m, dtype=torch.uint8)
    _call(getattr(_library(), f"recheck_{suffix}"), m, N, r.shape[1],
          _ptr(corr.view(torch.int16) if bf16 else corr, torch.int16 if bf16 else torch.float32), int(bf16),
          _ptr(atoms, torch.float64 if suffix == "f64" else torch.float32), _ptr(r, dtype), _ptr(cut, dtype),
          int(positive), max_near, _ptr(worst), _ptr(crowded))
    return worst, crowded.bool()
