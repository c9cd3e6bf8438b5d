"""What nbdkit serves under a node's export names, and which guest writes it lets in.

A guest-facing export (a primary's ``NAME``, a secondary's ``active``) is an
:class:`Export`: it delegates to the device behind it *now* and admits writes through
the node's :class:`Admission`.  The plugin keeps the object for a connection's life, so
switching ``target`` (promotion, demotion) reaches connections already open.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

from repdisk.block.device import EXTENT_HOLE, EXTENT_ZERO, BlockDevice, Buffer
from repdisk.errors import BlockIOError
from repdisk.node.isolation import Isolation
from repdisk.replication import fastpath, sessions


class Export:
    """What nbdkit serves under one export name: the device behind it now, writes admitted.

    The plugin looks an export up when a connection opens and keeps the object for the
    connection's life, so switching ``target`` (promotion) reaches open connections too.
    """

    def __init__(self, target: BlockDevice, admission: Admission) -> None:
        #: What the fast path's filter serves under this name (fastpath.py).
        self.cell = fastpath.Cell()
        self.target = target
        self.size = target.size
        self._admit = admission.enter
        self._done = admission.leave
        self._pass_guard = admission.pass_guard

    @property
    def target(self) -> BlockDevice:
        return self._target

    @target.setter
    def target(self, device: BlockDevice) -> None:
        # Reads are the most frequent request and need no admission: the target's own
        # method, one Python call fewer per read (rebound when promotion switches it).
        self._target = device
        self.pread_into = device.pread_into
        self.cell.point(getattr(device, "fast_slot", None))

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        self._admit()
        try:
            self.target.pwrite(buf, offset, fua)
        finally:
            self._done()
        self._pass_guard()  # again before acknowledging

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._admit()
        try:
            self.target.zero(offset, length, fua)
        finally:
            self._done()
        self._pass_guard()  # again before acknowledging

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._admit()
        try:
            self.target.trim(offset, length, fua)
        finally:
            self._done()
        self._pass_guard()  # again before acknowledging

    def flush(self) -> None:
        self.target.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return self.target.extents(offset, length)


class Admission:
    """Which guest writes the node lets in, and how many are under way.

    Every guest write (``Export``) enters and leaves here.  ``enter`` first passes the
    isolation guard of a primary (``guard``: held while isolated, refused once fenced;
    passed again before a write is acknowledged), then is refused with EROFS while the
    node refuses guest writes (a demoted primary);
    ``refuse`` waits until the writes already admitted have left, so a demote's barrier
    covers them all.
    """

    def __init__(self) -> None:
        self._guard: Isolation | None = None
        self._lock = threading.Lock()  # guards _in_flight and refused
        self._in_flight = 0
        self.refused = ""  # why guest writes are refused ("" = they are admitted)
        self.publish()

    @property
    def guard(self) -> Isolation | None:
        """The primary's isolation guard (None: no guard, e.g. on a secondary)."""
        return self._guard

    @guard.setter
    def guard(self, guard: Isolation | None) -> None:
        self._guard = guard
        if guard is not None:
            guard.on_change = self.publish
        self.publish()

    def publish(self) -> None:
        """Tell the fast path (fastpath.py) what :meth:`pass_guard` and :meth:`enter`
        would say of a write now: whether it must come here, and from when on (the
        guard's deadline).  Called after every change of either."""
        guard = self._guard
        blocked = bool(self.refused) or (guard is not None and guard.blocking())
        fastpath.publish_guard(blocked, None if guard is None else guard.deadline())

    def enter(self) -> None:
        self.pass_guard()
        with self._lock:
            if self.refused:
                raise BlockIOError(errno.EROFS, f"guest write refused: {self.refused}")
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def pass_guard(self) -> None:
        """Pass the isolation guard: on entering, and again before a finished write is
        acknowledged, so that a write admitted before the node stopped or starved for
        longer than the isolation timeout is not acknowledged when it wakes (held while
        suspended, refused once fenced; no call of the guard otherwise)."""
        guard = self.guard
        if guard is not None and (guard.suspended or guard.fenced or guard.judging
                                  or guard.overdue()):
            guard.admit()

    def refuse(self, why: str, timeout: float) -> bool:
        """Refuse new guest writes; True once none is under way, False (still refusing)
        if some did not finish within ``timeout``."""
        with self._lock:
            self.refused = why
            self.publish()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._in_flight:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def admit(self) -> None:
        with self._lock:
            self.refused = ""
            self.publish()


class SignalView:
    """A twin of a secondary's ``replica/NAME`` export that takes one request, a flush: a
    signal of one writer session's primary (:meth:`signal`).  It stores no data; a flush,
    not a write, so that one that reached a plain NBD server serving every export name as
    its disk (given as the secondary by mistake) changes nothing there."""

    def __init__(self, fence: sessions.SessionFence, token: sessions.Token, size: int) -> None:
        self._fence, self._token, self.size = fence, token, size

    def signal(self) -> None:
        raise NotImplementedError

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        raise BlockIOError(errno.EINVAL, "this export takes one flush")

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        raise BlockIOError(errno.EINVAL, "this export takes one flush")

    trim = zero

    def flush(self) -> None:
        self.signal()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return [(offset, length, EXTENT_HOLE | EXTENT_ZERO)]


class SealView(SignalView):
    """``replica/NAME+seal``: its flush records that the primary of that session demoted
    cleanly (``record(disk, epoch)``)."""

    def __init__(self, record: Callable[[str, int], None], fence: sessions.SessionFence,
                 token: sessions.Token, size: int) -> None:
        super().__init__(fence, token, size)
        self._record = record

    def signal(self) -> None:
        self._fence.run_write(self._token, self._record, self._fence.name, self._token[0])


class MarkView(SignalView):
    """``replica/NAME+mark``: its flush says that the session's primary took a checkpoint
    (sessions.MARK_SUFFIX)."""

    def signal(self) -> None:
        self._fence.mark(self._token)
