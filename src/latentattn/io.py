"""Writing result files atomically (a temp file beside the target, then ``os.replace``), so a
reader never sees half a file and a crash leaves the old one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentattn.errors import LatentAttnError


def check_parent(path: str | Path, flag: str) -> None:
    """Raise a user error naming ``flag`` when ``path``'s directory does not exist."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise LatentAttnError(f"{flag}: directory {parent} does not exist")


def atomic_write(path: str | Path, write: Callable[[str], object], suffix: str = "") -> None:
    """Run ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path``."""
    check_parent(path, str(path))
    target = Path(path).resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
