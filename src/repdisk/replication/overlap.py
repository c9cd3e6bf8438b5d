"""The overlap index of the batch records in flight, by ``GRAIN`` block.

A record carries up to 64 scattered pieces; checking a queued write against each
piece of each record in flight would cost a loop per piece.  Instead each record in
flight has the set of ``GRAIN`` blocks its pieces touch, made when it is issued and
dropped whole when it retires.  A write that shares a block with a record waits for
it: always when they share a byte, sometimes when they only share a block (a wait,
never a reordering).  Used by the forwarder's I/O thread only: no lock.
"""

from __future__ import annotations

__all__ = ["GRAIN", "OverlapIndex"]

#: The block size of the index.
GRAIN = 4096


class OverlapIndex:
    """The ``GRAIN`` blocks of each record in flight (a few sets: at most one per record)."""

    def __init__(self) -> None:
        # One set per record in flight; empty when none is (checked before hits()).
        self.records: list[set[int]] = []

    def add(self, parts: list[tuple[int, int]]) -> set[int]:
        """Index a record's (offset, length) parts; returns its set, for :meth:`remove`."""
        grains: set[int] = set()
        for offset, length in parts:
            first, last = offset // GRAIN, (offset + length - 1) // GRAIN
            if first == last:
                grains.add(first)
            else:
                grains.update(range(first, last + 1))
        self.records.append(grains)
        return grains

    def remove(self, grains: set[int]) -> None:
        """Drop a record's set (as :meth:`add` returned it) from the index."""
        for i, other in enumerate(self.records):
            if other is grains:
                del self.records[i]
                return

    def hits(self, start: int, end: int) -> bool:
        """True if a record in flight has a part in a ``GRAIN`` block of ``[start, end)``
        (a block in common, not always a byte: such a write only waits)."""
        first, last = start // GRAIN, (end - 1) // GRAIN
        for grains in self.records:
            if first == last:  # the usual case: a piece of one block
                if first in grains:
                    return True
            elif last - first < len(grains):
                if not grains.isdisjoint(range(first, last + 1)):
                    return True
            elif any(first <= g <= last for g in grains):
                return True
        return False
