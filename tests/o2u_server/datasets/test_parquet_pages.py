"""Page headers of real Parquet files, as pyarrow writes them, and hand-made ones."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from o2u_server.datasets.parquet_pages import (
    DATA_PAGE,
    MAX_HEADER_BYTES,
    PageHeaderError,
    chunk_pages,
    parse_page_header,
    read_page_header,
)


def _written(table: pa.Table, **options: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def _reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, size: data[offset : offset + size]


def _table(rows: int) -> pa.Table:
    generator = np.random.default_rng(0)
    flat = pa.array(generator.standard_normal(rows * 6).astype(np.float32))
    return pa.table(
        {
            "label": pa.array(generator.integers(0, 5, rows)),
            "key": pa.array([f"k{i}" for i in range(rows)]),
            "features": pa.ListArray.from_arrays(
                pa.array(np.arange(0, rows * 6 + 1, 6, dtype=np.int32)), flat
            ),
        }
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compression": "none", "use_dictionary": False},
        {"compression": "zstd", "data_page_version": "2.0"},
        {"data_page_size": 512, "write_statistics": True, "row_group_size": 700},
        {"data_page_size": 512, "data_page_version": "2.0", "compression": "snappy"},
    ],
    ids=["defaults", "plain", "v2-zstd", "small-pages", "small-pages-v2"],
)
def test_every_column_chunk_declares_what_its_footer_counts(options: dict[str, object]) -> None:
    data = _written(_table(2_000), **options)
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    many_pages = False
    for group in range(metadata.num_row_groups):
        for index in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(index)
            start = chunk.data_page_offset
            if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < start:
                start = chunk.dictionary_page_offset
            pages = chunk_pages(
                _reader(data), start, chunk.total_compressed_size, chunk.num_values, lambda: None
            )
            assert pages.values == chunk.num_values
            # the footer's uncompressed size counts the page headers too
            assert pages.uncompressed_bytes < chunk.total_uncompressed_size
            assert chunk.total_uncompressed_size - pages.uncompressed_bytes < 100 * pages.pages
            many_pages |= pages.pages > 3
    assert many_pages == ("data_page_size" in options)


def test_the_walk_stops_once_the_footers_count_is_reached_as_the_reader_does() -> None:
    data = _written(_table(2_000), data_page_size=512, use_dictionary=False, compression="none")
    chunk = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(2)
    every = chunk_pages(
        _reader(data), chunk.data_page_offset, chunk.total_compressed_size, chunk.num_values, lambda: None
    )
    first = chunk_pages(_reader(data), chunk.data_page_offset, chunk.total_compressed_size, 1, lambda: None)
    assert every.pages > 10
    assert first.pages == 1
    assert 0 < first.values < every.values


def test_the_check_is_called_every_thousand_pages() -> None:
    data = _written(_table(20_000), data_page_size=1, write_batch_size=64, use_dictionary=False)
    chunk = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(2)
    calls: list[int] = []
    pages = chunk_pages(
        _reader(data),
        chunk.data_page_offset,
        chunk.total_compressed_size,
        chunk.num_values,
        lambda: calls.append(1),
    )
    assert pages.pages >= 1024
    assert len(calls) == pages.pages // 1024


# ---- hand-made headers: the compact protocol's other field types are skipped ------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _zigzag(value: int) -> bytes:
    return _varint((value << 1) ^ (value >> 63))


def _field(delta: int, kind: int, payload: bytes) -> bytes:
    return bytes([(delta << 4) | kind]) + payload


def _header(values: int, field_4: tuple[int, bytes] | None = None) -> bytes:
    """A data page header of `values` values, with an extra field 4 of (type, encoded value)."""
    data_page = _field(1, 5, _zigzag(values)) + _field(1, 5, _zigzag(0)) + b"\x00"
    extra = b"" if field_4 is None else _field(1, *field_4)
    return (
        _field(1, 5, _zigzag(DATA_PAGE))
        + _field(1, 5, _zigzag(4 * values))
        + _field(1, 5, _zigzag(17))
        + extra
        + _field(1 if field_4 else 2, 12, data_page)  # field 5: the data page header
        + b"\x00"
    )


def test_unknown_fields_of_every_type_are_skipped() -> None:
    nested = (
        _field(1, 8, _varint(3) + b"abc")  # binary
        + _field(1, 7, b"\x00" * 8)  # double
        + _field(1, 9, bytes([(2 << 4) | 5]) + _zigzag(1) + _zigzag(2))  # a list of two i32
        + _field(1, 9, bytes([(15 << 4) | 1]) + _varint(20) + b"\x01" * 20)  # a long list of booleans
        + _field(1, 11, _varint(1) + bytes([(8 << 4) | 6]) + _varint(1) + b"k" + _zigzag(-5))  # a map
        + _field(1, 11, _varint(0))  # an empty map
        + _field(1, 1, b"")  # a boolean
        + _field(1, 3, b"\x07")  # a byte
        + _field(0, 4, _zigzag(40) + _zigzag(-3))  # an i16 with its id in the long form
        + b"\x00"
    )
    header = _header(1000, (12, nested))
    parsed = parse_page_header(header + b"page bytes")
    assert (parsed.page_type, parsed.uncompressed_size, parsed.compressed_size) == (DATA_PAGE, 4000, 17)
    assert parsed.values == 1000
    assert parsed.length == len(header)


def test_a_header_cut_short_is_refused_and_a_long_one_read_in_larger_steps() -> None:
    header = _header(5)
    with pytest.raises(PageHeaderError, match="runs past its column chunk"):
        read_page_header(_reader(header), 0, len(header) - 1)
    long_header = _header(5, (8, _varint(3000) + b"x" * 3000))  # a 3,000-byte field 4: past the first read
    assert read_page_header(_reader(long_header), 0, len(long_header)).values == 5
    endless = _header(5, (8, _varint(MAX_HEADER_BYTES)))  # field 4 declares 16 MiB
    with pytest.raises(PageHeaderError, match=f"runs past {MAX_HEADER_BYTES} bytes"):
        read_page_header(lambda offset, size: (endless + bytes(size))[:size], 0, 10 * MAX_HEADER_BYTES)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_field(1, 5, _zigzag(0)) + b"\x00", "missing"),
        (
            _field(1, 5, _zigzag(0)) + _field(1, 5, _zigzag(-4)) + _field(1, 5, _zigzag(1)) + b"\x00",
            "negative",
        ),
        (_field(1, 13, b""), "unknown field type 13"),
        (_field(1, 5, b"\xff" * 11), "longer than 10 bytes"),
        (_field(4, 12, _field(1, 12, b"") * 40), "nested more than"),
    ],
    ids=["missing-size", "negative-size", "unknown-type", "long-varint", "deep-nesting"],
)
def test_malformed_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(PageHeaderError, match=message):
        parse_page_header(data + b"\x00" * 64)
