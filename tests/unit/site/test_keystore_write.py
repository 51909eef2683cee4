"""``keystore.write_atomic`` that fails before its rename leaves nothing of the new content."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dvx_dr.site import keystore


def test_a_write_that_fails_before_its_rename_scrubs_the_new_content(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error at the temporary file's fsync: the old content stayed in place, as it
    should, but ``keystore.json.tmp``, the whole new keystore (under a new password, say),
    stayed beside it until the next write or opening."""
    path = tmp_path / "keystore.json"
    keystore.write_atomic(path, b"old content")
    real_fsync = os.fsync
    failed: list[int] = []

    def failing(fd: int) -> None:  # once: the disk recovers for the clean-up
        if not failed and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(keystore.os, "fsync", failing)
    with pytest.raises(OSError):
        keystore.write_atomic(path, b"new secret content")
    monkeypatch.setattr(keystore.os, "fsync", real_fsync)
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keystore.json"]
