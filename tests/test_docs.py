"""The docs cannot rot: docs/api.md is what docs/make_api.py writes from the code today, every python
block of docs/plugins.md compiles, and a file it quotes whole is that file, character for character."""
from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\s*$")
#: the comment right above a block: ``<!-- file: PATH -->`` (it quotes that file whole) or ``<!-- docs-test: run -->``
MARK = re.compile(r"^<!--\s*(?P<mark>.*?)\s*-->\s*$")


def blocks(path: Path) -> list[tuple[str, str, int, str | None]]:
    """(language, code, line of the opening fence, the mark above it or None) of each fenced block."""
    found, lang, start, quoted, code, previous = [], None, 0, None, [], ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), 1):
        fence = FENCE.match(line.rstrip("\n"))
        if lang is None and fence:
            lang, start, code = fence["lang"], number, []
            mark = MARK.match(previous.strip("\n"))
            quoted = mark["mark"] if mark else None
        elif lang is not None and line.rstrip("\n") == "```":
            found.append((lang, "".join(code), start, quoted))
            lang = None
        elif lang is not None:
            code.append(line)
        if line.strip():
            previous = line
    assert lang is None, f"{path.name}: the block opened at line {start} is never closed"
    return found


def _make_api():
    spec = importlib.util.spec_from_file_location("make_api", DOCS / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current():
    committed = (DOCS / "api.md").read_text(encoding="utf-8")
    fresh = _make_api().render()
    if fresh != committed:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                                 "docs/api.md", "regenerated"))[:40])
        pytest.fail(f"docs/api.md is out of date: run `python docs/make_api.py`\n{diff}")


def test_api_reference_documents_the_public_names():
    # a hand-checked sample: the top-level names with their real signatures and docstrings
    import sparsecode as sc
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in sc.__all__:
        assert f"`{name}" in text, name
    assert "### `compare(encoders: Sequence" in text and "### `get_encoder(name: str, config: EncoderConfig | None" in text
    assert "- `Encoder.budget_params(budget: int) -> dict` (classmethod): Config fields that give" in text
    assert "- `Encoder._encode(x: torch.Tensor) -> torch.Tensor`" in text     # a hook of the contract
    assert "### class `Encoded(codes: torch.Tensor, n_iter: float | None = None," in text
    assert "## sparsecode.metrics" in text and "### `fvu(" in text


@pytest.mark.parametrize("doc", ["plugins.md", "api.md"])
def test_python_blocks_compile(doc):
    found = [(code, line) for lang, code, line, _ in blocks(DOCS / doc) if lang == "python"]
    assert found or doc == "api.md"
    for code, line in found:
        compile(code, f"docs/{doc}:{line}", "exec")


def test_quoted_files_are_quoted_whole_and_current():
    quoted = {mark[len("file:"):].strip(): (code, line) for _, code, line, mark in blocks(DOCS / "plugins.md")
              if mark and mark.startswith("file:")}
    assert set(quoted) == {"tests/plugin_pkg/sparsecode_plugin_example.py", "tests/plugin_pkg/pyproject.toml"}
    for path, (code, line) in quoted.items():
        assert code == (ROOT / path).read_text(encoding="utf-8"), (
            f"docs/plugins.md:{line} quotes {path}, which has changed: copy it again")


def test_block_reader_finds_quotes_and_languages(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n<!-- file: a/b.py -->\n```python\nx = 1\n\n```\n\n```bash\nls\n```\n")
    assert blocks(doc) == [("python", "x = 1\n\n", 3, "file: a/b.py"), ("bash", "ls\n", 8, None)]


def test_the_trained_encoder_example_trains_both_ways():
    import torch

    import sparsecode as sc
    runs = [code for lang, code, _, mark in blocks(DOCS / "plugins.md") if lang == "python" and mark == "docs-test: run"]
    assert len(runs) == 1
    namespace: dict = {}
    exec(compile(runs[0], "docs/plugins.md", "exec"), namespace)
    cls = namespace["ShrinkSAE"]
    assert cls.trainable and cls.learns_dictionary and cls.sees_raw_input and not cls.solves_lasso
    assert cls.lam_per_unit(16, 8) == 0.25
    data = sc.synthetic.make_sparse_data(n_samples=256, d=8, n_atoms=16, k=3, seed=0)

    def fvu(enc, dictionary):
        codes = enc.encode(data.x)
        assert (codes >= 0).all()
        return sc.metrics.fvu(data.x, dictionary.decode(codes))
    # with the dictionary known: one step leaves the overshooting start (W = atoms: FVU 2.45 measured),
    # training brings it under 0.3 (0.16 measured)
    untrained = cls(steps=1, l1_coefficient=0.001).fit(data.dictionary, data.x)
    trained = cls(steps=300, l1_coefficient=0.001).fit(data.dictionary, data.x)
    assert fvu(untrained, data.dictionary) > 1 and fvu(trained, data.dictionary) < 0.3
    assert trained.losses[-1] < trained.losses[0] / 5
    assert trained.flops_per_signal() == 2 * 8 * 16 + 3 * 16
    # learning its own dictionary (0.19 measured)
    joint = cls(steps=300, l1_coefficient=0.001)
    dictionary = joint.learn(data.x, 16)
    assert dictionary.atoms.shape == (16, 8) and fvu(joint, dictionary) < 0.3
    assert isinstance(dictionary, sc.Dictionary) and joint.dictionary is dictionary
    torch.testing.assert_close(dictionary.norms, torch.ones(16), atol=1e-5, rtol=0)
