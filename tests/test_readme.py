"""The README's Python examples run as written, and its Quickstart reads in the right order.

Every fenced ``python`` block of README.md runs in a fresh namespace, in an empty temporary
folder (the examples write files), so the README can never drift from the API.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block opened with ```` ```python ````."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


BLOCKS = python_blocks(TEXT)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 3
    assert any("inputs=lambda b: b[0]" in code for _, code in BLOCKS)
    assert any("load_state_dict" in code for _, code in BLOCKS)


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_line_{line}"}
    with warnings.catch_warnings():
        # an example that stacks masks by mistake would teach the mistake
        warnings.filterwarnings("error", message=".*already carry a reversible mask")
        exec(compile(code, f"{README}:{line}", "exec"), namespace)
    assert "emprune" in namespace  # every example imports what it uses


def test_python_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nno\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\nz = 3\n")]


def test_quickstart_cpu_note_comes_before_the_install_it_changes():
    quick = TEXT[TEXT.index("## Quickstart"):TEXT.index("## Python API")]
    cpu = quick.index("download.pytorch.org/whl/cpu")
    install = quick.index("pip install -e '.[llm]'")
    assert cpu < install
    assert "emprune-demo/" in quick and "peak memory" in quick  # what it writes, where, and its cost
    assert "DEMO_" not in quick  # measured numbers, not placeholders
