"""The import graph of the `sparsecode` package: no cycles, and no module reaching into another's
private names. Read from the source with `ast`, so imports inside functions count too."""
from __future__ import annotations

import ast
from pathlib import Path

import sparsecode

PACKAGE = Path(sparsecode.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a `from ... import` refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]):
    """(importer, imported module, imported names) for every import of a sparsecode module."""
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "sparsecode":
                        yield module, alias.name, []
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                if target.split(".")[0] != "sparsecode":
                    continue
                names = [a.name for a in node.names]
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                if submodules:          # `from . import metrics`: the imported thing is a module
                    for sub in submodules:
                        yield module, sub, []
                    names = [n for n in names if f"{target}.{n}" not in modules]
                if names:
                    yield module, target, names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for importer, imported, _ in _imports(modules):
        # a module's own package (its __init__) runs first anyway: that edge is not a dependency
        if imported in modules and not importer.startswith(imported + "."):
            graph[importer].add(imported)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle_and_reads_relative_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph()
    assert "sparsecode.dictionary" in graph["sparsecode.compare"]          # `from .dictionary import ...`
    assert "sparsecode._io" in graph["sparsecode.activations.store"]       # `from .. import _io`


def test_sparsecode_modules_import_each_other_without_cycles():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_no_module_imports_another_modules_private_names():
    found = [f"{importer} imports {name} from {imported}"
             for importer, imported, names in _imports(_modules()) for name in names
             if name.startswith("_") and not name.startswith("__")]
    assert not found, "\n".join(found)


def test_no_module_reads_another_modules_private_attributes():
    """`_io.write_tensors` is fine; `_io._atomic` from outside `_io` is not."""
    modules = _modules()
    short = {m.rsplit(".", 1)[-1]: m for m in modules}
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.value.id in short
                    and short[node.value.id] != module):
                found.append(f"{module}: {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_every_subpackage_is_in_the_distribution():
    # pyproject lists packages by hand (the plug-ins' package-dir mapping rules out discovery): a
    # subpackage missing there would be left out of a wheel although the editable install finds it
    import tomllib
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "sparsecode").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
