"""``latentattn.io``: atomic, durable writes (fsync the file, rename, fsync the directory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from conftest import FsyncRecorder, assert_durable
from latentattn import io


def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_dir(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    rec = FsyncRecorder(monkeypatch)
    io.write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert_durable(rec, target)
    assert len(rec.events) == 3  # one of each, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize("fail", ["write", "fsync"])
def test_failed_write_keeps_old_file_and_no_temp(fail: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def write(tmp: str) -> None:
        Path(tmp).write_text("half")
        if fail == "write":
            raise OSError(28, "No space left on device")

    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    if fail == "fsync":
        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space" if fail == "write" else "Input/output"):
        io.atomic_write(target, write)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_fsync_dir_skips_where_directories_cannot_be_opened(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows: os.open on a directory raises PermissionError; the write must still succeed.
    real_open = os.open

    def no_dirs(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_dirs)
    io.write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new"


def test_atomic_write_gives_the_mode_open_would(tmp_path: Path) -> None:
    # mkstemp's 0600 must not leak into results other users of the machine read.
    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "r.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p: (tmp_path / p).stat().st_mode & 0o777 for p in ("r.txt", "plain.txt")}
    assert modes == {"r.txt": 0o644, "plain.txt": 0o644}
