"""The guest's disk on a primary: one gate for every write, and a strategy per write mode.

The guest is served in every stage: reads come from the local disk, and a write goes to
the local disk and then where :func:`gate` routes it, from the write mode, the link's state
(link.py) and whether a checkpoint hold is under way:

============  ==============================================================================
route         what the write (or flush) does
============  ==============================================================================
FORWARD       sync, link up: local, then sent under its range lock; waits for the secondary
MARK          sync, no link or degraded: local, then marked dirty (a resync copies it)
WRITE_BACK    async: local, then marked dirty; the forwarder pulls it (writeback.py)
HELD          async, during a hold: local, marked in the hold's own map, sent after resume
LOCAL         a flush that only the local disk needs (async, or sync without a link)
============  ==============================================================================

The stage decides nothing by itself: a primary has no link before ``start`` and after
``stop``, and one from the moment ``start`` connects.  A strategy looks its routes up in
the gate's table once per request (a dict lookup, not a call).

:class:`WritePath` is the guest's ``BlockDevice`` and what both modes share: the range
lock, the counters, the checkpoint hold (a checkpoint's barrier covers what came before
it; what comes after waits for ``resume`` or ``timeout / 2``), and the arming of the C
fast path (fastpath.py), which serves the mode's steady-state route (``fast_route``).
:class:`WriteThrough` is the sync mode; the async one is writeback.py's WriteBack.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from repdisk.block.blockcache import BlockCache
from repdisk.block.device import Extent
from repdisk.block.dirtymap import DirtyMap
from repdisk.block.rangelock import RangeLock
from repdisk.block.rawimage import RawImage
from repdisk.errors import check_range
from repdisk.replication import fastpath
from repdisk.replication.forwarder import Forwarder, Source, SourceWake
from repdisk.replication.framework import ReplicationError
from repdisk.replication.link import Link, LinkState
from repdisk.replication.stage import StageMachine
from repdisk.replication.ticket import Ticket

log = logging.getLogger(__name__)

__all__ = ["Buffer", "Op", "Route", "WriteMode", "WritePath", "WriteThrough", "gate"]

Buffer = bytes | bytearray | memoryview
#: A Forwarder's submit method, called unbound: ``submit(forwarder, *args)``.
Submit = Callable[..., Ticket]


class WriteMode(enum.Enum):
    SYNC = "sync"    # acknowledged once local and on the secondary
    ASYNC = "async"  # acknowledged once local, written back from the dirty map


class Op(enum.Enum):
    WRITE = "write"  # pwrite, zero, trim
    FLUSH = "flush"


class Route(enum.Enum):
    FORWARD = "forward"        # local, then sent; waits for the secondary's answer
    MARK = "mark"              # local, then dirty until a resync
    WRITE_BACK = "write-back"  # local, then dirty; the forwarder pulls it
    HELD = "held"              # local during a hold, sent after it
    LOCAL = "local"            # the local disk only (a flush)


def gate(mode: WriteMode, op: Op, link: LinkState, holding: bool) -> Route:
    """The route of a guest write or flush; the only write policy of a primary."""
    if mode is WriteMode.ASYNC:
        if op is Op.FLUSH:
            # async promises the local disk; a checkpoint's barrier flushes the secondary
            return Route.LOCAL
        return Route.HELD if holding else Route.WRITE_BACK
    if link is LinkState.UP:
        return Route.FORWARD  # a hold keeps the forwarded request queued (forwarder.py)
    return Route.LOCAL if op is Op.FLUSH else Route.MARK


def _routes(mode: WriteMode, op: Op) -> dict[tuple[LinkState, bool], Route]:
    return {(link, holding): gate(mode, op, link, holding)
            for link in LinkState for holding in (False, True)}


class WritePath(abc.ABC):
    """The guest's disk (a BlockDevice), served in every stage: a write mode's strategy.

    Subclasses implement ``pwrite``, ``zero`` and ``trim`` by their routes, ``pull`` and
    ``piece_sent`` for a write-back, and the hold's mode-specific steps
    (``_holding_starts``, ``_holding_ends``).
    """

    mode: ClassVar[WriteMode]
    #: Whether the mode writes back from the dirty map (its unsent bytes are lag).
    write_back: ClassVar[bool] = False
    #: The route the fast path serves (armed only while the gate gives it).
    fast_route: ClassVar[Route]

    def __init__(self, name: str, disk: RawImage, dirty: DirtyMap, link: Link,
                 sm: StageMachine, timeout: float, blocks: BlockCache) -> None:
        self.name = name
        self.disk = disk
        self.dirty = dirty
        self.link = link
        self.sm = sm
        self.timeout = timeout
        self.size = disk.size
        # Reads go straight to the local disk (which checks the range): no call of ours.
        self.pread_into = disk.pread_into
        #: Exclusive holders: sync writes (local write + submit), resync's and verify's
        #: read + submit, async writes during a hold, the async source's reads.
        self.locks = RangeLock()
        #: Blocks kept for the forwarder (blockcache.py); only the write-back keeps any.
        self.blocks = blocks
        #: When the guest last wrote (monotonic): what an adaptive resync backs off from.
        self.last_write = float("-inf")
        # Guards counters.
        self._count_lock = threading.Lock()
        self.counters = {"writes": 0, "bytes": 0, "forwarded": 0}
        # Guards the checkpoint hold (holding, _hold_gen: it invalidates a stale expiry
        # timer, _hold_timer) and the write-back's writers (writeback.py); the condition
        # wakes whoever waits for a writer to leave, a piece to be sent, or the hold's end.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        #: A checkpoint hold is under way.
        self.holding = False
        self._hold_gen = 0
        self._hold_timer: threading.Timer | None = None
        #: The forwarder's source of pieces, for a mode that writes back (forwarder.py),
        #: and what wakes it besides ``pull`` (the fast path's marks).
        self.source: Source | None = None
        self.source_wake: SourceWake | None = None
        self._write_routes = _routes(self.mode, Op.WRITE)
        self._flush_routes = _routes(self.mode, Op.FLUSH)
        #: The C fast path of this disk's writes (fastpath.py); None: the plugin serves all.
        self.fast_slot: fastpath.Slot | None = None
        # Guards the fast path's arming (_fast_gate: a decision and its setting are one
        # step) and _exclusive, how many callers need every write to come through here.
        self._fast_lock = threading.Lock()
        self._exclusive = 0
        self._closed = False
        link.on_change = self._fast_gate

    @abc.abstractmethod
    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        """A guest write, by its route."""

    @abc.abstractmethod
    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        """A guest zero, by its route (a write)."""

    @abc.abstractmethod
    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """A guest trim, by its route (a write)."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        check_range(self.size, offset, length)
        return self.disk.extents(offset, length)

    def flush(self) -> None:
        """Flush locally, and where the gate says so on the secondary too (waits for it, up
        to timeout; a failure is the link's, handled by its on_failure)."""
        self.disk.flush()
        state, fwd = self.link.current
        if self._flush_routes[state, self.holding] is Route.FORWARD:
            assert fwd is not None  # UP
            fwd.submit_flush().wait(self.timeout)

    def counts(self) -> dict[str, int]:
        """The guest's writes and bytes, and how many were forwarded (sync)."""
        with self._count_lock:
            counts = dict(self.counters)
        if self.fast_slot is not None:
            fast = self.fast_slot.stats()
            counts["writes"] += fast["writes"]
            counts["bytes"] += fast["bytes"]
            if self.fast_route is Route.FORWARD:
                counts["forwarded"] += fast["writes"]
        return counts

    # -- what is unsent -------------------------------------------------------------------

    def unsent(self, offset: int, length: int) -> bool:
        """Whether any of the range is not on the secondary yet (dirty)."""
        return self.dirty.is_dirty(offset, length)

    @property
    def unsent_bytes(self) -> int:
        return self.dirty.dirty_bytes

    def settled(self, timeout: float) -> bool:
        """Wait for a moment when every write has marked what it wrote; False if none came
        within ``timeout``.  Sync writes mark under their range lock: always settled."""
        return True

    @contextlib.contextmanager
    def exclusive(self, op: str) -> Iterator[None]:
        """Every guest write goes through this object (and its range locks) meanwhile:
        what a copy, a comparison or a verify needs.  Raises ReplicationError (nothing
        done) if writes already under way elsewhere do not finish in time."""
        with self._fast_lock:
            self._exclusive += 1
        try:
            self._fast_gate()
            self._fast_off(op, self.timeout * 2)
            yield
        finally:
            with self._fast_lock:
                self._exclusive -= 1
            self._fast_gate()

    def close(self) -> None:
        """No write reaches the local disk other than through this object any more (the
        disk is about to close)."""
        self._closed = True
        self._fast_gate()
        if self.fast_slot is not None and not self.fast_slot.wait(self.timeout * 2):
            log.warning("%s: closing with guest writes under way in the fast path", self.name)

    def fast_query(self) -> dict[str, Any] | None:
        """The fast path's state: ``armed``, the ``writes`` and ``bytes`` it acknowledged,
        its idle ``connections``; None without one (no filter)."""
        return None if self.fast_slot is None else self.fast_slot.stats()

    # -- the fast path (fastpath.py) --------------------------------------------------------

    def _fast_gate(self) -> None:
        """Arm the fast path exactly while the gate gives its route and nothing needs every
        write to come through here (a hold, a copy, a verify, a close)."""
        slot = self.fast_slot
        if slot is None:
            return
        with self._fast_lock:
            state, fwd = self.link.current
            if fwd is None or self._closed or \
                    self._write_routes[state, False] is not self.fast_route:
                slot.set(-1, None, self.timeout, False)   # its connections close
            else:  # a hold's or a copy's pause keeps them
                slot.set(self.disk.fd, self._fast_uri(fwd), self.timeout,
                         not self.holding and not self._exclusive)

    def _fast_uri(self, fwd: Forwarder) -> str | None:
        """Where the fast path sends a write (None: nowhere, the forwarder pulls it)."""
        return None

    def _fast_off(self, op: str, within: float) -> None:
        """Wait until no fast write is under way (the gate disarmed it); ReplicationError
        if some did not finish ``within`` seconds."""
        slot = self.fast_slot
        if slot is not None and not slot.wait(within):
            raise ReplicationError(f"{self.name}: cannot {op}: guest writes under way in "
                                   f"the fast path did not finish within {within:g}s; retry")

    def _fast_hold(self, op: str) -> None:
        """A hold began: wait until no fast write is under way; if one outlasts half the
        timeout, end the hold and raise ReplicationError."""
        self._fast_gate()
        try:
            self._fast_off(op, self.timeout / 2)
        except ReplicationError:
            self.end_hold()
            raise

    @abc.abstractmethod
    def pull(self) -> None:
        """Have the forwarder take what is dirty (a write-back's source)."""

    @abc.abstractmethod
    def piece_sent(self) -> None:
        """A copy sent a dirty piece (a write-back wakes its waiting writers)."""

    # -- the checkpoint hold --------------------------------------------------------------

    def hold(self, op: str) -> int:
        """Begin a checkpoint hold after which a barrier covers every earlier write; the
        hold's generation.  Only with the link UP and the secondary in sync (the caller
        checks); raises ReplicationError (no hold) where the mode cannot promise it."""
        return self._begin_hold()

    def _begin_hold(self) -> int:
        """Hold (the mode's way) until ``end_hold``, or by itself after timeout/2.

        Half the timeout: a sync write held meanwhile still has the other half for the
        secondary to answer before its wait (and the forwarder's deadline) runs out.
        """
        with self._lock:
            self._holding_starts()
            self.holding = True
            self._hold_gen += 1
            timer = threading.Timer(self.timeout / 2, self.end_hold, (True, self._hold_gen))
            timer.daemon = True
            timer.start()
            self._hold_timer = timer
            return self._hold_gen

    def still_holding(self, gen: int) -> bool:
        with self._lock:
            return self.holding and self._hold_gen == gen

    def end_hold(self, expired: bool = False, gen: int | None = None) -> None:
        """End the hold: what it kept back is sent.  No hold, or a timer (``gen``) of a
        hold already ended: nothing to do."""
        with self._lock:
            if not self.holding or (gen is not None and gen != self._hold_gen):
                return
            self.holding = False
            timer, self._hold_timer = self._hold_timer, None
            self._holding_ends()
        self._fast_gate()
        self.pull()
        if timer is not None and not expired:
            timer.cancel()
        if expired:
            log.warning("%s: checkpoint hold expired after %gs without replication-resume; "
                        "held writes were sent", self.name, self.timeout / 2)
            self.sm.events("CHECKPOINT_HOLD_EXPIRED", {"disk": self.name,
                                                       "mode": self.sm.mode.value,
                                                       "held": self.timeout / 2})

    @abc.abstractmethod
    def _holding_starts(self) -> None:
        """The mode's part of beginning a hold (``_lock`` held)."""

    @abc.abstractmethod
    def _holding_ends(self) -> None:
        """The mode's part of ending a hold (``_lock`` held)."""


class WriteThrough(WritePath):
    """sync: a write is local, then forwarded under its range lock, and acknowledged once
    the secondary has it (or marked dirty: no link, a refusal, no answer within timeout).

    Each write takes an exclusive range lock over its bytes, writes locally and submits
    the forward before releasing it, so overlapping writes are submitted in the order
    they hit the local disk; the forwarder keeps that order.  The hold is the forwarder's:
    requests submitted during it stay queued until it ends.
    """

    mode = WriteMode.SYNC
    fast_route = Route.FORWARD

    def __init__(self, name: str, disk: RawImage, dirty: DirtyMap, link: Link,
                 sm: StageMachine, timeout: float) -> None:
        super().__init__(name, disk, dirty, link, sm, timeout, BlockCache(0))
        self.fast_slot = fastpath.Slot.make(link.fast_failed)

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        view = memoryview(buf).cast("B")
        self._change(offset, view.nbytes, self.disk.pwrite, Forwarder.submit_write,
                     view, offset, fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._change(offset, length, self.disk.zero, Forwarder.submit_zero,
                     offset, length, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._change(offset, length, self.disk.trim, Forwarder.submit_trim,
                     offset, length, fua)

    def _change(self, offset: int, length: int, local: Callable[..., None], submit: Submit,
                *args: Any) -> None:
        """Lock, ``local(*args)`` (the local disk checks the range), forward with
        ``submit(forwarder, *args)`` (FORWARD) or else mark dirty, unlock, then wait for
        the secondary.  The forwarder fails a request older than timeout (and an expired
        wait fails it), so this never waits longer; the write succeeds either way.

        One call of this module per write: the guest's thread goes from here to the local
        disk and to the forwarder and back, never through another of our functions."""
        ticket: Ticket | None = None
        entry = self.locks.acquire(offset, offset + length)
        try:
            local(*args)
            state, fwd = self.link.current
            if self._write_routes[state, self.holding] is Route.FORWARD:
                ticket = submit(fwd, *args)
                if ticket.done and not ticket.ok:  # the forwarder had already failed
                    ticket = None
            if ticket is None:
                self.dirty.mark(offset, length)
        finally:
            self.locks.release(entry)
        if ticket is not None and not ticket.wait(self.timeout):
            self.dirty.mark(offset, length)  # on_failure marks it too: harmless
        self.last_write = time.monotonic()
        with self._count_lock:
            counters = self.counters
            counters["writes"] += 1
            counters["bytes"] += length
            counters["forwarded"] += ticket is not None

    def _fast_uri(self, fwd: Forwarder) -> str | None:
        return fwd.connect_uri

    def hold(self, op: str) -> int:
        """The forwarder's hold, then no fast write under way: every write acknowledged
        before the barrier is the forwarder's or already on the secondary."""
        gen = self._begin_hold()
        self._fast_hold(op)
        return gen

    def pull(self) -> None:
        """Nothing: sync writes are forwarded, not pulled."""

    def piece_sent(self) -> None:
        """Nothing: no sync write waits for a piece."""

    def _holding_starts(self) -> None:
        fwd = self.link.forwarder
        assert fwd is not None  # a hold begins only with the link UP
        fwd.hold()

    def _holding_ends(self) -> None:
        fwd = self.link.forwarder
        if fwd is not None:
            fwd.release()
