"""Write docs/api.md, the API reference, from the code itself: signatures and docstrings.

    python docs/make_api.py          # rewrites docs/api.md; tests/test_docs.py fails when it is stale

Each public name gets its signature and the first paragraph of its docstring; a class also gets its
public methods (and, for `Encoder`, the hooks a subclass implements). Public names are a module's
`__all__`, or else the functions and classes it defines whose names do not start with "_".
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

#: (module, what it is for); the top-level package first, then the modules a user imports by name
MODULES = (
    ("sparsecode", "the names `import sparsecode as sc` gives"),
    ("sparsecode.metrics", "reconstruction, sparsity, support and objective metrics"),
    ("sparsecode.synthetic", "planted sparse-coding problems"),
    ("sparsecode.data", "data in any form -> signals"),
    ("sparsecode.defaults", "k and lam derived from the data when the user gives none"),
    ("sparsecode.memory", "memory budgets"),
    ("sparsecode.native", "compiled CPU kernels: whether they built here, and the loops they run"),
    ("sparsecode.distributed", "several processes under torchrun"),
    ("sparsecode.checkpoint", "resumable training: checkpoints and resuming from them"),
    ("sparsecode.activations", "LLM activations: model, corpus, hooks, store, extraction, evaluation"),
)
#: methods a subclass implements although their names are private: the plug-in contract (docs/plugins.md)
HOOKS = {"sparsecode.encoder.Encoder": ("_fit", "_encode", "_encode_with_info")}
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return sorted(name for name, obj in vars(module).items()
                  if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                  and getattr(obj, "__module__", None) == module.__name__)


def first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""                       # the signature dataclasses write when a class has no docstring
    return " ".join(doc.strip().split("\n\n")[0].split())


class _Written:
    """An annotation shown as written in the source (modules use postponed annotations: strings)."""

    def __init__(self, text: str):
        self.text = text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text

    def __repr__(self) -> str:
        return self.text


def _written(annotation):
    if isinstance(annotation, typing.ForwardRef):    # a NamedTuple's string annotation
        annotation = annotation.__forward_arg__
    return _Written(annotation) if isinstance(annotation, str) else annotation


def signature(obj, returns: bool = True) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):     # builtins and some C types have none
        return "(...)"
    params = [p.replace(annotation=_written(p.annotation)) for p in sig.parameters.values()]
    ret = _written(sig.return_annotation) if returns else inspect.Signature.empty
    text = str(sig.replace(parameters=params, return_annotation=ret))
    return ADDRESS.sub("", text)        # a default's repr must not carry this process's addresses


def _member(cls, name: str):
    """(kind, function) of attribute `name` defined in `cls` itself, or None when not a method."""
    raw = cls.__dict__.get(name)
    if isinstance(raw, classmethod):
        return "classmethod", raw.__func__
    if isinstance(raw, staticmethod):
        return "staticmethod", raw.__func__
    if isinstance(raw, property):
        return "property", raw.fget
    if inspect.isfunction(raw):
        return "method", raw
    return None


def class_section(cls, qualname: str) -> list[str]:
    lines = []
    names = [n for n in cls.__dict__ if not n.startswith("_")]
    names += [n for n in HOOKS.get(f"{cls.__module__}.{cls.__qualname__}", ()) if n in cls.__dict__]
    for name in names:
        member = _member(cls, name)
        if member is None:
            continue
        kind, func = member
        if kind == "property":
            head = f"- `{qualname}.{name}` (property)"
        else:
            params = signature(func)
            if kind == "classmethod":
                params = re.sub(r"^\(cls,? ?", "(", params)
            elif kind == "method":
                params = re.sub(r"^\(self,? ?", "(", params)
            head = f"- `{qualname}.{name}{params}`" + (" (classmethod)" if kind == "classmethod" else "")
        doc = first_paragraph(func)
        lines.append(f"{head}: {doc}" if doc else head)
    return lines


def value_text(value) -> str:
    text = repr(value)
    # short plain values are shown; paths and long values are machine- or size-dependent: their type only
    if isinstance(value, (int, float, str, tuple, frozenset)) and len(text) <= 80 and "/" not in text:
        return f" = {text}"
    return f" ({type(value).__name__})"


def entry(module_name: str, name: str, obj) -> list[str]:
    qualname = name
    if inspect.ismodule(obj):
        return [f"### `{name}`", "", f"The module `{obj.__name__}`: see its section below.", ""]
    if inspect.isclass(obj):
        lines = [f"### class `{qualname}{signature(obj, returns=False)}`", ""]
        doc = first_paragraph(obj)
        if doc:
            lines += [doc, ""]
        methods = class_section(obj, qualname)
        if methods:
            lines += methods + [""]
        return lines
    if callable(obj):
        lines = [f"### `{qualname}{signature(obj)}`", ""]
        doc = first_paragraph(obj)
        return lines + ([doc, ""] if doc else [])
    return [f"### `{qualname}`{value_text(obj)}", ""]


def render() -> str:
    out = ["# API reference", "",
           "Generated by `python docs/make_api.py` from the code's signatures and docstrings (first",
           "paragraph of each); `tests/test_docs.py` fails when this file is out of date. How to write an",
           "encoder of your own: [plugins.md](plugins.md).", ""]
    out += [f"- [`{name}`](#{name.replace('.', '')}): {what}" for name, what in MODULES] + [""]
    for module_name, what in MODULES:
        module = importlib.import_module(module_name)
        out += [f"## {module_name}", "", f"{first_paragraph(module)}", ""]
        for name in public_names(module):
            out += entry(module_name, name, getattr(module, name))
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from sparsecode._io import write_text
    write_text(OUT, render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
