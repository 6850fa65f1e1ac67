"""Encoders are discovered through the `sparsecode.encoders` entry-point group, loaded lazily."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points

import torch

from .dictionary import Dictionary
from .encoder import Encoder, EncoderConfig, field_docs, suggest

GROUP = "sparsecode.encoders"
#: the size `sparsecode list` states each encoder's cost at: an LLM-scale SAE (n_atoms, d) and k
COST_SIZE = {"n_atoms": 4096, "d": 576, "k": 32}
log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def encoder_names() -> list[str]:
    return sorted(_entry_points())


def encoder_class(name: str) -> type[Encoder]:
    """The class registered under `name`; an unknown name gets a suggestion and the list."""
    eps = _entry_points()
    if name not in eps:
        raise ValueError(f"unknown encoder {name!r}.{suggest(name, eps)} "
                         f"Available: {', '.join(sorted(eps))}")
    try:
        cls = eps[name].load()
    except Exception as err:  # a third-party plug-in can fail in any way; say which one and how
        raise ImportError(f"encoder {name!r} failed to load from {eps[name].value}: "
                          f"{type(err).__name__}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise TypeError(f"entry point {name!r} ({eps[name].value}) is not a sparsecode Encoder subclass")
    return cls


def get_encoder(name: str, config: EncoderConfig | None = None, **fields) -> Encoder:
    """Build the encoder registered as `name`, with config fields as keywords (`k=16`, `lam=0.1`)."""
    cls = encoder_class(name)
    missing = cls.missing_requirements()
    if missing:
        raise ImportError(f"encoder {name!r} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    return cls(config, **fields)


@dataclass(frozen=True)
class EncoderInfo:
    name: str
    family: str
    knobs: dict          # field -> (default, help)
    available: bool
    missing: tuple       # pip names to install
    error: str = ""      # why the plug-in itself failed to load, if it did
    knob: str | None = None      # the config field that sets sparsity
    flops: float = float("nan")  # planned FLOPs per signal at COST_SIZE (NaN: no closed form)


def planned_flops(cls: type[Encoder], n_atoms: int, d: int, k: int) -> float:
    """Analytic FLOPs per signal of `cls` with its default config (k set to `k` where it has one) on a
    random n_atoms x d dictionary: the formula only, nothing is fitted or encoded."""
    fields = {"k": min(k, cls.max_k(n_atoms, d))} if "k" in cls.Config.__dataclass_fields__ else {}
    try:
        encoder = cls(**fields)
    except (TypeError, ValueError):       # a config with required fields (an imported SAE's path)
        return float("nan")
    atoms = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(0))
    return encoder.planned_flops(Dictionary(atoms, normalize=True))


def available_encoders() -> list[EncoderInfo]:
    """Every registered encoder, with its family, its knobs, and whether it can run here."""
    infos = []
    for name in encoder_names():
        try:
            cls = encoder_class(name)
        except Exception as err:  # a broken third-party plug-in must not hide the others
            log.warning("encoder %s failed to load: %s", name, err)
            infos.append(EncoderInfo(name, "?", {}, False, (), str(err)))
            continue
        docs = field_docs(cls.Config)
        knobs = {f.name: (f.default, docs.get(f.name, "")) for f in dataclasses.fields(cls.Config)}
        missing = tuple(cls.missing_requirements())
        infos.append(EncoderInfo(name, cls.family, knobs, not missing, missing, knob=cls.knob,
                                 flops=planned_flops(cls, **COST_SIZE)))
    return infos
