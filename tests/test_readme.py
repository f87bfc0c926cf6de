"""The README's quickstarts run as written: every ```python block, in order, in one namespace (as a
reader would paste them), and every ```bash block of the Quickstarts section, in order, in one
scratch directory holding a copy of the README (the blocks evaluate models on it). A block that
stops working fails here, not in a user's hands. The Install section's blocks are not run here:
they install packages (tests/test_package.py installs the wheel instead)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
TASKS = 5  # the quickstarts the README promises in its first screen


def blocks(text: str, lang: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text) if m.group(1) == lang]


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_readme_first_screen_lists_the_quickstarts() -> None:
    text = README.read_text()
    first_screen = "\n".join(text.splitlines()[:24])
    links = re.findall(r"^\d\. \[[^\]]+\]\(#([^)]+)\)", first_screen, re.MULTILINE)
    assert len(links) == TASKS, first_screen
    quick = section(text, "Quickstarts")
    headings = re.findall(r"^### (.+)$", quick, re.MULTILINE)
    assert len(headings) == TASKS
    for link, heading in zip(links, headings, strict=True):  # GitHub's anchor of each heading
        assert link == re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"), (link, heading)
    for heading in headings:  # each task has a command to run
        body = quick.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
        assert "```bash" in body, heading


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = blocks(README.read_text(), "python")
    assert len(code) >= 3  # the extractor must find the blocks, or this would pass on nothing
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, block in enumerate(code):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i + 1} raised {type(e).__name__}: {e}\n"
                                 f"{block}") from e
    assert capsys.readouterr().out  # the blocks print what they claim to show
    assert (tmp_path / "ckpt" / "config.json").is_file()


def test_readme_quickstart_commands_run(tmp_path: Path) -> None:
    text = README.read_text()
    commands = blocks(section(text, "Quickstarts"), "bash")
    assert len(commands) >= TASKS
    shutil.copy(README, tmp_path / "README.md")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for i, block in enumerate(commands):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"quickstart bash block {i + 1} failed:\n{block}\n{run.stderr[-3000:]}"
        assert run.stdout.strip(), f"quickstart bash block {i + 1} printed nothing"
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
