"""The device protocol: what the plugin serves and every image is (docs/DESIGN.md).

Offsets and lengths are bytes, any alignment is allowed; a request that is empty or
past the end raises ``BlockIOError`` via ``errors.check_range``.  ``extents`` answers
with NBD's extent flags.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["EXTENT_HOLE", "EXTENT_ZERO", "Buffer", "Extent", "BlockDevice", "byte_view",
           "add_extent"]

#: NBD's extent flags.
EXTENT_HOLE = 1
EXTENT_ZERO = 2

Buffer = bytes | bytearray | memoryview
Extent = tuple[int, int, int]


@runtime_checkable
class BlockDevice(Protocol):
    """What the plugin serves and every image is (see docs/DESIGN.md)."""

    size: int

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset``; durable on return if ``fua``."""

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        """Make the range read back as zeros."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Advise that the range is unused; may do nothing (reads are then unchanged)."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """``(offset, length, flags)`` covering the range in order, flags NBD's
        (``EXTENT_HOLE``, ``EXTENT_ZERO``)."""


def byte_view(buf: Buffer) -> memoryview:
    """A flat byte view of ``buf`` without copying it."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def add_extent(out: list[Extent], offset: int, length: int, flags: int) -> None:
    """Append an extent, merging it into the previous one when they are alike and adjacent."""
    if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
        prev = out[-1]
        out[-1] = (prev[0], prev[1] + length, flags)
    else:
        out.append((offset, length, flags))

