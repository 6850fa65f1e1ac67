"""Every bash and python block of README.md runs as written, in order, in one scratch folder.

A block that must not run here is marked right above it, visibly, with its reason:
``<!-- readme-test: skip (needs network) -->``. Blocks that take more than a few seconds are marked
``<!-- readme-test: slow (reason) -->`` and run with the slow tests (``make test-all``); a fast block
never uses what a slow one made. The scratch folder is shared, so a block may read the files an
earlier block wrote (the README says which); `sparsecode` and `python` are this environment's.

Set README_TIMES=FILE to append each block's wall time (JSON lines) for the times the README states.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"^<!--\s*readme-test:\s*(?P<kind>skip|slow)\s*(?:\((?P<reason>[^)]*(?:\([^)]*\)[^)]*)*)\))?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\s*$")
#: seconds one block may take before it counts as failed (the README promises at most 2 minutes on
#: this CPU; the margin is for a machine busy with other work)
LIMIT = 600


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int              # 1-based line of the opening fence
    section: str
    mark: str | None       # "skip", "slow" or None
    reason: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"L{self.line}-{self.lang}-{slug}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced bash and python blocks, each with the marker written just above it (blank lines
    may separate them; any other line cancels a marker)."""
    blocks, mark, section = [], None, ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        m = MARK.match(line.strip())
        fence = FENCE.match(line)
        if m:
            mark = (m["kind"], (m["reason"] or "").strip())
        elif fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if fence["lang"] in ("bash", "python"):
                kind, reason = mark or (None, "")
                blocks.append(Block(fence["lang"], "\n".join(lines[i + 1:end]), i + 1, section, kind, reason))
            elif mark:
                raise ValueError(f"README line {i + 1}: a readme-test marker above a {fence['lang'] or 'plain'} block")
            mark, i = None, end
        elif line.strip() and not line.lstrip().startswith("```"):
            mark = None
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_blocks_and_every_skip_says_why():
    assert len([b for b in BLOCKS if b.mark != "skip"]) >= 10 and any(b.mark is None for b in BLOCKS)
    for block in BLOCKS:
        if block.mark:
            assert len(block.reason) >= 10, f"README line {block.line}: a {block.mark} marker needs its reason"


def test_marker_parsing():
    text = ("# A\n<!-- readme-test: skip (needs a GPU (cuda)) -->\n\n```bash\nnvidia-smi\n```\n"
            "<!-- readme-test: slow (a minute) -->\nsome words\n```python\nprint(1)\n```\n```toml\nx = 1\n```\n")
    first, second = readme_blocks(text)
    assert (first.mark, first.reason, first.code, first.line, first.section) == ("skip", "needs a GPU (cuda)",
                                                                                "nvidia-smi", 4, "A")
    assert second.mark is None and second.lang == "python"       # the words between cancel the marker


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("COLUMNS", "100")
    env.pop("SPARSECODE_DEBUG", None)
    return env


def _run(block: Block, folder: Path) -> None:
    if block.lang == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        script = folder / f"readme_block_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True, timeout=LIMIT)
    seconds = time.perf_counter() - start
    if os.environ.get("README_TIMES"):
        with open(os.environ["README_TIMES"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"line": block.line, "section": block.section, "seconds": round(seconds, 1),
                                 "load": os.getloadavg()[0]}) + "\n")
    assert done.returncode == 0, (f"README line {block.line} ({block.section}) failed with exit code "
                                  f"{done.returncode}:\n{block.code}\n--- stdout\n{done.stdout[-3000:]}\n"
                                  f"--- stderr\n{done.stderr[-3000:]}")


def _param(block: Block):
    marks = []
    if block.mark == "skip":
        marks.append(pytest.mark.skip(reason=f"README marks it: {block.reason}"))
    elif block.mark == "slow":
        marks.append(pytest.mark.slow)
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_block(block: Block, scratch):
    _run(block, scratch)


@pytest.mark.slow
def test_make_demo_script_runs_and_reads_its_result():
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "demo.py"), "--n-atoms", "4096",
                           "--n-samples", "128"], env=_env(), capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Reading: on the same 4,096 x 576 dictionary, OMP recovers" in done.stdout
