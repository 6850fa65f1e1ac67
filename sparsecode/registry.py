"""Encoders are discovered through the `sparsecode.encoders` entry-point group, loaded lazily."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points

from .encoder import Encoder, EncoderConfig, field_docs, suggest

GROUP = "sparsecode.encoders"
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
        infos.append(EncoderInfo(name, cls.family, knobs, not missing, missing))
    return infos
