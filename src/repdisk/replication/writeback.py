"""The async primary's write path: a write-back from the dirty map (docs/DESIGN.md).

A guest write is local, then marked in the :class:`~repdisk.block.dirtymap.DirtyMap`
(4 KiB granules), and acknowledged; the forwarder's I/O thread pulls the highest dirty
runs as pieces (:meth:`WriteBack.next_pieces`, the forwarder's ``source``) and sends
them.  Between checkpoints the secondary only has to *reach* the primary's state by the
next checkpoint (a failover rolls back to the last one), so the order and the grain of
what is sent do not matter, and a write costs a local write and a bit, not a hand-off to
another thread.

The fast path.  In steady state (the route WRITE_BACK, no hold, copy or verify) the
``repdisk-fast`` filter serves a guest write in C (fastpath.py): the local write, then its
range in the slot's mark log, which the dirty map takes in before every read
(``DirtyMap.feed_from``), and a wake-up of the forwarder through the slot's eventfd
(``source_wake``).  With a slot no block is kept in memory: a write in C cannot drop a kept
block it changes.

Ordering.  A write takes no range lock: it marks its range after writing, and a piece
is cleared before it is read (under the range lock, kept until the forwarder has placed
it in its order), so a write that races a read is sent again, never missed.  A single
4 KiB block written by a write that ran alone is kept in memory until sent, so it is not
read back (blockcache.py has the rules that keep that copy true): the writers count
the changes of the disk under way and begun (``_changing``, ``_changes``).

The hold.  A checkpoint first lets the forwarder catch up with writes flowing (at most
CATCH_UP unsent), then holds the *writers*: a write arriving during the hold is local and
marked in ``during_hold`` (merged into the dirty map when the hold ends) unless it
touches a granule still dirty from before the hold, which it waits for, and first for
the writers that entered before the hold (``_writers``), whose marks may still be
missing.  ``max_lag`` bounds the unsent bytes: writers wait beyond it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from repdisk.block.blockcache import BlockCache, Pieces
from repdisk.block.dirtymap import DirtyMap
from repdisk.block.rawimage import RawImage
from repdisk.errors import check_range
from repdisk.replication import fastpath
from repdisk.replication.framework import ReplicationError
from repdisk.replication.link import Link
from repdisk.replication.stage import StageMachine
from repdisk.replication.writepath import Buffer, Route, WriteMode, WritePath

__all__ = ["WriteBack", "CATCH_UP", "CACHED_BLOCKS"]

#: A checkpoint first waits (writes flowing) until at most this much is unsent.
CATCH_UP = 4 << 20
#: Most 4 KiB blocks kept in memory for the forwarder (16 MiB; blockcache.py; the
#: measurements are in bench/README.md).
CACHED_BLOCKS = 4096


class WriteBack(WritePath):
    """async: local, marked dirty, acknowledged; sent by the forwarder's pulls."""

    mode = WriteMode.ASYNC
    write_back = True
    fast_route = Route.WRITE_BACK

    def __init__(self, name: str, disk: RawImage, dirty: DirtyMap, link: Link,
                 sm: StageMachine, timeout: float, max_lag: int, piece_size: int) -> None:
        slot = fastpath.Slot.make_write_back()
        super().__init__(name, disk, dirty, link, sm, timeout,
                         BlockCache(0 if slot is not None else CACHED_BLOCKS))
        if slot is not None:
            self.fast_slot = slot
            dirty.feed_from(slot.take_marks)
            self.source_wake = (slot.wake_fd, slot.rearm)
        #: Writes made during a checkpoint hold, merged into ``dirty`` when it ends.
        self.during_hold = DirtyMap(disk.size, dirty.granularity)
        self.max_lag = max_lag
        self._piece_size = piece_size
        self.source = self.next_pieces
        # Under _lock: writes that entered outside a hold and may still mark ``dirty``;
        # changes of the disk under way and begun so far (held ones included: a change
        # that ran alone saw 1 under way at its start and finds the count begun unchanged
        # at its end); writers waiting for pieces to be sent.
        self._writers = 0
        self._changing = 0
        self._changes = 0
        self._waiting = 0

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        view = memoryview(buf).cast("B")
        self._change(offset, view.nbytes, self.disk.pwrite, (view, offset, fua), view)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._change(offset, length, self.disk.zero, (offset, length, fua))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._change(offset, length, self.disk.trim, (offset, length, fua))

    def _change(self, offset: int, length: int, local: Callable[..., None],
                args: tuple[Any, ...], data: memoryview | None = None) -> None:
        """A guest change: its route, then the counters.  ``data``: a write's bytes (kept
        if the write runs alone, see _write)."""
        check_range(self.size, offset, length, write=True)
        self._write(offset, length, local, args, data)
        self.last_write = time.monotonic()
        with self._count_lock:
            self.counters["writes"] += 1
            self.counters["bytes"] += length

    def _write(self, offset: int, length: int, local: Callable[..., None],
               args: tuple[Any, ...], data: memoryview | None = None) -> None:
        """Local change, mark dirty, ask the forwarder to pull (WRITE_BACK); during a hold,
        _write_held (HELD).  A block written by a write that ran alone is kept for the
        forwarder (``data``; blockcache.py), any other change drops what it touches."""
        self._wait_lag()
        alone = 0
        with self._cond:
            route = self._write_routes[self.link.state, self.holding]
            if route is Route.WRITE_BACK:
                self._writers += 1
                alone = self._begin_change()
        if route is Route.HELD:
            self._write_held(offset, length, local, args)
            return
        try:
            # No range lock: marked after the write, and pieces are cleared before they
            # are read (BlockCache.read_cleared), so a piece read meanwhile is sent again,
            # never missed.
            try:
                local(*args)
            except BaseException:
                data = None
                raise
            finally:
                with self._cond:
                    self._end_change(offset, length, data, alone)
            self.dirty.mark(offset, length)
        finally:
            with self._cond:
                self._writers -= 1
                if self.holding and not self._writers:
                    self._cond.notify_all()
        self.pull()

    def _begin_change(self) -> int:
        """A change of the disk begins (``_lock`` held); its token for _end_change:
        nonzero if no other change is under way."""
        self._changing += 1
        self._changes += 1
        return self._changes if self._changing == 1 else 0

    def _end_change(self, offset: int, length: int, data: memoryview | None,
                    alone: int) -> None:
        """A change of the disk is done, before its mark (``_lock`` held): keep its block
        if it wrote ``data`` and ran alone (no other change under way at its start, none
        begun since), else forget the blocks it touched (blockcache.py)."""
        self._changing -= 1
        if data is not None and alone == self._changes and self.blocks.fits(offset, length):
            self.blocks.put(offset, data)
        else:
            self.blocks.drop(offset, length)

    def _write_held(self, offset: int, length: int, local: Callable[..., None],
                    args: tuple[Any, ...]) -> None:
        """A write during a hold: local now, sent after the hold.

        It must not change a granule the checkpoint still has to send (that would put a
        later write into the checkpoint), so it waits for such granules to be sent, and
        first for the writers from before the hold (they take no range lock, so their
        marks may still be missing); the hold itself ends after timeout/2 at the latest,
        and then the write is an ordinary one (a granule of a failed link is never sent:
        it must not wait for that).
        """
        end = offset + length
        while self.holding:
            # No writer joins _writers during a hold: once 0, every pre-hold mark is in.
            with self.locks.exclusive(offset, end):
                if not self._writers and not self.dirty.is_dirty(offset, length):
                    with self._cond:
                        self._begin_change()
                    written = False
                    try:
                        local(*args)
                        written = True
                    finally:
                        with self._cond:
                            self._end_change(offset, length, None, 0)
                            # A hold that ended meanwhile merged ``during_hold``: mark
                            # where it goes now.
                            held = self.holding
                            if written:
                                (self.during_hold if held else self.dirty).mark(offset,
                                                                                length)
                    if not held:
                        self.pull()
                    return
            with self._cond:
                if self.holding:
                    self._waiting += 1
                    self._cond.wait(0.05)  # woken by each piece sent and by the hold's end
                    self._waiting -= 1
        self._write(offset, length, local, args)

    def pull(self) -> None:
        """Have the forwarder take what is dirty (its source is next_pieces)."""
        fwd = self.link.current[1]  # not the property: no call on the write's way
        if fwd is not None:
            fwd.pull()

    # -- the forwarder's source -------------------------------------------------------------

    def next_pieces(self, count: int,
                    budget: int) -> tuple[Pieces, Callable[[], None]] | None:
        """The forwarder's source (its I/O thread): the highest dirty pieces, at most
        ``count``, taken while fewer than ``budget`` bytes are, cleared and read, with the
        range lock held until the forwarder has placed them in its order (a resync copy
        submits under that lock), or None.  A failed forward marks them dirty again
        (on_failure).

        The lock is the whole disk's, one per round: a round's pieces lie anywhere, and
        the other holders of an async disk's range lock (a resync copy, a write during a
        hold) only wait for the round's reads."""
        entry = self.locks.acquire(0, self.size)
        try:
            pieces = self.blocks.read_cleared(
                self.disk.pread_into, self.dirty,
                self.dirty.take_last(self._piece_size, count, budget))
        except BaseException:
            self.locks.release(entry)
            raise
        if self.fast_slot is not None:
            self.fast_slot.lag(self.dirty.dirty_bytes, self.max_lag)
        if not pieces:
            self.locks.release(entry)
            return None

        def placed() -> None:
            self.locks.release(entry)
            self.piece_sent()

        return pieces, placed

    def piece_sent(self) -> None:
        """Wake writers waiting for a granule or for the lag to shrink."""
        if self._waiting:
            with self._cond:
                self._cond.notify_all()

    # -- what is unsent ---------------------------------------------------------------------

    def unsent(self, offset: int, length: int) -> bool:
        return self.dirty.is_dirty(offset, length) or self.during_hold.is_dirty(offset, length)

    @property
    def unsent_bytes(self) -> int:
        return self.dirty.dirty_bytes + self.during_hold.dirty_bytes

    def settled(self, timeout: float) -> bool:
        """Wait for a moment with no writer between its entry and its mark (the writers
        that wrote before it have marked by then); False if none came in time."""
        deadline = time.monotonic() + timeout
        while self._writers:          # an int read; the writers change it under _lock
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def _wait_lag(self) -> None:
        """Wait while more than max_lag bytes are unsent (up to timeout, then go on: a
        secondary that slow is failing, and the forwarder's deadline degrades it)."""
        if self.dirty.dirty_bytes > self.max_lag:
            self._wait_sent(lambda: self.dirty.dirty_bytes <= self.max_lag, self.timeout)

    def _wait_sent(self, done: Callable[[], bool], timeout: float) -> None:
        """Wait until ``done()``, re-checked as pieces are sent, or ``timeout``; also
        returns once nothing is being forwarded (nothing would be sent)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while not done() and self.link.current[1] is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(min(left, 0.05))
            finally:
                self._waiting -= 1

    # -- the hold ---------------------------------------------------------------------------

    def hold(self, op: str) -> int:
        """Let the forwarder bring the lag down with writes flowing (at most timeout/2),
        then hold the writers: the barrier then sends what is still dirty (the source
        comes up empty once the writers from before the hold are gone), so the hold lasts
        about that long.  Raises ReplicationError if those writers outlast the hold."""
        self._wait_sent(lambda: self.dirty.dirty_bytes <= CATCH_UP, self.timeout / 2)
        gen = self._begin_hold()
        self._fast_hold(op)
        with self._cond:
            # Writers entered before the hold mark ``dirty``, not ``during_hold``: wait for
            # them, but not past the hold (it ends by itself, and nothing notifies after).
            while self._writers and self.holding and self._hold_gen == gen:
                self._cond.wait()
        if not self.still_holding(gen):
            raise ReplicationError(f"{self.name}: cannot {op}: writes from before the hold "
                                   f"were still running when it ended ({self.timeout / 2:g}s,"
                                   " half the timeout); retry, or raise the timeout")
        return gen

    def _holding_starts(self) -> None:
        """Nothing: writers look at ``holding`` themselves."""

    def _holding_ends(self) -> None:
        """Writes made during the hold become dirty; waiting writers go on."""
        for offset, length in self.during_hold.runs():
            self.dirty.mark(offset, length)
        self.during_hold.clear_all()
        self._cond.notify_all()
