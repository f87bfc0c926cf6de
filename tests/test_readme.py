"""The README's code runs: every ```python block, in order, in one namespace (as a reader would
paste them), in a scratch directory. A block that stops working fails here, not in a user's hands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in BLOCK.finditer(text)]


def test_readme_has_python_blocks() -> None:
    # The extractor must find the blocks, or the test below would pass on nothing.
    assert len(python_blocks(README.read_text())) >= 3


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i + 1} raised {type(e).__name__}: {e}\n"
                                 f"{block}") from e
    assert capsys.readouterr().out  # the blocks print what they claim to show
    assert (tmp_path / "ckpt" / "config.json").is_file()
