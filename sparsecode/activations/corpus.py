"""Text to run a model over, and its token rows."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

DEFAULT_CORPUS = "python-docs"


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


def corpus_hash(docs: list[str]) -> str:
    """Fingerprint of the corpus text, so a resumed extraction continues over the same documents."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


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


def shuffled_rows(tokenizer, docs: list[str], context_length: int, bos: bool, seed: int) -> torch.Tensor:
    """`token_sequences` in an order drawn from `seed` (extraction and evaluation draw it the same way)."""
    rows = token_sequences(tokenizer, docs, context_length, bos)
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))]
