"""The async write-back's memory of single blocks the guest wrote and nobody has sent yet.

Why: an async write is local plus a dirty bit, and the forwarder reads each dirty piece
back from the disk before sending it.  For scattered 4 KiB writes that read is one system
call per piece, and each one hands the primary's GIL to the guest's thread and back (the
async primary's limit, bench/README.md).  A copy of the block made by the writer, while
it has the GIL anyway, spares both: ``take`` is a dict lookup.

What keeps it true, the primary's side of the bargain (primary.py, ``_write_back``):

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

__all__ = ["BLOCK", "BlockCache"]

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
