"""Writing result files atomically (a temp file beside the target, then ``os.replace``), so a
reader never sees half a file and a crash leaves the old one.

The rename is atomic but not durable by itself: without an fsync of the file first, a crash soon
after can leave the new name on a zero-length or partial file (ext4's delayed allocation, the
2009 "O_PONIES" data-loss reports; POSIX makes no ordering promise between data and metadata),
and without an fsync of the directory after it the rename itself may be lost. Hence
write -> fsync(file) -> rename -> fsync(dir), as SQLite and PostgreSQL do (``durable_rename`` in
PostgreSQL's ``fd.c``).
"""

from __future__ import annotations

import errno
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


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to stable storage (before it is renamed into place)."""
    # "rb+": Windows' FlushFileBuffers needs a handle opened for writing; POSIX takes any.
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush directory ``path``'s entries (a rename or unlink in it) to stable storage.

    Skipped where a directory cannot be opened (Windows, whose NTFS journals the rename) or
    cannot be fsynced (EINVAL from some network and FUSE filesystems).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object], suffix: str = "") -> None:
    """Run ``write(tmp_path)`` on a temp file beside ``path``, fsync it, rename it over ``path``
    and fsync the directory: afterwards ``path`` holds the new content even across a crash,
    and a failure at any point before the rename leaves the old file and no temp file."""
    check_parent(path, str(path))
    target = Path(path).resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; a result or checkpoint gets what open() would give it.
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def new_directory(out: str | os.PathLike[str], fill: Callable[[Path], object]) -> Path:
    """Create the directory ``out`` (which must not exist, or be empty) all at once: ``fill``
    writes its files into a temporary sibling, which is fsynced and renamed to ``out``; on any
    error the sibling is removed and ``out`` is left as it was."""
    import shutil

    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise LatentAttnError(f"{dest} exists and is not an empty directory: choose a new OUT")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        fill(tmp)
        for p in tmp.iterdir():
            fsync_file(p)
        fsync_dir(tmp)
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
