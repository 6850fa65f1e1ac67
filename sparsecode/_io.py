"""Files: the one path rule, atomic writes that keep the user's umask, output checks made before any
work, and reads that name the file and the problem when a file is not what it should be."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: the only suffixes the project strips from a name: `sae.v1` is a stem, `sae.v1.json` is its description
OWN_SUFFIXES = (".safetensors", ".json")


# --- the path rule -------------------------------------------------------------------------------
def stem(path, suffixes: tuple[str, ...] = OWN_SUFFIXES) -> Path:
    """`path` without one of our own `suffixes`; any other dot in the name is part of the name."""
    path = Path(path)
    for suffix in suffixes:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def sibling(path, suffix: str, suffixes: tuple[str, ...] = OWN_SUFFIXES) -> Path:
    """The file named by the stem of `path` plus `suffix` (appended, never replacing a dotted part)."""
    base = stem(path, suffixes)
    return base.with_name(base.name + suffix)


def paired(path) -> tuple[Path, Path]:
    """`(STEM.safetensors, STEM.json)`: the tensors and the description of a saved object."""
    return sibling(path, ".safetensors"), sibling(path, ".json")


# --- writing -------------------------------------------------------------------------------------
def _umask() -> int:
    # Reading the umask through os.umask sets it for a moment, which races with other threads;
    # Linux shows it in /proc without changing it.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def new_folder_mode() -> int:
    """The mode `os.mkdir(path)` would give a new folder: 0o777 less the umask."""
    return 0o777 & ~_umask()


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates 0600 whatever the umask; give the file the mode a plain open() would (or keep
    # the mode of the file it replaces) so results and stores can be shared as the user intends.
    mode = path.stat().st_mode & 0o7777 if path.is_file() else new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_temporary(name: str) -> bool:
    """Whether `name` is one of `_atomic`'s temporary files (left behind only by a killed process)."""
    return name.startswith(".") and name.endswith(".tmp")


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic(path, write)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp))


def write_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """Save a matplotlib figure atomically (the format comes from `path`'s suffix, not the temporary name's)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    _atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
    return path


# --- checking outputs before any work ------------------------------------------------------------
def check_writable(path, what: str = "output file", *, folder: bool = False,
                   suffixes: tuple[str, ...] | None = None) -> Path:
    """Fail now, not after the work, if `path` cannot be written: it is a folder where a file is
    wanted (or the reverse), it lies under a regular file, it or its nearest existing folder is not
    writable, or its suffix is not one of `suffixes`. Creates nothing."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise NotADirectoryError(f"{what} {path} exists and is not a folder")
        if not folder and path.is_dir():
            raise IsADirectoryError(f"{what} {path} is a folder; give a file name")
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{what} {path} is not writable")
    # where the file (or the folder's files) will be created: rename needs write access there
    parent = Path(os.path.abspath(path if folder and path.is_dir() else path.parent))
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} cannot be written: no permission to write in {parent}")
    if suffixes is not None and path.suffix not in suffixes:
        raise ValueError(f"{what} {path} must end in {' or '.join(suffixes)}")
    return path


# --- reading -------------------------------------------------------------------------------------
def _type_names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({dict: "an object", list: "a list", str: "a string", int: "an integer",
                        float: "a number", bool: "true/false"}.get(k, k.__name__) for k in kinds)


def check_keys(obj: dict, required: dict, where) -> dict:
    """Check that `obj` holds every key of `required` with a value of the given type(s); an error
    names `where` (the file, and the section in it), the key and what was found."""
    for key, kind in required.items():
        if key not in obj:
            raise ValueError(f"{where} lacks {key!r} ({_type_names(kind)}); it has {', '.join(sorted(obj)) or 'nothing'}")
        value, kinds = obj[key], kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool):      # Python counts true as an integer; JSON does not
            ok = bool in kinds
        else:
            ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
        if not ok:
            raise ValueError(f"{where}: {key!r} must be {_type_names(kind)}, got {value!r}")
    return obj


def _existing_file(path, what: str) -> Path:
    """`path` as a Path, if it names a file; else an error saying it is a folder or missing."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_json(path, what: str, required: dict | None = None, format: str | None = None) -> dict:
    """Read a JSON file that must hold an object: a missing file, text that is not JSON, a JSON
    value that is not an object, another `format` marker or a missing/mistyped required key each
    give one message naming the file."""
    path = _existing_file(path, what)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file ({what} expected)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({what} expected): {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, but {what} is a JSON object")
    if format is not None and obj.get("format") != format:
        raise ValueError(f"{path} is not a {what} (format={obj.get('format')!r}, expected {format!r})")
    return check_keys(obj, required or {}, path)


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning the library's parse errors into one clear message; tensors
    holding NaN or Inf are refused here, so that no later computation is blamed for them."""
    path = _existing_file(path, f"{what} file")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} is not a safetensors file ({what} expected): {err}") from None
    return check_finite(tensors, path)


def check_finite(tensors: dict, path) -> dict:
    """Refuse weights or signals holding NaN or Inf where they are read, naming the file and tensor."""
    for name, tensor in tensors.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            row = f" (first at row {int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0])})" if bad.ndim > 1 else ""
            raise ValueError(f"{path}: tensor {name!r} contains NaN or Inf{row}")
    return tensors


def check_replace(path, what: str, ours) -> Path:
    """A writer replaces only its own kind of file: an existing `path` that `ours(path)` does not
    recognise is refused (it is the user's, or another tool's)."""
    path = Path(path)
    if path.is_file():
        try:
            recognised = bool(ours(path))
        except (OSError, ValueError, UnicodeDecodeError):
            recognised = False
        if not recognised:
            raise FileExistsError(f"{path} exists and is not a {what}; refusing to overwrite it")
    return path


def check_pair(path, format: str, what: str) -> None:
    """Before saving the pair `STEM.safetensors` + `STEM.json`: both can be written, and a writer
    replaces only its own kind: an existing `STEM.json` must carry `format`, and an existing
    `STEM.safetensors` needs that description beside it (else it is someone's data)."""
    tensors_path, meta_path = paired(path)
    for file in (tensors_path, meta_path):
        check_writable(file, what)
    if meta_path.exists():
        if not has_format(meta_path, format):
            raise FileExistsError(f"{meta_path} exists and is not a {what}; refusing to overwrite it")
    elif tensors_path.exists():
        raise FileExistsError(f"{tensors_path} exists without a {what} description ({meta_path.name}); "
                              "refusing to overwrite it")


def has_format(path, format: str) -> bool:
    """Whether `path` is a JSON object carrying the marker ``"format": format`` (a file of ours)."""
    try:
        return read_json(path, "JSON file").get("format") == format
    except (OSError, ValueError):
        return False
