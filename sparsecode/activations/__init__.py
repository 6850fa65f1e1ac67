"""LLM activations: model loading (any causal LM, or the embedded SmolLM2), forward hooks, a
resumable sharded store and its streaming reader, extraction, and evaluation of a (dictionary,
encoder) spliced back into the model.

Store layout (a folder): ``manifest.json`` and ``shard-NNNNN.safetensors``. Each shard holds
``x`` (tokens, d) — the residual stream, or the MLP input — and, for the ``mlp`` site, ``y`` (the
MLP output of the same block).

Modules: `model` (loading), `corpus` (text and token rows), `hooks` (capture and splice),
`store` (reading; `write_store` for signals no model produced), `extraction` (writing), `evaluation` (CE with reconstructions spliced in).
"""
from .corpus import DEFAULT_CORPUS, corpus_hash, read_corpus, token_sequences
from .evaluation import Evaluation, Hookpoint, evaluate
from .extraction import ExtractConfig, ExtractStats, RESUME_KEYS, extract
from .hooks import SITES, capture, decoder_layers, hook_modules, run_to_hook, splice
from .model import DEFAULT_MODEL, GGUF_NAME, LoadedModel, embedded_model_file, is_embedded, load_model
from .store import (FORMAT, MANIFEST_KEYS, ActivationStore, Batch, TokenRange, as_token_range, compute_normalization,
                    write_store)

__all__ = ["DEFAULT_CORPUS", "corpus_hash", "read_corpus", "token_sequences", "Evaluation", "Hookpoint", "evaluate",
           "ExtractConfig", "ExtractStats", "RESUME_KEYS", "extract", "SITES", "capture", "decoder_layers",
           "hook_modules", "run_to_hook", "splice", "DEFAULT_MODEL", "GGUF_NAME", "LoadedModel",
           "embedded_model_file", "is_embedded", "load_model", "FORMAT", "MANIFEST_KEYS", "ActivationStore", "Batch",
           "TokenRange", "as_token_range", "compute_normalization", "write_store"]
