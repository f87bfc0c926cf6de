"""The documentation site: ``mkdocs build --strict`` succeeds (a broken link or cross-reference, a
page missing from the nav, a docstring mkdocstrings cannot read all fail it), the generated CLI
page lists every command and option that ``--help`` shows, and the API page holds
``latentattn.load``'s docstring."""

from __future__ import annotations

import argparse
import html
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import latentattn
from latentattn.cli import build_parser

INSTALL = "pip install -e '.[docs]'; make test installs it"
pytest.importorskip("mkdocs", reason=f"mkdocs is not installed ({INSTALL})")
pytest.importorskip("material", reason=f"mkdocs-material is not installed ({INSTALL})")
pytest.importorskip("mkdocstrings_handlers.python",
                    reason=f"mkdocstrings[python] is not installed ({INSTALL})")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built strictly from a copy of the docs sources, into a temporary directory."""
    tmp = tmp_path_factory.mktemp("docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp / "docs")
    shutil.copytree(ROOT / "docs_hooks", tmp / "docs_hooks")
    (tmp / "src").symlink_to(ROOT / "src")  # mkdocstrings reads `paths: [src]` beside mkdocs.yml
    results = tmp / "docs" / "results.md"
    if not results.exists():
        # docs/results.md is written on its own branch; a checkout without it still builds the rest.
        results.write_text("# Results\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(tmp / "mkdocs.yml"),
         "--site-dir", str(tmp / "site")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return tmp / "site"


def text_of(page: Path) -> str:
    """A built page's text: tags dropped, entities decoded, whitespace collapsed."""
    body = re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))
    return " ".join(html.unescape(body).split())


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(((*path, name), sub))
                out.extend(commands(sub, (*path, name)))
    return out


def test_cli_page_lists_every_command_and_option(site: Path) -> None:
    page = site / "cli" / "index.html"
    raw = page.read_text(encoding="utf-8")
    text = text_of(page)
    found = commands(build_parser())
    top = {path[0] for path, _ in found}
    assert {"kv-cache", "generate", "convert", "train", "compare", "bench", "kernels"} <= top
    for path, sub in found:
        assert f'id="{"-".join(path)}"' in raw, f"no section for latentattn {' '.join(path)}"
        assert f"latentattn {' '.join(path)}" in text
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:  # a deprecated spelling: hidden, as --help hides it
                continue
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                        f"latentattn {' '.join(path)}: {flag} missing from the CLI page")


def test_api_page_holds_load_docstring(site: Path) -> None:
    text = text_of(site / "api" / "index.html")
    doc = inspect.getdoc(latentattn.load)
    assert doc
    first = " ".join(doc.split("\n\n")[0].replace("``", "").split())
    assert first in text


def test_every_nav_page_is_built(site: Path) -> None:
    for page in ("concepts", "cli", "results", "guides/convert", "guides/kv-cache", "api/cache"):
        assert (site / page / "index.html").is_file(), page
