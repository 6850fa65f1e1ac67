"""Extraction: run the model over a corpus and write the hookpoint's activations into a store.

A shard is written under a temporary name and renamed, then the manifest (written the same way)
records it, so a killed extraction leaves only whole shards and resumes after the last one.

Under torchrun (`sparsecode.distributed`) the sequences the budget needs are split into one
contiguous part per rank (`Group.part`); each rank writes its own shards
(``shard-rRR-NNNNN.safetensors``) and records its progress in its own ``manifest-rRR.json``, so a
killed job resumes rank by rank. Rank 0 writes ``manifest.json`` once every rank is done: the
shards in rank order (the one-process store's tokens, in the same order) and each rank's part.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import _io, distributed
from .corpus import corpus_hash, shuffled_rows
from .hooks import SITES, absolute_layer, capture, hook_modules, run_to_hook
from .model import LoadedModel
from .store import FORMAT, ActivationStore

log = logging.getLogger(__name__)

#: what a resumed extraction relies on besides the readers' keys
RESUME_KEYS = {"sequences_done": int}
#: what must match for a resumed extraction to continue a store
IDENTITY_KEYS = ("model", "revision", "site", "layer", "d", "dtype", "context_length", "corpus", "corpus_hash", "seed",
                 "skip_bos")
#: files an extraction writes besides manifest.json (one process, or rank RR of several)
_OURS = re.compile(r"shard-(r\d{2,}-)?\d{5}\.safetensors|manifest-r\d{2,}\.json")


@dataclass
class ExtractConfig:
    layer: int = 15
    """Block index (0-based) whose activations are taken."""
    site: str = "resid"
    """'resid': residual stream after the block; 'mlp': the block's MLP input and output (transcoders)."""
    context_length: int = 128
    """Tokens per sequence."""
    batch_size: int = 8
    """Sequences per forward pass."""
    n_tokens: int = 20_000
    """Token budget (activations stored)."""
    shard_tokens: int = 8192
    """Tokens per shard file."""
    skip_bos: bool = True
    """Start each sequence with BOS and store no activation for it (its norm is atypical)."""
    dtype: str = "float32"
    """Storage dtype: float32, float16 or bfloat16."""
    seed: int = 0
    """Seed of the order of the corpus's sequences."""


@dataclass
class ExtractStats:
    tokens: int
    seconds: float
    tokens_per_s: float
    resumed_from: int
    bare_tokens_per_s: float | None = None
    overhead: float | None = None
    extra: dict = field(default_factory=dict)


def _identity(m: dict) -> dict:
    return {k: m.get(k) for k in IDENTITY_KEYS}


def _only_ours(folder: Path) -> bool:
    """Whether a folder without a manifest holds nothing but what a killed extraction leaves behind:
    shards written before the first manifest and temporary files."""
    return all(_OURS.fullmatch(p.name) or _io.is_temporary(p.name) for p in folder.iterdir())


def _check(cfg: ExtractConfig) -> None:
    if cfg.site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {cfg.site!r}")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {cfg.dtype!r}")
    for name in ("context_length", "batch_size", "n_tokens", "shard_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.skip_bos and cfg.context_length < 2:
        raise ValueError("context_length must be >= 2 when skipping BOS")


def extract(loaded: LoadedModel, corpus_name: str, docs: list[str], out, cfg: ExtractConfig, *,
            progress: Callable[[int, int], None] | None = None, measure_overhead: bool = False,
            _stop_after_shards: int | None = None) -> ExtractStats:
    """Run the model over the corpus and store the hookpoint's activations (resuming a partial store).
    Under a launcher each rank extracts its part of the sequences (see the module's docstring)."""
    _check(cfg)
    model = loaded.model
    layer = absolute_layer(model, cfg.layer)
    hook_modules(model, layer, cfg.site)                                   # validates layer and site
    out = Path(out)
    rows = shuffled_rows(loaded.tokenizer, docs, cfg.context_length, cfg.skip_bos, cfg.seed)
    d = model.config.hidden_size
    manifest = {"format": FORMAT, "version": 1, "model": loaded.name, "revision": loaded.revision, "site": cfg.site,
                "layer": layer, "d": d, "dtype": cfg.dtype, "context_length": cfg.context_length,
                "corpus": corpus_name, "corpus_hash": corpus_hash(docs), "seed": cfg.seed, "skip_bos": cfg.skip_bos,
                "n_tokens": 0,
                "sequences_done": 0, "shards": [], "keys": ["x", "y"] if cfg.site == "mlp" else ["x"]}
    if (out / "manifest.json").is_file():
        existing = _io.check_keys(ActivationStore(out).manifest, RESUME_KEYS, out / "manifest.json")
        if _identity(existing) != _identity(manifest):
            diff = {k: (existing.get(k), manifest[k]) for k in IDENTITY_KEYS if existing.get(k) != manifest[k]}
            raise ValueError(f"{out} holds activations of another extraction; refusing to mix them "
                             f"(store vs request: {diff}). Use another --out folder")
        manifest = existing
    elif out.exists() and not _only_ours(out):
        raise ValueError(f"{out} exists, holds files other than a store's and has no manifest.json: refusing to "
                         "write into it")
    group = distributed.current()
    if group.distributed or "ranks" in manifest:
        return _extract_ranks(group, model, layer, rows, manifest, out, cfg, progress, _stop_after_shards)
    resumed = manifest["n_tokens"]
    out.mkdir(parents=True, exist_ok=True)
    if resumed == 0:
        # the manifest comes first: a store killed before its first shard is already recognisable as ours
        _io.write_json(out / "manifest.json", manifest)
    start = time.perf_counter()
    _fill(model, layer, rows, manifest, out / "manifest.json", "shard-", cfg.n_tokens, rows.shape[0], out, cfg,
          progress, _stop_after_shards)
    seconds = time.perf_counter() - start
    tokens = manifest["n_tokens"] - resumed
    stats = ExtractStats(tokens, seconds, tokens / seconds if seconds else 0.0, resumed)
    if measure_overhead and tokens:
        stats.bare_tokens_per_s, stats.overhead = _overhead(model, rows, manifest, cfg, _per_seq(cfg), seconds,
                                                            tokens)
    log.info("extracted %d tokens in %.1fs (%.0f tokens/s)", tokens, seconds, stats.tokens_per_s)
    return stats


def _per_seq(cfg: ExtractConfig) -> int:
    return cfg.context_length - (1 if cfg.skip_bos else 0)


def _fill(model, layer, rows, state: dict, state_file: Path, prefix: str, budget: int, stop: int, out: Path,
          cfg: ExtractConfig, progress, stop_after_shards) -> None:
    """Run sequences ``state["sequences_done"]`` up to `stop` until `state` holds `budget` tokens,
    writing shards ``{prefix}NNNNN.safetensors`` and, after each, `state` to `state_file`."""
    d = model.config.hidden_size
    device = next(model.parameters()).device
    dtype = getattr(torch, cfg.dtype)
    per_seq = _per_seq(cfg)
    first = 1 if cfg.skip_bos else 0
    pending: dict[str, list] = {k: [] for k in state["keys"]}
    n_pending = 0
    seq = state["sequences_done"]
    written = 0

    def flush() -> None:
        nonlocal pending, n_pending, written
        keep = min(n_pending, budget - state["n_tokens"])      # the budget is exact
        tensors = {k: torch.cat(v)[:keep].to(dtype) for k, v in pending.items()}
        n_pending = keep
        shard = f"{prefix}{len(state['shards']):05d}.safetensors"
        try:
            _io.write_tensors(out / shard, tensors)
            state["shards"].append({"file": shard, "n_tokens": n_pending})
            state["n_tokens"] += n_pending
            state["sequences_done"] = seq
            _io.write_json(state_file, state)
        except OSError as err:
            if state["shards"] and state["shards"][-1]["file"] == shard:
                state["shards"].pop()
            raise OSError(err.errno, f"could not write {out / shard}: {err.strerror}. The store keeps its "
                                     f"{len(state['shards'])} complete shards and resumes from there") from None
        pending, n_pending = {k: [] for k in state["keys"]}, 0
        written += 1

    with torch.no_grad(), capture(model, layer, cfg.site) as cap:
        while state["n_tokens"] + n_pending < budget and seq < stop:
            ids = rows[seq:min(seq + cfg.batch_size, stop)].to(device)
            run_to_hook(model, ids, cap)
            seq += ids.shape[0]
            for k in state["keys"]:
                pending[k].append(cap[k][:, first:].reshape(-1, d).cpu())
            n_pending += ids.shape[0] * per_seq
            if progress:
                progress(state["n_tokens"] + n_pending, budget)
            if n_pending >= cfg.shard_tokens:
                flush()
                if stop_after_shards is not None and written >= stop_after_shards:
                    raise KeyboardInterrupt("simulated interruption")
        if n_pending:
            flush()


def _extract_ranks(group: distributed.Group, model, layer, rows, manifest: dict, out: Path, cfg: ExtractConfig,
                   progress, stop_after_shards) -> ExtractStats:
    """This rank's part of a job's extraction; rank 0 then writes the store's manifest."""
    per_seq = _per_seq(cfg)
    n_seq = min(math.ceil(cfg.n_tokens / per_seq), rows.shape[0])      # what one process would run
    parts = [group.part(n_seq, r) for r in range(group.world_size)]
    recorded = manifest.get("ranks")
    if recorded is not None and [r["sequences"] for r in recorded] != [[p.start, p.stop] for p in parts]:
        raise ValueError(f"{out} was extracted by {len(recorded)} ranks, this job has {group.world_size}: resume "
                         f"it with --nproc-per-node {len(recorded)} (in all), or extract into another --out folder")
    if recorded is None and manifest["n_tokens"]:
        raise ValueError(f"{out} was extracted by one process: resume it with one process, or extract into "
                         "another --out folder")
    mine = parts[group.rank]
    budget = max(0, min(cfg.n_tokens, mine.stop * per_seq) - mine.start * per_seq)
    state_file = out / f"manifest-r{group.rank:02d}.json"
    state = {**{k: manifest[k] for k in (*IDENTITY_KEYS, "format", "version", "keys")}, "rank": group.rank,
             "sequences": [mine.start, mine.stop], "n_tokens": 0, "sequences_done": mine.start, "shards": []}
    if state_file.is_file():
        saved = _io.read_json(state_file, "sparsecode extraction rank state",
                              {"sequences": list, "n_tokens": int, "sequences_done": int, "shards": list},
                              format=FORMAT)
        if _identity(saved) != _identity(manifest) or saved["sequences"] != state["sequences"]:
            raise ValueError(f"{state_file} belongs to another extraction; refusing to mix them")
        state = saved
    resumed = state["n_tokens"]
    group.barrier()                 # every rank has checked the folder before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if group.main and manifest["n_tokens"] == 0:
        # recognisable as ours (and as a job of this many ranks) before the first shard
        _io.write_json(out / "manifest.json", {**manifest, "ranks": [
            {"rank": r, "sequences": [p.start, p.stop], "shards": []} for r, p in enumerate(parts)]})
    start = time.perf_counter()
    _fill(model, layer, rows, state, state_file, f"shard-r{group.rank:02d}-", budget, mine.stop, out, cfg, progress,
          stop_after_shards)
    seconds = time.perf_counter() - start
    states = group.gather(state)
    if group.main:
        shards = [s for st in states for s in st["shards"]]
        _io.write_json(out / "manifest.json", {
            **manifest, "n_tokens": sum(st["n_tokens"] for st in states), "shards": shards,
            "sequences_done": sum(st["sequences_done"] - st["sequences"][0] for st in states),
            "ranks": [{"rank": st["rank"], "sequences": st["sequences"], "sequences_done": st["sequences_done"],
                       "shards": [s["file"] for s in st["shards"]]} for st in states]})
    group.barrier()                 # the store is whole when extract returns, on every rank
    tokens = state["n_tokens"] - resumed
    log.info("rank %d extracted %d tokens in %.1fs", group.rank, tokens, seconds)
    return ExtractStats(tokens, seconds, tokens / seconds if seconds else 0.0, resumed)


def _overhead(model, rows, manifest, cfg, per_seq, seconds, tokens):
    """A bare forward pass (whole model, no hooks, nothing stored) over the same sequences."""
    device = next(model.parameters()).device
    n_seq = math.ceil(tokens / per_seq)
    first = manifest["sequences_done"] - n_seq
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(max(first, 0), manifest["sequences_done"], cfg.batch_size):
            model(input_ids=rows[s:min(s + cfg.batch_size, manifest["sequences_done"])].to(device), use_cache=False)
    bare = time.perf_counter() - t0
    return tokens / bare, seconds / bare - 1.0
