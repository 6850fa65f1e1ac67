"""The read side of an activation store: a folder with ``manifest.json`` and
``shard-NNNNN.safetensors`` shards, streamed one shard at a time."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import safe_open

from .. import _io

FORMAT = "sparsecode.activations"
#: what every reader relies on, with its JSON type
MANIFEST_KEYS = {"site": str, "layer": int, "d": int, "dtype": str, "n_tokens": int, "shards": list, "keys": list}


class Batch(NamedTuple):
    """Signals `x` (n, d) and, when targets were asked for, the MLP outputs `y` (n, d); else None."""

    x: torch.Tensor
    y: torch.Tensor | None = None


class ActivationStore:
    """Read side of a store: checks the manifest against the shards, streams batches from them."""

    def __init__(self, path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path} is not an activation store: no manifest.json")
        self.manifest = _io.read_json(manifest, "sparsecode activation store manifest", MANIFEST_KEYS, format=FORMAT)
        for i, shard in enumerate(self.manifest["shards"]):
            where = f"{manifest}: shards[{i}]"
            if not isinstance(shard, dict):
                raise ValueError(f"{where} must be an object with 'file' and 'n_tokens', got {shard!r}")
            _io.check_keys(shard, {"file": str, "n_tokens": int}, where)
        self._check_shards()

    def _check_shards(self) -> None:
        total = 0
        for shard in self.manifest["shards"]:
            f = self.path / shard["file"]
            if not f.is_file():
                raise ValueError(f"store {self.path}: manifest lists {shard['file']} but the file is missing")
            try:
                with safe_open(str(f), framework="pt") as fh:
                    shape = fh.get_slice("x").get_shape()
            except Exception as err:
                raise ValueError(f"store {self.path}: {shard['file']} is unreadable ({err})") from None
            if shape != [shard["n_tokens"], self.manifest["d"]]:
                raise ValueError(f"store {self.path}: {shard['file']} holds {tuple(shape)} but the manifest says "
                                 f"({shard['n_tokens']}, {self.manifest['d']})")
            total += shard["n_tokens"]
        if total != self.manifest["n_tokens"]:
            raise ValueError(f"store {self.path}: shards hold {total} tokens but the manifest says "
                             f"{self.manifest['n_tokens']}")

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    @property
    def d(self) -> int:
        return self.manifest["d"]

    @property
    def has_targets(self) -> bool:
        """Whether the store holds MLP outputs `y` besides the inputs (the ``mlp`` site)."""
        return "y" in self.manifest["keys"]

    @property
    def scale(self) -> float:
        norm = self.manifest.get("normalization") or {}
        return float(norm.get("scale", 1.0))

    def _shard(self, i: int, keys=("x", "y")) -> dict:
        out = {}
        with safe_open(str(self.path / self.manifest["shards"][i]["file"]), framework="pt") as fh:
            for k in keys:
                if k in fh.keys():
                    out[k] = fh.get_tensor(k)
        return out

    def batches(self, batch_size: int = 4096, *, shuffle: bool = False, seed: int = 0, buffer_tokens: int = 65536,
                normalize: bool = False, targets: bool = False, start: int = 0,
                max_tokens: int | None = None) -> Iterator[Batch]:
        """Yield float32 `Batch`es (`y` is None unless `targets`), reading one shard at a time.

        Shuffling permutes the shard order and mixes tokens within a buffer of `buffer_tokens`;
        memory stays at about one buffer whatever the store's size. `start`/`max_tokens` select
        a contiguous token range (before shuffling) for train/test splits.
        """
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.manifest["shards"]), generator=gen).tolist() if shuffle else \
            list(range(len(self.manifest["shards"])))
        bounds, pos = {}, 0
        for i, shard in enumerate(self.manifest["shards"]):
            bounds[i] = (pos, pos + shard["n_tokens"])
            pos += shard["n_tokens"]
        stop = self.n_tokens if max_tokens is None else min(self.n_tokens, start + max_tokens)
        scale = self.scale if normalize else 1.0
        buffer: list[Batch] = []
        held = 0

        def drain(final: bool):
            nonlocal buffer, held
            xs = torch.cat([b.x for b in buffer])
            ys = torch.cat([b.y for b in buffer]) if targets else None
            if shuffle:
                perm = torch.randperm(xs.shape[0], generator=gen)
                xs, ys = xs[perm], (ys[perm] if targets else None)
            n_out = xs.shape[0] if final else (xs.shape[0] // batch_size) * batch_size
            for s in range(0, n_out, batch_size):
                yield Batch(xs[s:s + batch_size], ys[s:s + batch_size] if targets else None)
            rest = Batch(xs[n_out:], ys[n_out:] if targets else None)
            buffer, held = ([rest] if rest.x.shape[0] else []), rest.x.shape[0]

        for i in order:
            lo, hi = bounds[i]
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            data = self._shard(i)
            if targets and "y" not in data:
                raise ValueError(f"store {self.path} has no MLP outputs (site={self.manifest['site']})")
            x = data["x"][a - lo:b - lo].float() * scale
            y = data["y"][a - lo:b - lo].float() * scale if targets else None
            buffer.append(Batch(x, y))
            held += x.shape[0]
            if held >= buffer_tokens:
                yield from drain(False)
        if held:
            yield from drain(True)

    def tokens(self, start: int = 0, n_tokens: int | None = None, *, normalize: bool = True) -> "TokenRange":
        """A contiguous range of the store's tokens to stream (e.g. to `sparsecode.compare` or to a
        trainable encoder's `fit`), normalised by the store's recorded scale unless told otherwise."""
        if start < 0 or start >= self.n_tokens:
            raise ValueError(f"start={start} is outside the store's {self.n_tokens} tokens")
        if n_tokens is not None and n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1 or None (all), got {n_tokens}")
        return TokenRange(self, start, min(n_tokens or self.n_tokens, self.n_tokens - start), normalize)

    def load(self, n_tokens: int | None = None, *, start: int = 0, normalize: bool = False,
             targets: bool = False) -> Batch:
        """A contiguous range of tokens as one `Batch`: for comparisons on a modest subset."""
        parts = list(self.batches(1 << 20, start=start, max_tokens=n_tokens, normalize=normalize, targets=targets))
        if not parts:
            raise ValueError(f"store {self.path} has no tokens in [{start}, {start + (n_tokens or 0)})")
        return Batch(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]) if targets else None)


@dataclass(frozen=True)
class TokenRange:
    """Tokens [start, start + n_tokens) of a store, read shard by shard: what streams over data
    larger than memory (comparisons, training) take instead of a tensor. It yields signals only
    (tensors (n, d)); a store's MLP outputs are read with `ActivationStore.batches(targets=True)`."""

    store: ActivationStore
    start: int
    n_tokens: int
    normalize: bool = True

    @property
    def d(self) -> int:
        return self.store.d

    def batches(self, batch_size: int = 4096, *, shuffle: bool = False, seed: int = 0,
                buffer_tokens: int = 65536) -> Iterator[torch.Tensor]:
        for batch in self.store.batches(batch_size, shuffle=shuffle, seed=seed, normalize=self.normalize,
                                        start=self.start, max_tokens=self.n_tokens, buffer_tokens=buffer_tokens):
            yield batch.x

    def head(self, n_tokens: int) -> torch.Tensor:
        """The first `n_tokens` signals of the range as one tensor."""
        return self.store.load(min(n_tokens, self.n_tokens), start=self.start, normalize=self.normalize).x


def as_token_range(data) -> TokenRange | None:
    """`data` as a TokenRange when it is a store or a range of one; None for anything else."""
    if isinstance(data, ActivationStore):
        return data.tokens()
    return data if isinstance(data, TokenRange) else None


def write_store(folder, x: torch.Tensor, shard_tokens: int = 8192, **identity) -> ActivationStore:
    """A store of signals `x` (n, d) that no model produced (synthetic data, benchmarks), laid out as
    the extractor lays out one process's store; `identity` adds manifest keys (model, site, layer...)."""
    folder = Path(folder)
    if (folder / "manifest.json").exists() or (folder.exists() and any(folder.iterdir())):
        raise ValueError(f"{folder} is not empty: a store is written into a new folder")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be (n_tokens, d) with n_tokens >= 1, got {tuple(x.shape)}")
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, part in enumerate(x.split(shard_tokens)):
        name = f"shard-{i:05d}.safetensors"
        _io.write_tensors(folder / name, {"x": part.contiguous()})
        shards.append({"file": name, "n_tokens": part.shape[0]})
    _io.write_json(folder / "manifest.json", {
        "format": FORMAT, "version": 1, "model": "none", "site": "resid", "layer": 0, **identity, "d": x.shape[1],
        "dtype": str(x.dtype).removeprefix("torch."), "n_tokens": x.shape[0], "shards": shards, "keys": ["x"]})
    return ActivationStore(folder)


def compute_normalization(path) -> float:
    """Scale that brings the store's activations to unit mean squared norm; recorded in the manifest."""
    store = ActivationStore(path)
    total, count = 0.0, 0
    for batch in store.batches(65536):
        total += float((batch.x.double() ** 2).sum())
        count += batch.x.shape[0]
    scale = 1.0 / math.sqrt(total / count) if total else 1.0
    manifest = dict(store.manifest)
    manifest["normalization"] = {"kind": "unit_mean_squared_norm", "scale": scale}
    _io.write_json(store.path / "manifest.json", manifest)
    return scale
