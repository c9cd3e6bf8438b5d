"""Batch records (batch.py): what a record applies, and every malformed record refused
with EINVAL before it changes a byte."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError
from repdisk.replication.batch import MAGIC, MAILBOX, BatchView, decode, encode

SIZE = 1 << 20


@pytest.fixture
def view(tmp_path: Path) -> Iterator[BatchView]:
    img = RawImage.create(tmp_path / "disk.img", SIZE)
    yield BatchView(img)
    img.close()


def read(view: BatchView, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    view.pread_into(memoryview(buf), offset)
    return bytes(buf)


def test_record_round_trip_keeps_order_and_bytes() -> None:
    pieces = [(8192, b"a" * 4096), (0, b"bc"), (8192, b"d" * 10)]
    record = encode(pieces)
    assert len(record) == 4108 + 3 * 16 + 16  # data, one entry per piece, the trailer
    assert record.endswith(MAGIC)
    assert [(off, bytes(data)) for off, data in decode(memoryview(record))] == pieces


def test_view_is_the_disk_plus_a_mailbox(view: BatchView) -> None:
    assert view.size == SIZE + MAILBOX
    view.pwrite(b"plain", 100)
    assert read(view, 100, 5) == b"plain"


def test_record_in_the_mailbox_writes_its_pieces_in_order(view: BatchView) -> None:
    """A later piece overwrites an earlier one of the same bytes (record order)."""
    view.pwrite(encode([(4096, b"\x11" * 8192), (0, b"\x22" * 3), (8192, b"\x33" * 100)]),
                SIZE)
    assert read(view, 0, 4) == b"\x22\x22\x22\x00"
    assert read(view, 4096, 8192) == b"\x11" * 4096 + b"\x33" * 100 + b"\x11" * 3996


def _assert_refused(view: BatchView, record: bytes, message: str,
                    err: int = errno.EINVAL) -> None:
    before = read(view, 0, 65536)
    with pytest.raises(BlockIOError) as info:
        view.pwrite(record, SIZE)
    assert info.value.errno == err
    assert message in str(info.value)
    assert read(view, 0, 65536) == before


def _trailer(count: int, magic: bytes = MAGIC) -> bytes:
    return struct.pack("<I4x8s", count, magic)


@pytest.mark.parametrize("record, message", [
    (b"short", "5 bytes is shorter than the trailer"),
    (b"x" * 4 + _trailer(1, b"NOTBATCH"), "magic b'NOTBATCH' is not b'RDBATCH1'"),
    (_trailer(0), "0 pieces do not fit in 16 bytes"),
    (_trailer(2), "2 pieces do not fit in 16 bytes"),
    (b"abc" + struct.pack("<QQ", 0, 0) + _trailer(1), "piece 0 (0 bytes at 0) runs past"),
    (b"abc" + struct.pack("<QQ", 0, 4) + _trailer(1), "piece 0 (4 bytes at 0) runs past the "
                                                      "3 data bytes"),
    (b"abcd" + struct.pack("<QQ", 0, 3) + _trailer(1), "the pieces hold 3 bytes but the "
                                                       "record has 4 data bytes"),
])
def test_malformed_record_is_refused_and_changes_nothing(view: BatchView, record: bytes,
                                                         message: str) -> None:
    view.pwrite(b"\x01" * 65536, 0)
    _assert_refused(view, record, message)


def test_record_with_a_piece_past_the_disk_changes_nothing(view: BatchView) -> None:
    """The first piece is fine, the second is not: neither is written."""
    record = encode([(0, b"\x99" * 4096), (SIZE - 2, b"xyz")])
    _assert_refused(view, record, f"request [{SIZE - 2}, {SIZE + 1}) is past the end",
                    errno.ENOSPC)


def test_requests_other_than_records_stay_inside_the_disk(view: BatchView) -> None:
    with pytest.raises(BlockIOError, match=r"past the end of the 1048576-byte disk"):
        view.pwrite(b"ab", SIZE - 1)  # crosses into the mailbox
    for call in (lambda: view.pread_into(memoryview(bytearray(4)), SIZE),
                 lambda: view.zero(SIZE, 4096), lambda: view.trim(SIZE, 4096),
                 lambda: view.extents(SIZE, 4096)):
        with pytest.raises(BlockIOError, match="past the end"):
            call()


def test_a_checked_record_is_handed_whole_to_write_pieces(tmp_path: Path) -> None:
    """write_pieces gets every piece of a checked record, in order, with the request's
    FUA, and nothing of a record that is refused."""
    seen: list[tuple[list[tuple[int, bytes]], bool]] = []
    with RawImage.create(tmp_path / "disk.img", SIZE) as img:
        view = BatchView(img, lambda pieces, fua: seen.append(
            ([(o, bytes(b)) for o, b in pieces], fua)))
        view.pwrite(encode([(4096, b"x" * 4096), (0, b"y" * 10)]), SIZE, fua=True)
        assert seen == [([(4096, b"x" * 4096), (0, b"y" * 10)], True)]
        assert read(view, 0, 8192) == bytes(8192)  # written by write_pieces alone
        with pytest.raises(BlockIOError):
            view.pwrite(encode([(0, b"z"), (SIZE, b"past the disk")]), SIZE)
        assert len(seen) == 1
