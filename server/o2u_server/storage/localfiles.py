"""Reading, listing and writing files under the data roots (and the export folders).

Paths reach here already resolved and checked by `storage.uris`; this module re-checks what it
actually opened (through /proc/self/fd where the platform has it) so a symlink swapped in between the
check and the open still cannot lead outside the roots. Every open is non-blocking and anything but
a regular file (a FIFO, a device, a socket swapped in after the listing) is refused before a byte is
read, so no open or read can wait forever. Writes never replace an existing file: the data is
written to a temporary file and hard-linked to its name, which fails if the name exists. OS errors
become the service's error classes; messages name the URI the caller sent, never a resolved path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from io import BufferedReader
from typing import BinaryIO

from o2u_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from o2u_server.storage.uris import inside
from o2u_server.text import shown

__all__ = [
    "LocalEntry",
    "create_file",
    "iter_files",
    "open_regular",
    "os_error",
    "read_file",
    "regular_file",
    "stat_entry",
]

_CHUNK = 1024 * 1024
_PROC_FD = "/proc/self/fd"

LocalEntry = tuple[str, str, int, str]  # (resolved path, '/'-separated relative key, size, etag)


def _etag(file_status: os.stat_result) -> str:
    # Changes whenever the file is rewritten, like an object store's ETag does.
    return f"{file_status.st_mtime_ns:x}-{file_status.st_size:x}"


def os_error(error: OSError, uri: str, field: str) -> ServiceError:
    """The service error for an OS error on the file the caller named `uri`."""
    named = shown(uri)
    number = error.errno
    if isinstance(error, FileNotFoundError):
        return NotFound(
            f"{named} does not exist", reason="OBJECT_NOT_FOUND", resource_type="object", resource_name=named
        )
    if isinstance(error, PermissionError):
        return PermissionDenied(
            f"the server process may not access {named}: {error.strerror}",
            reason="FILE_NOT_READABLE",
            field=field,
        )
    if number == errno.ENAMETOOLONG:
        return InvalidArgument(
            f"{field} {named}: a file name is longer than the file system allows (255 bytes per name)",
            reason="NAME_TOO_LONG",
            field=field,
        )
    if number in (errno.ENOTDIR, errno.EEXIST):
        return InvalidArgument(
            f"{field} {named}: a folder on the way is a file", reason="NOT_A_FOLDER", field=field
        )
    if number == errno.EISDIR:
        return InvalidArgument(f"{field} {named} is a folder", reason="NOT_A_FILE", field=field)
    if number == errno.ELOOP:
        return PermissionDenied(f"{field} {named} changed into a symlink", reason="SYMLINK", field=field)
    if number in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left on the volume of {named}", reason="NO_SPACE_LEFT")
    if number == errno.EROFS:
        return FailedPrecondition(f"{named} is on a read-only volume", reason="READ_ONLY_VOLUME")
    return Unavailable(f"could not access {named}: {error.strerror or error}", reason="FILE_IO_ERROR")


def _not_regular(uri: str, field: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field} {shown(uri)} is not a regular file (a folder, FIFO, device or socket)",
        reason="NOT_A_FILE",
        field=field,
    )


def regular_file(path: str, *, uri: str, field: str) -> os.stat_result:
    """stat() of a regular file, or the service error saying why `path` is not one."""
    try:
        file_status = os.stat(path)
    except OSError as error:
        raise os_error(error, uri, field) from error
    if not stat.S_ISREG(file_status.st_mode):
        raise _not_regular(uri, field)
    return file_status


def open_regular(path: str, *, uri: str, roots: Sequence[str], field: str) -> BufferedReader:
    """The regular file at the resolved `path`, opened for reading; anything else is refused unread.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise os_error(error, uri, field) from error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_regular(uri, field)
        _check_opened(fd, roots=roots, uri=uri, field=field)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(
    path: str,
    *,
    uri: str,
    roots: Sequence[str],
    field: str,
    max_bytes: int | None = None,
    on_chunk: Callable[[int], None] = lambda size: None,
) -> bytearray:
    """All bytes of the file at the resolved `path`; ResourceExhausted past `max_bytes`.

    `on_chunk` sees the size of every chunk read (and may raise to stop)."""
    with open_regular(path, uri=uri, roots=roots, field=field) as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise _too_large(uri, max_bytes)
        data = bytearray()
        try:
            while chunk := handle.read(_CHUNK):
                data += chunk
                if max_bytes is not None and len(data) > max_bytes:
                    raise _too_large(uri, max_bytes)
                on_chunk(len(chunk))
        except OSError as error:
            raise os_error(error, uri, field) from error
    return data


def _too_large(uri: str, max_bytes: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"{shown(uri)} is larger than the {max_bytes} bytes left under max_dataset_bytes "
        "(O2U_MAX_DATASET_BYTES)",
        reason="DATASET_TOO_LARGE",
        metadata={"limit": "max_dataset_bytes"},
    )


def _check_opened(fd: int, *, roots: Sequence[str], uri: str, field: str) -> None:
    try:
        opened = os.readlink(f"{_PROC_FD}/{fd}")
    except OSError:
        return  # no /proc: the resolved-path check done by the caller is what we have
    if not any(inside(opened, root) for root in roots):
        raise PermissionDenied(
            f"{field} {shown(uri)} resolves outside the server's data roots",
            reason="PATH_OUTSIDE_DATA_ROOTS",
        )


def _utf8_name(relative: str, uri: str, field: str) -> str:
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{field} {shown(uri)}: the file name {shown(relative, 80)!r} is not valid UTF-8; rename it",
            reason="INVALID_FILE_NAME",
            field=field,
        ) from None
    return relative


def _children(directory: str, fail: Callable[[OSError], None]) -> list[os.DirEntry[str]]:
    """The entries of `directory` that are not hidden, in the order their relative keys sort: a
    folder by its name + "/", so visiting folders depth first yields every key below in the order of
    the keys as whole strings (a folder "a" comes after "a-b", as "a/x" sorts after "a-b/x")."""
    try:
        with os.scandir(directory) as listing:
            entries = [entry for entry in listing if not entry.name.startswith(".")]
    except OSError as error:
        fail(error)
        return []
    entries.sort(key=lambda entry: entry.name + "/" if _is_folder(entry) else entry.name)
    return entries


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """A folder to descend into: a real one, not a symlink to one."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _linked_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink() and entry.is_dir()
    except OSError:
        return False


def iter_files(
    folder: str, *, uri: str, roots: Sequence[str], field: str, on_entry: Callable[[], None] = lambda: None
) -> Iterator[LocalEntry]:
    """Regular files below the resolved `folder`, in the order of their relative keys; hidden names
    are skipped. Lazy: a folder's entries are listed when the walk reaches it, so a caller that
    needs the first file (or stops at a limit) never walks the rest of a large tree.

    Symlinked folders are not descended into; a symlinked file counts if it resolves inside a root,
    and one that resolves outside raises PermissionDenied naming it. `on_entry` is called for every
    file seen (and may raise to stop the listing).
    """
    try:
        file_status = os.stat(folder)
    except OSError as error:
        raise os_error(error, uri, field) from error
    if not stat.S_ISDIR(file_status.st_mode):
        raise InvalidArgument(f"{field} {shown(uri)} is not a folder", reason="NOT_A_FOLDER", field=field)

    def fail(error: OSError) -> None:
        raise os_error(error, uri, field)

    stack: list[tuple[Iterator[os.DirEntry[str]], str]] = [(iter(_children(folder, fail)), "")]
    while stack:
        entries, prefix = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if _is_folder(entry):
            stack.append((iter(_children(entry.path, fail)), f"{prefix}{entry.name}/"))
            continue
        if _linked_folder(entry):
            continue
        on_entry()
        relative = _utf8_name(prefix + entry.name, uri, field)
        real = os.path.realpath(entry.path)
        if not any(inside(real, root) for root in roots):
            raise PermissionDenied(
                f"{field}: {shown(relative, 80)!r} in {shown(uri)} links outside the server's data roots",
                reason="PATH_OUTSIDE_DATA_ROOTS",
                field=field,
            )
        try:
            file_stat = os.stat(real)
        except OSError as error:
            raise os_error(error, f"{uri.rstrip('/')}/{relative}", field) from error
        if stat.S_ISREG(file_stat.st_mode):
            yield real, relative, file_stat.st_size, _etag(file_stat)


def stat_entry(path: str, *, uri: str, field: str) -> tuple[int, str]:
    """(size, etag) of the regular file at the resolved `path`."""
    file_status = regular_file(path, uri=uri, field=field)
    return file_status.st_size, _etag(file_status)


def create_file(
    path: str, data: bytes | Callable[[BinaryIO], None], *, uri: str, roots: Sequence[str], field: str
) -> int:
    """Write `data` (bytes, or a function writing them into the file) to a new file at the resolved
    `path`, making missing folders; AlreadyExists if anything is already there. The file appears
    complete or not at all. Returns its size."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise os_error(error, uri, field) from error
    # The folders may have been raced into symlinks; what we write into must still be inside a root.
    if not any(inside(os.path.realpath(parent), root) for root in roots):
        raise PermissionDenied(
            f"{field} {shown(uri)} resolves outside the server's export locations",
            reason="PATH_OUTSIDE_EXPORT_LOCATIONS",
        )
    try:
        fd, temporary = tempfile.mkstemp(dir=parent, prefix=".o2u-export.", suffix=".tmp")
    except OSError as error:
        raise os_error(error, uri, field) from error
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            size = handle.tell()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide exports from labeling tools
        os.link(temporary, path)  # unlike a rename, never replaces what is there
    except FileExistsError:
        raise AlreadyExists(
            f"{field} {shown(uri)} already exists; exports never replace a file: choose a new name",
            reason="DESTINATION_EXISTS",
            field=field,
        ) from None
    except OSError as error:
        raise os_error(error, uri, field) from error
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return size
