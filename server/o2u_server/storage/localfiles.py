"""Reading, listing and atomically writing files under the data roots.

Paths reach here already resolved and checked by `storage.uris`; this module re-checks what it
actually opened (through /proc/self/fd where the platform has it) so a symlink swapped in between the
check and the open still cannot lead outside the roots. OS errors become the service's error classes,
each naming the URI.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence

from o2u_server.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from o2u_server.storage.uris import file_uri, inside

__all__ = ["LocalEntry", "iter_files", "read_file", "regular_file", "stat_entry", "write_file_atomically"]

_CHUNK = 1024 * 1024
_PROC_FD = "/proc/self/fd"

LocalEntry = tuple[str, str, int, str]  # (resolved path, '/'-separated relative key, size, etag)


def _etag(file_status: os.stat_result) -> str:
    # Changes whenever the file is rewritten, like an object store's ETag does.
    return f"{file_status.st_mtime_ns:x}-{file_status.st_size:x}"


def _os_error(error: OSError, path: str, field: str) -> Exception:
    uri = file_uri(path)
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        return NotFound(
            f"{uri} does not exist", reason="OBJECT_NOT_FOUND", resource_type="object", resource_name=uri
        )
    if isinstance(error, PermissionError):
        return PermissionDenied(
            f"the server process may not read {uri}: {error.strerror}",
            reason="FILE_NOT_READABLE",
            field=field,
        )
    return Unavailable(f"could not access {uri}: {error.strerror or error}", reason="FILE_IO_ERROR")


def regular_file(path: str, *, field: str) -> os.stat_result:
    """stat() of a regular file, or the service error saying why `path` is not one."""
    try:
        file_status = os.stat(path)
    except OSError as error:
        raise _os_error(error, path, field) from error
    if not stat.S_ISREG(file_status.st_mode):
        raise InvalidArgument(
            f"{field} {file_uri(path)} is not a regular file", reason="NOT_A_FILE", field=field
        )
    return file_status


def read_file(path: str, *, roots: Sequence[str], field: str, max_bytes: int | None = None) -> bytearray:
    """All bytes of the file at the resolved `path`; ResourceExhausted past `max_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:  # the last component became a symlink after the check
            raise PermissionDenied(f"{field} {file_uri(path)} changed into a symlink", field=field) from error
        raise _os_error(error, path, field) from error
    with os.fdopen(fd, "rb") as handle:
        _check_opened(fd, roots=roots, path=path, field=field)
        file_status = os.fstat(fd)
        if not stat.S_ISREG(file_status.st_mode):
            raise InvalidArgument(
                f"{field} {file_uri(path)} is not a regular file", reason="NOT_A_FILE", field=field
            )
        if max_bytes is not None and file_status.st_size > max_bytes:
            raise _too_large(path, max_bytes)
        data = bytearray()
        try:
            while chunk := handle.read(_CHUNK):
                data += chunk
                if max_bytes is not None and len(data) > max_bytes:
                    raise _too_large(path, max_bytes)
        except OSError as error:
            raise _os_error(error, path, field) from error
    return data


def _too_large(path: str, max_bytes: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"{file_uri(path)} is larger than the {max_bytes} bytes left under max_dataset_bytes "
        "(O2U_MAX_DATASET_BYTES)",
        reason="DATASET_TOO_LARGE",
        metadata={"limit": "max_dataset_bytes"},
    )


def _check_opened(fd: int, *, roots: Sequence[str], path: str, field: str) -> None:
    try:
        opened = os.readlink(f"{_PROC_FD}/{fd}")
    except OSError:
        return  # no /proc: the resolved-path check done by the caller is what we have
    if not any(inside(opened, root) for root in roots):
        raise PermissionDenied(
            f"{field} {file_uri(path)} resolves outside the server's data roots",
            reason="PATH_OUTSIDE_DATA_ROOTS",
        )


def iter_files(folder: str, *, roots: Sequence[str], field: str) -> Iterator[LocalEntry]:
    """Regular files below the resolved `folder`, sorted by relative key; hidden names are skipped.

    Symlinked folders are not descended into; a symlinked file counts if it resolves inside a root,
    and one that resolves outside raises PermissionDenied naming it.
    """
    try:
        file_status = os.stat(folder)
    except OSError as error:
        raise _os_error(error, folder, field) from error
    if not stat.S_ISDIR(file_status.st_mode):
        raise InvalidArgument(
            f"{field} {file_uri(folder)} is not a folder", reason="NOT_A_FOLDER", field=field
        )
    entries: list[LocalEntry] = []

    def fail(error: OSError) -> None:
        raise _os_error(error, error.filename or folder, field)

    for directory, subdirectories, files in os.walk(folder, onerror=fail):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            real = os.path.realpath(path)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if not any(inside(real, root) for root in roots):
                raise PermissionDenied(
                    f"{field}: {relative} in {file_uri(folder)} links outside the server's data roots",
                    reason="PATH_OUTSIDE_DATA_ROOTS",
                    field=field,
                )
            try:
                file_stat = os.stat(real)
            except OSError as error:
                raise _os_error(error, real, field) from error
            if stat.S_ISREG(file_stat.st_mode):
                entries.append((real, relative, file_stat.st_size, _etag(file_stat)))
    entries.sort(key=lambda entry: entry[1])
    yield from entries


def stat_entry(path: str, *, field: str) -> tuple[int, str]:
    """(size, etag) of the regular file at the resolved `path`."""
    file_status = regular_file(path, field=field)
    return file_status.st_size, _etag(file_status)


def write_file_atomically(path: str, data: bytes, *, roots: Sequence[str], field: str) -> None:
    """Write `data` to the resolved `path` via a temporary file and a rename; makes missing folders."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise _os_error(error, parent, field) from error
    # The folders may have been raced into symlinks; what we write into must still be inside a root.
    if not any(inside(os.path.realpath(parent), root) for root in roots):
        raise PermissionDenied(
            f"{field} {file_uri(path)} resolves outside the server's data roots",
            reason="PATH_OUTSIDE_DATA_ROOTS",
        )
    if os.path.isdir(path):
        raise InvalidArgument(f"{field} {file_uri(path)} is a folder", reason="NOT_A_FILE", field=field)
    try:
        fd, temporary = tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as error:
        raise _os_error(error, parent, field) from error
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide exports from labeling tools
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise _os_error(error, path, field) from error
