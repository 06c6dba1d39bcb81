"""Reading arrays out of a NumPy `.npz` archive without trusting it.

Each member's `.npy` header is read first, so its shape and dtype can be checked against the limits
before any data is loaded or inflated, and object (pickled) arrays are refused outright. Arrays are
read into memory the server owns, chunk by chunk: a local file is never memory-mapped, because a
mapped file rewritten or truncated by its owner while a job trains would change the data under
the job or kill the process (SIGBUS). A downloaded archive is already owned memory, so stored
members are viewed in place there. Every chunk is reported to the job's `ReadMonitor`, which also
stops the read when the job is cancelled.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import IO, Any, cast

import numpy as np
from numpy.lib import format as npy_format

from o2u_server.datasets.dataset import Allocate
from o2u_server.errors import InvalidArgument
from o2u_server.storage import ReadMonitor
from o2u_server.text import shown

__all__ = ["NpzArchive", "NpzMember"]

_CHUNK = 4 * 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
# What NumPy's .npy reader and zipfile raise on a truncated, corrupt or unsupported member.
_READ_ERRORS = (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile)


@dataclass(frozen=True)
class NpzMember:
    """Header of one array in the archive."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    stored_bytes: int  # inflated member size declared by the zip directory
    data_offset: int | None  # offset of the raw array data in the archive, if stored uncompressed

    @property
    def nbytes(self) -> int:
        """What loading the array allocates, from its header."""
        return prod(self.shape) * self.dtype.itemsize


def _read_npy_header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = npy_format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(member)
    elif version in ((2, 0), (3, 0)):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(member)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), fortran_order, dtype


class NpzArchive:
    """An opened `.npz`: a local file's handle or a downloaded buffer; use as a context manager.

    The archive closes a handle it was given when it closes."""

    def __init__(
        self, source: io.BufferedIOBase | bytearray, *, uri: str, field: str, reads: ReadMonitor | None = None
    ) -> None:
        self.uri = uri
        self.field = field
        self._buffer = source if isinstance(source, bytearray) else None
        self._reads = reads or ReadMonitor()
        self._handle: io.BufferedIOBase = io.BytesIO(source) if isinstance(source, bytearray) else source
        try:
            self._zip = zipfile.ZipFile(self._handle)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            self._handle.close()
            raise self._invalid(f"is not a valid .npz (zip) archive: {error}") from error
        self.members: dict[str, NpzMember] = {}
        try:
            for info in self._zip.infolist():
                if info.filename.endswith(".npy"):
                    name = info.filename.removesuffix(".npy")
                    self.members[name] = self._read_header(info, name)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._handle.close()

    def _invalid(self, message: str) -> InvalidArgument:
        return InvalidArgument(
            f"{self.field} {shown(self.uri)} {message}", reason="INVALID_DATASET", field=self.field
        )

    def _read_header(self, info: zipfile.ZipInfo, name: str) -> NpzMember:
        try:
            with self._zip.open(info) as member:
                shape, fortran_order, dtype = _read_npy_header(member)
                header_length = member.tell()
        except _READ_ERRORS as error:
            raise self._invalid(
                f"member {shown(info.filename, 80)!r} is not a valid .npy array: {error}"
            ) from error
        if dtype.hasobject:
            raise self._invalid(
                f"array {shown(name, 80)!r} holds Python objects (dtype {dtype}); object arrays are refused "
                "because loading them would run pickle: save numbers or fixed-width strings"
            )
        data_offset = None
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            self._handle.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(self._handle.read(_LOCAL_HEADER.size))
            if fields[0] == _LOCAL_SIGNATURE:
                # The local header's name and extra lengths can differ from the central directory's.
                data_offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10] + header_length
        member_header = NpzMember(name, shape, dtype, fortran_order, info.file_size, data_offset)
        if member_header.nbytes + header_length > info.file_size:
            raise self._invalid(
                f"array {shown(name, 80)!r} is truncated: its header declares {member_header.nbytes} bytes"
            )
        return member_header

    def load(self, name: str, allocate: Allocate = np.empty) -> np.ndarray[Any, Any]:
        """The array `name`, read into an array from `allocate` (a member stored uncompressed in a
        downloaded buffer: a view of that buffer); call only after its header passed the limits."""
        member = self.members[name]
        if member.nbytes == 0:
            return np.empty(member.shape, dtype=member.dtype, order="F" if member.fortran_order else "C")
        if member.data_offset is not None and self._buffer is not None:
            flat = np.frombuffer(
                self._buffer, dtype=member.dtype, count=prod(member.shape), offset=member.data_offset
            )
            self._reads.check()  # the download already counted these bytes
            viewed: np.ndarray[Any, Any] = flat.reshape(
                member.shape, order="F" if member.fortran_order else "C"
            )
            return viewed
        # A Fortran-ordered member is the transpose of the C-ordered array of the reversed shape.
        memory = allocate(member.shape[::-1] if member.fortran_order else member.shape, member.dtype)
        try:
            if member.data_offset is not None:
                self._handle.seek(member.data_offset)
                self._fill(member, memory, self._handle.readinto)
            else:
                with self._zip.open(name + ".npy") as stream:
                    _read_npy_header(stream)  # inflated member: skip to the data
                    self._fill(member, memory, cast(io.BufferedIOBase, stream).readinto)
        except _READ_ERRORS as error:
            raise self._invalid(f"array {shown(name, 80)!r} could not be read: {error}") from error
        return memory.T if member.fortran_order else memory

    def _fill(
        self, member: NpzMember, memory: np.ndarray[Any, Any], read_into: Callable[[Any], int | None]
    ) -> None:
        """Fill `memory` (C-ordered, `member`'s bytes) chunk by chunk from `read_into`."""
        buffer = memory.reshape(-1).view(np.uint8).data
        position = 0
        while position < len(buffer):
            count = read_into(buffer[position : position + _CHUNK])
            if not count:
                raise self._invalid(
                    f"array {shown(member.name, 80)!r} ended after {position} of {len(buffer)} bytes "
                    "(was the file truncated or rewritten while it was read?)"
                )
            position += count
            self._reads.add(count)
