"""What a Parquet column chunk's own page headers declare, read before any page is decoded.

A file's footer counts the values of every column chunk, but the reader does not hold a chunk to
that count: it decodes each page's values as the page's header declares them, until the count is
reached, so a footer that understates the count lets a few kilobytes of run-length-encoded pages
decode gigabytes. Nor does the row count bound a list column, whose rows the repetition levels
make. So the chunk's pages are walked here as the reader walks them - from the first page (the
dictionary page, if any) through the chunk's byte range, each header followed by its
`compressed_page_size` bytes, stopping once the data pages reach the footer's count - and their
declared values and uncompressed sizes are summed. Only the headers are read.

A page header is a Thrift struct in the compact protocol (parquet-format's `PageHeader`): the page
type (1), its uncompressed (2) and compressed (3) sizes, and the value count of its data page (5,
field 1), dictionary page (7, field 1) or version-2 data page (8, field 1) header; every other
field is skipped. As in the reference reader, a header may take at most MAX_HEADER_BYTES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024 * 1024  # the reference reader's bound on one page header
FIRST_READ = 1024  # bytes read for a header before it is known to need more (then 16x, up to the bound)
MAX_NESTING = 32  # structs, lists and maps inside one another in a header
CHECK_EVERY = 1024  # pages walked between two calls of the caller's check (a cancel or a drain)

DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
# Compact protocol field types
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
_HEADER_VALUES_FIELD = {5: DATA_PAGE, 7: DICTIONARY_PAGE, 8: DATA_PAGE_V2}  # field id -> page type


class PageHeaderError(ValueError):
    """A page header that cannot be read: truncated, malformed or past MAX_HEADER_BYTES."""


class _Truncated(Exception):
    """The bytes read so far end inside the header."""


@dataclass(frozen=True)
class ChunkPages:
    """What a column chunk's pages declare."""

    values: int  # level entries of its data pages: values, nulls and empty lists alike
    uncompressed_bytes: int  # every page's uncompressed size, the dictionary page's included
    pages: int


class _Cursor:
    """Compact-protocol reads over bytes; running past their end raises _Truncated."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def byte(self) -> int:
        if self.position >= len(self.data):
            raise _Truncated
        value = self.data[self.position]
        self.position += 1
        return value

    def skip(self, count: int) -> None:
        if count < 0:
            raise PageHeaderError("a negative length")
        if self.position + count > len(self.data):
            raise _Truncated
        self.position += count

    def varint(self) -> int:
        result = shift = 0
        while True:
            value = self.byte()
            result |= (value & 0x7F) << shift
            if not value & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise PageHeaderError("a varint longer than 10 bytes")

    def integer(self) -> int:
        """A zigzag varint (i16, i32 or i64)."""
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def skip_value(self, kind: int, depth: int) -> None:
        if depth > MAX_NESTING:
            raise PageHeaderError(f"values nested more than {MAX_NESTING} deep")
        if kind in (_TRUE, _FALSE):
            return
        if kind == _BYTE:
            self.skip(1)
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.skip(8)
        elif kind == _BINARY:
            self.skip(self.varint())
        elif kind in (_LIST, _SET):
            header = self.byte()
            size = header >> 4 if header >> 4 != 15 else self.varint()
            element = header & 0x0F
            for _ in range(size):
                self.skip_value(_BYTE if element in (_TRUE, _FALSE) else element, depth + 1)
        elif kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.skip_value(types >> 4, depth + 1)
                    self.skip_value(types & 0x0F, depth + 1)
        elif kind == _STRUCT:
            for field, field_kind in self.fields():
                del field
                self.skip_value(field_kind, depth + 1)
        else:
            raise PageHeaderError(f"unknown field type {kind}")

    def fields(self) -> _Fields:
        return _Fields(self)


class _Fields:
    """(field id, type) of each field of a struct, up to its stop byte; the caller reads or skips
    each value before asking for the next field."""

    def __init__(self, cursor: _Cursor) -> None:
        self.cursor = cursor
        self.last = 0

    def __iter__(self) -> _Fields:
        return self

    def __next__(self) -> tuple[int, int]:
        header = self.cursor.byte()
        if header == 0:
            raise StopIteration
        delta, kind = header >> 4, header & 0x0F
        self.last = self.last + delta if delta else self.cursor.integer()
        return self.last, kind


@dataclass(frozen=True)
class PageHeader:
    page_type: int
    uncompressed_size: int
    compressed_size: int
    values: int  # the value count of its data, dictionary or version-2 data page header; 0 if none
    length: int  # bytes of the header itself


def _first_field(cursor: _Cursor, depth: int) -> int:
    """Field 1 (an integer) of the struct at the cursor, the rest skipped; 0 without one."""
    found = 0
    for field, kind in cursor.fields():
        if field == 1 and kind in (_I16, _I32, _I64):
            found = cursor.integer()
        else:
            cursor.skip_value(kind, depth + 1)
    return found


def parse_page_header(data: bytes) -> PageHeader:
    """The page header at the start of `data`; _Truncated when `data` ends inside it."""
    cursor = _Cursor(data)
    sizes = {1: -1, 2: -1, 3: -1}
    values = 0
    for field, kind in cursor.fields():
        if field in sizes and kind == _I32:
            sizes[field] = cursor.integer()
        elif field in _HEADER_VALUES_FIELD and kind == _STRUCT:
            values = _first_field(cursor, 1)
        else:
            cursor.skip_value(kind, 1)
    if min(sizes.values()) < 0 or values < 0:
        raise PageHeaderError("a page type, a size or a value count is missing or negative")
    return PageHeader(sizes[1], sizes[2], sizes[3], values, cursor.position)


def read_page_header(read_at: Callable[[int, int], bytes], offset: int, end: int) -> PageHeader:
    """The header at `offset`, reading no further than `end` nor past MAX_HEADER_BYTES."""
    size = FIRST_READ
    while True:
        available = min(size, end - offset, MAX_HEADER_BYTES)
        try:
            return parse_page_header(read_at(offset, available))
        except _Truncated:
            if available >= min(end - offset, MAX_HEADER_BYTES):
                raise PageHeaderError(
                    f"the page header at byte {offset} runs past "
                    + ("its column chunk" if end - offset < MAX_HEADER_BYTES else f"{MAX_HEADER_BYTES} bytes")
                ) from None
            size *= 16


def chunk_pages(
    read_at: Callable[[int, int], bytes],
    start: int,
    length: int,
    footer_values: int,
    check: Callable[[], None],
) -> ChunkPages:
    """The pages the reader decodes from the column chunk of `length` bytes at `start` whose footer
    counts `footer_values` values (see the module docstring). `read_at(offset, size)` returns the
    file's bytes there (fewer at its end); `check` is called every CHECK_EVERY pages."""
    end = start + length
    offset, values, uncompressed, pages = start, 0, 0, 0
    while offset < end and not (pages and values >= footer_values):
        header = read_page_header(read_at, offset, end)
        if header.page_type in (DATA_PAGE, DATA_PAGE_V2):
            values += header.values
        uncompressed += header.uncompressed_size
        pages += 1
        offset += header.length + header.compressed_size
        if pages % CHECK_EVERY == 0:
            check()
    return ChunkPages(values, uncompressed, pages)
