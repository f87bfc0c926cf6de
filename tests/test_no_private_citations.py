"""No comment, docstring or string in src/ or tests/ cites a document users do not have: the
project's private design notes. Cite the paper, report or public file (with its repository)
instead, or state the reasoning; a measurement of this project names the command that made it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ("facts file", "facts section", "next-facts", "shared/design", "mla-dsa-facts", "v4-facts",
            "conversion-2026")
PRIVATE = re.compile("|".join(re.escape(p) for p in PATTERNS), re.IGNORECASE)


def test_no_citations_of_private_documents() -> None:
    here = Path(__file__).resolve()
    found = []
    for top in ("src", "tests"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.resolve() == here or not path.is_file() or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if PRIVATE.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "cites a document that is not in the repository:\n" + "\n".join(found)
