"""Shared by binary_sae.py and probing.py: SmolLM2 activation stores extracted once into a cache
folder and reused, and the tokens (with the documentation topic each came from) behind every
stored activation, which the probing labels are computed from."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sparsecode import activations as act
from sparsecode._io import write_tensors
from sparsecode.activations.corpus import shuffled_rows

LAYER = 15
#: documents kept out of every store: the model-splicing evaluation's text (as smollm2_sae.py)
HELD_OUT_DOCS = 8


def ensure_stores(cache: Path, tokens: int, sites=("resid", "mlp"), layer: int = LAYER) -> dict[str, Path]:
    """Stores `cache/<site>-<tokens>` of the embedded SmolLM2's layer `layer`, extracted if missing
    (an interrupted extraction resumes), and `cache/tokens-<tokens>.safetensors`: the token id and
    topic index of each stored activation (the same for every site: one corpus, one row order)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {site: cache / f"{site}-{tokens}" for site in sites}
    token_file = cache / f"tokens-{tokens}.safetensors"
    todo = [s for s, p in paths.items() if not _complete(p, tokens)]
    if not todo and token_file.is_file():
        return {**paths, "tokens": token_file}
    t0 = time.perf_counter()
    loaded = act.load_model(None, device="cpu")
    corpus, docs = act.read_corpus(None)
    train_docs = docs[:-HELD_OUT_DOCS]
    for site in todo:
        stats = act.extract(loaded, corpus, train_docs, paths[site],
                            act.ExtractConfig(layer=layer, site=site, n_tokens=tokens, batch_size=8))
        print(f"extracted {stats.tokens} {site} tokens at {stats.tokens_per_s:,.0f} tok/s", flush=True)
    if not token_file.is_file():
        ids, topics = token_labels(loaded.tokenizer, train_docs, tokens)
        write_tensors(token_file, {"ids": ids, "topic": topics})
        from pydoc_data.topics import topics as names
        # read_corpus's documents: the topics in sorted order, empty ones dropped
        keys = [k for k in sorted(names) if names[k].strip()]
        (cache / "topics.json").write_text(json.dumps(keys[:-HELD_OUT_DOCS]))
    print(f"stores ready in {time.perf_counter() - t0:.0f}s", flush=True)
    return {**paths, "tokens": token_file}


def _complete(path: Path, tokens: int) -> bool:
    try:
        return act.ActivationStore(path).n_tokens >= tokens
    except (FileNotFoundError, ValueError):
        return False


def token_labels(tokenizer, docs: list[str], n_tokens: int, context_length: int = 128, seed: int = 0):
    """Token ids and document indices of the first `n_tokens` activations an extraction with these
    settings (BOS skipped) stores, in store order; checked against the extraction's own rows."""
    rows = shuffled_rows(tokenizer, docs, context_length, True, seed)[:, 1:]
    # the same stream as `token_sequences`, carrying each token's document index
    doc_of = []
    for i, doc in enumerate(docs):
        doc_of.extend([i] * (len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1))   # + EOS
    width = rows.shape[1]
    n_rows = len(doc_of) // width
    doc_rows = torch.tensor(doc_of[: n_rows * width]).view(n_rows, width)
    doc_rows = doc_rows[torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))]
    if n_rows != rows.shape[0]:
        raise RuntimeError(f"token stream of {n_rows} rows does not match the extraction's {rows.shape[0]}")
    return rows.reshape(-1)[:n_tokens].clone(), doc_rows.reshape(-1)[:n_tokens].clone()
