"""Batched replica writes: many small pieces of the disk in one NBD write.

Why.  An async primary sends the secondary scattered 4 KiB pieces.  One NBD request
per piece costs, on each side, a request's worth of nbdkit and Python machinery and a
send or receive per piece, and that, not the bytes, bounds how fast the secondary
keeps up.  A batch carries many pieces in one request and is
applied on the secondary as the same pieces written one by one, in order.

Where.  NBD has no vectored write, so the secondary serves, next to each
``replica/NAME`` export, ``replica/NAME+batch``: the same disk, the same writer
sessions (sessions.py), plus a mailbox of ``MAILBOX`` bytes past the disk's end.
Every request inside the disk is the replica's own; a write into the mailbox is a
batch record.  The primary learns the disk's size as the export's size minus
``MAILBOX``.

Record (little-endian): the pieces' bytes back to back, then one ``<QQ`` (offset,
length) per piece in the same order, then the trailer ``<I4x8s`` (piece count,
``MAGIC``).  The table is at the end so that the record is built by appending.
Pieces are applied in record order: a later piece may overwrite an earlier one.

Sending side.  The forwarder makes a record when it sends (never while queuing): the
small writes at the head of its queue that may all go now (:func:`groupable` ones, up
to ``BATCH_PIECES`` and ``BATCH_BYTES``) become one ticket (:func:`record_ticket`)
whose acknowledgement settles every write it carries.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence

from repdisk.block.device import BlockDevice, Buffer, Extent
from repdisk.errors import BlockIOError, check_range
from repdisk.replication.ticket import WRITE, Ticket, TicketOwner

#: Bytes past the disk's end where records are written (one record fits).
MAILBOX = 64 << 20
#: What ``replica/NAME`` becomes when batching (before any session tag).
EXPORT_SUFFIX = "+batch"
MAGIC = b"RDBATCH1"
#: Small writes go in records of at most this many writes and bytes; a write of
#: BATCH_PIECE_MAX bytes or more goes alone (a record would only copy it).
BATCH_PIECES = 64
BATCH_BYTES = 256 << 10
BATCH_PIECE_MAX = 64 << 10
#: Records in flight at once: each new one is checked for overlap against each of them.
BATCHES_IN_FLIGHT = 4

_ENTRY = struct.Struct("<QQ")
_TRAILER = struct.Struct("<I4x8s")

Piece = tuple[int, bytes | bytearray | memoryview]


def encode(pieces: Sequence[Piece]) -> bytes:
    """One record of ``pieces`` (offset, bytes), applied in this order."""
    table = b"".join(_ENTRY.pack(off, len(buf)) for off, buf in pieces)
    return b"".join([*(buf for _, buf in pieces), table,
                     _TRAILER.pack(len(pieces), MAGIC)])


def groupable(t: Ticket) -> bool:
    """A queued write that may share a record: small, without FUA."""
    return t.kind is WRITE and not t.fua and t.length < BATCH_PIECE_MAX


def record_ticket(owner: TicketOwner, members: list[Ticket]) -> Ticket:
    """One record carrying ``members`` (queued writes, in order), as a ticket placed
    where the first of them was: its ``parts`` are their ranges, sorted."""
    record = encode([(m.offset, m.buf) for m in members])
    parts = sorted((m.offset, m.length) for m in members)
    g = Ticket(owner, WRITE, parts[0][0], sum(m.length for m in members), record)
    g.parts, g.members = parts, members
    g.seq, g.t0 = members[0].seq, min(m.t0 for m in members)
    g.pulled = all(m.pulled for m in members)
    return g


def decode(record: memoryview) -> list[tuple[int, memoryview]]:
    """The pieces of ``record`` as (offset, view into the record); EINVAL naming what is
    wrong with a record that is not one."""
    size = record.nbytes
    if size < _TRAILER.size:
        raise _bad(f"{size} bytes is shorter than the trailer")
    count, magic = _TRAILER.unpack_from(record, size - _TRAILER.size)
    if magic != MAGIC:
        raise _bad(f"magic {bytes(magic)!r} is not {MAGIC!r}")
    table_at = size - _TRAILER.size - _ENTRY.size * count
    if count < 1 or table_at < 0:
        raise _bad(f"{count} pieces do not fit in {size} bytes")
    pieces: list[tuple[int, memoryview]] = []
    at = 0
    for offset, length in _ENTRY.iter_unpack(record[table_at:size - _TRAILER.size]):
        if length < 1 or at + length > table_at:
            raise _bad(f"piece {len(pieces)} ({length} bytes at {offset}) runs past the "
                       f"{table_at} data bytes")
        pieces.append((offset, record[at:at + length]))
        at += length
    if at != table_at:
        raise _bad(f"the pieces hold {at} bytes but the record has {table_at} data bytes")
    return pieces


def _bad(what: str) -> BlockIOError:
    return BlockIOError(errno.EINVAL, f"not a repdisk batch record: {what}")


class BatchView:
    """A replica view with a mailbox: requests inside the disk pass through to ``inner``,
    a write into the mailbox is a record whose pieces are written to ``inner`` in order.

    Wrapped by the session view like ``inner`` would be, so a record is one write of its
    session: a newer session is admitted before or after it, never in the middle.
    ``write_pieces``, if given, writes a checked record's pieces (``(offset, bytes)``, in
    order, and the request's FUA) as ``inner.pwrite`` of each in turn would
    (``SecondaryReplica.write_record``: one lock and one copy-before-write pass per record).
    """

    def __init__(self, inner: BlockDevice,
                 write_pieces: Callable[[list[tuple[int, memoryview]], bool], None] | None
                 = None) -> None:
        self._inner = inner
        self._write_pieces = write_pieces
        self._disk_size = inner.size
        self.size = inner.size + MAILBOX

    def _in_disk(self, offset: int, length: int, write: bool) -> None:
        check_range(self._disk_size, offset, length, write)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._in_disk(offset, len(buf), False)
        self._inner.pread_into(buf, offset)

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        if offset < self._disk_size:
            self._in_disk(offset, len(buf), True)
            self._inner.pwrite(buf, offset, fua)
            return
        pieces = decode(memoryview(buf).cast("B"))
        for piece_offset, data in pieces:  # all checked first: a bad record changes nothing
            self._in_disk(piece_offset, data.nbytes, True)
        if self._write_pieces is not None:
            self._write_pieces(pieces, fua)
            return
        for piece_offset, data in pieces:
            self._inner.pwrite(data, piece_offset, fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._in_disk(offset, length, True)
        self._inner.zero(offset, length, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._in_disk(offset, length, True)
        self._inner.trim(offset, length, fua)

    def flush(self) -> None:
        self._inner.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._in_disk(offset, length, False)
        return self._inner.extents(offset, length)
