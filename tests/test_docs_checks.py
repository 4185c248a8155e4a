"""docs/checks.md lists every option of every command (its check and when it runs): this test
keeps the table and the parsers in step."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "checks.md"


def _sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0]: p for p in parts}


def test_every_option_of_every_command_is_in_the_table():
    from emprune.cli.main import build_parser

    sections = _sections()
    shared = "".join(body for title, body in sections.items() if title.startswith(("Checks every", "Outputs")))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for cmd, parser in sub.choices.items():
        own = "".join(body for title, body in sections.items() if f"`{cmd}`" in title.split("(")[0])
        assert own, f"no section for {cmd}"
        for act in parser._actions:
            if "-h" in act.option_strings:
                continue
            names = act.option_strings or [act.dest.upper()]
            if not any(f"`{n}`" in own + (shared if cmd != "inspect" else "") for n in names):
                missing.append(f"{cmd} {names[-1]}")
    assert not missing, missing
