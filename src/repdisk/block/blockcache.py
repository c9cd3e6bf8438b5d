"""The async write-back's memory of single blocks the guest wrote and nobody has sent yet.

Why: an async write is local plus a dirty bit, and the forwarder reads each dirty piece
back from the disk before sending it.  For scattered 4 KiB writes that read is one system
call per piece, and each one hands the primary's GIL to the guest's thread and back (the
async primary's limit, bench/README.md).  A copy of the block made by the writer, while
it has the GIL anyway, spares both: ``take`` is a dict lookup.

What keeps it true, the primary's side of the bargain (writeback.py, ``WriteBack._write``):

* a block's entry is put only by a write that ran alone (no other change of the disk
  began or was under way from its start to the put), after its local write and before
  its dirty mark: so the entry holds what the disk holds once that write is done;
* every other change of the disk (a write not alone, zero, trim, a write during a
  checkpoint hold, a write that failed) drops the entries it touches before it marks,
  and a later lone write replaces them before it marks.

So a forwarder that clears a block's bit and then takes its entry gets bytes at least as
new as the last mark before the clear; a change under way at that moment marks the block
again, and its bytes are sent again, after these (the same rule as a read of the disk).

An entry nobody takes (its block went out inside a larger piece) stays true by the same
rules until it is taken, dropped or replaced; ``take`` of a larger piece drops the entries
inside it, so they do not pile up.  Dict operations are atomic under the GIL, so the
forwarder's ``take`` needs no lock against writers.
"""

from __future__ import annotations

from collections.abc import Callable

from repdisk.block.dirtymap import DirtyMap

__all__ = ["BLOCK", "BlockCache", "Pieces"]

#: Pieces of the disk to send: (offset, bytes).
Pieces = list[tuple[int, bytes | bytearray]]

#: The one piece size kept: the async dirty map's grain, and a guest's usual random write.
BLOCK = 4096


class BlockCache:
    """At most ``limit`` blocks (offset -> bytes); see the module docstring for the rules."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0  # pieces sent from memory (a statistic, see take)
        self._blocks: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def fits(offset: int, length: int) -> bool:
        """True for a write the cache keeps: one whole, aligned block."""
        return length == BLOCK and not offset % BLOCK

    def put(self, offset: int, data: memoryview) -> None:
        """The block at ``offset`` now holds ``data`` (``fits``); not kept when full (the
        block has no entry then, so none goes stale)."""
        if len(self._blocks) < self.limit or offset in self._blocks:
            self._blocks[offset] = bytes(data)

    def drop(self, offset: int, length: int) -> None:
        """Forget every block that ``[offset, offset + length)`` touches."""
        blocks = self._blocks
        if not blocks:
            return
        first, end = offset - offset % BLOCK, offset + length
        if (end - first) // BLOCK <= len(blocks):
            for block in range(first, end, BLOCK):
                blocks.pop(block, None)
        else:  # a large zero or trim: look at the few entries rather than every block
            for block in [b for b in list(blocks) if first <= b < end]:
                blocks.pop(block, None)

    def take(self, offset: int, length: int) -> bytes | None:
        """The bytes of piece ``[offset, offset + length)`` if it is one kept block (and
        forget it), else None and forget the blocks inside it.

        ``taken`` counts from the forwarder's thread and a resync's at once without a lock:
        a statistic that may miss a count, never data."""
        if self.fits(offset, length):
            data = self._blocks.pop(offset, None)
            if data is not None:
                self.taken += 1
            return data
        self.drop(offset, length)
        return None

    def read_cleared(self, read: Callable[[memoryview, int], None], dirty: DirtyMap,
                     runs: list[tuple[int, int]]) -> Pieces:
        """The current bytes of dirty pieces whose bits in ``dirty`` were just cleared
        (their ranges locked against the writers that lock): a kept block from memory
        (``take``), any other piece through ``read(buf, offset)`` (the disk's
        ``pread_into``).  On a failure, marks them all dirty again (none is sent) and
        raises.

        Cleared, then read: an async write takes no range lock and marks after writing, so
        a write that lands during the read marks the piece again and it is sent again; read
        first, a write between the read and the clear would be lost.  A kept block obeys
        the same rule (see above)."""
        pieces: Pieces = []
        try:
            for offset, length in runs:
                data = self.take(offset, length)
                if data is None:
                    buf = bytearray(length)
                    read(memoryview(buf), offset)
                    pieces.append((offset, buf))
                else:
                    pieces.append((offset, data))
        except BaseException:
            for offset, length in runs:
                dirty.mark(offset, length)
            raise
        return pieces
