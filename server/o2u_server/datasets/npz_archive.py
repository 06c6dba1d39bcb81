"""Reading arrays out of a NumPy `.npz` archive without trusting it.

Each member's `.npy` header is read first, so its shape and dtype can be checked against the limits
before any data is loaded, and object (pickled) arrays are refused outright. Members stored without
compression are not copied: they are memory-mapped from a local file (copy-on-write, so the result
is writable) or viewed in place in a downloaded buffer. Compressed members are inflated only after
their declared size has passed the byte limit, which also stops zip bombs.
"""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from numpy.lib import format as npy_format

from o2u_server.errors import InvalidArgument

__all__ = ["NpzArchive", "NpzMember"]

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
        return prod(self.shape) * self.dtype.itemsize


class NpzArchive:
    """An opened `.npz`: a local path (memory-mapped) or a downloaded buffer; use as a context manager."""

    def __init__(self, source: Path | bytearray, *, uri: str, field: str) -> None:
        self.uri = uri
        self.field = field
        self._source = source
        self._handle: BinaryIO = open(source, "rb") if isinstance(source, Path) else io.BytesIO(source)  # noqa: SIM115
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
            f"{self.field} {self.uri} {message}", reason="INVALID_DATASET", field=self.field
        )

    def _read_header(self, info: zipfile.ZipInfo, name: str) -> NpzMember:
        try:
            with self._zip.open(info) as member:
                version = npy_format.read_magic(member)
                if version == (1, 0):
                    shape, fortran_order, dtype = npy_format.read_array_header_1_0(member)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran_order, dtype = npy_format.read_array_header_2_0(member)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                header_length = member.tell()
        except _READ_ERRORS as error:
            raise self._invalid(f"member {info.filename!r} is not a valid .npy array: {error}") from error
        if dtype.hasobject:
            raise self._invalid(
                f"array {name!r} holds Python objects (dtype {dtype}); object arrays are refused because "
                "loading them would run pickle: save numbers or fixed-width strings"
            )
        data_offset = None
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            self._handle.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(self._handle.read(_LOCAL_HEADER.size))
            if fields[0] == _LOCAL_SIGNATURE:
                # The local header's name and extra lengths can differ from the central directory's.
                data_offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10] + header_length
        member_header = NpzMember(name, tuple(shape), dtype, fortran_order, info.file_size, data_offset)
        if member_header.nbytes + header_length > info.file_size:
            raise self._invalid(
                f"array {name!r} is truncated: its header declares {member_header.nbytes} bytes"
            )
        return member_header

    def load(self, name: str) -> np.ndarray[Any, Any]:
        """The array `name`, mapped or viewed in place when stored, else inflated (after header checks)."""
        member = self.members[name]
        order: Literal["C", "F"] = "F" if member.fortran_order else "C"
        if member.data_offset is not None and member.nbytes > 0:
            if isinstance(self._source, Path):
                mapped = np.memmap(
                    self._source,
                    dtype=member.dtype,
                    mode="c",
                    offset=member.data_offset,
                    shape=member.shape,
                    order=order,
                )
                return np.asarray(mapped)
            flat = np.frombuffer(
                self._source, dtype=member.dtype, count=prod(member.shape), offset=member.data_offset
            )
            viewed: np.ndarray[Any, Any] = flat.reshape(member.shape, order=order)
            return viewed
        try:
            with self._zip.open(name + ".npy") as handle:
                array: np.ndarray[Any, Any] = npy_format.read_array(handle, allow_pickle=False)
        except _READ_ERRORS as error:
            raise self._invalid(f"array {name!r} could not be read: {error}") from error
        return array
