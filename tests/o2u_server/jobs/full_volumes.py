"""Small volumes that really fill up, for the full-disk tests: a tmpfs mounted for one test, and a
ballast file that takes every free byte of it.

Mounting needs root (CAP_SYS_ADMIN); where the test process may not mount, `mounted_tmpfs` skips
the test. `owner` hands the mount to another user (the `postgres` user runs the test database).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["fill", "mounted_tmpfs"]


@contextmanager
def mounted_tmpfs(mount_point: Path, size: int, *, owner: str | None = None) -> Iterator[Path]:
    """An empty tmpfs of `size` bytes at `mount_point` (created), unmounted afterwards."""
    mount_point.mkdir(exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        if owner is not None:
            shutil.chown(mount_point, owner, owner)
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(volume: Path) -> Path:
    """Take every free byte of `volume` with one file; returns it (delete it to free the space)."""
    ballast = volume / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 512, 1):  # unbuffered, down to the last byte
            with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012 - ends by raising
                while True:
                    os.write(fd, b"\0" * size)
            assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return ballast
