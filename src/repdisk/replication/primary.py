"""The primary side of a replicated disk: local disk + forwarding + dirty map.

The guest is served in every stage (**repdisk**: QEMU's primary node serves no
I/O itself).  Reads come from the local disk.  A write goes to the local disk
and then, by write mode:

* ``sync``: to the secondary through a :class:`~repdisk.replication.forwarder.Forwarder`,
  acknowledged once the secondary has it;
* ``async`` (write-back): acknowledged once local; its range is marked in the
  :class:`~repdisk.block.dirtymap.DirtyMap` and the forwarder's I/O thread pulls dirty runs
  from it (:meth:`PrimaryReplica._next_pieces`) and sends them, merged where adjacent
  and small ones many to a batch record (batch.py).  Why write-back and not a queue of
  forwarded writes: between checkpoints the secondary only has to *reach* the
  primary's state by the next checkpoint (a failover rolls back to the last one),
  so the order and the grain of what is sent do not matter, and a guest write
  then costs a local write and a bit, not a hand-off to another thread.

Every write *not* known to be on the secondary (made before ``start``, after
``stop``, while degraded, whose forward failed or timed out, or, in async mode,
not yet sent) is marked in the dirty map, so ``resync`` (and the async write-back)
copies exactly those regions.

Ordering.  Each sync update (and each resync copy) takes an exclusive range lock
over its bytes, writes or reads locally and submits the forward before releasing
it, so overlapping updates are submitted in the order they hit the local disk; the
forwarder sends them in submission order and never lets two overlapping requests be
in flight at once, so the secondary applies them in that order too.  An async guest
write takes no range lock: it marks its range after writing, and a piece is cleared
before it is read (under the range lock, which it keeps until the forwarder has
placed it in its order), so a write that races a read is sent again.  A single 4 KiB
block written by a write that ran alone is kept in memory until sent, so it is not
read back (blockcache.py has the rules that keep that copy true).

A failing or hanging secondary never fails a guest write and never stalls one
past ``timeout``: the write is local, its range is dirty, the replica is
*degraded* (``get_error`` reports why) until ``resync``.

Checkpoints follow DESIGN.md: ``checkpoint()`` = hold + barrier, ``resume()``
(or ``timeout / 2``) ends the hold.  Sync mode holds the forwarder: later writes
are local and wait for their forward.  Async mode first lets the forwarder catch up
with writes flowing, then holds the *writers*: a write that arrives during the hold is
local and goes into a second map (``held``, merged into the dirty map at resume)
unless it touches a granule still dirty from before the hold, which it waits for.
A degraded primary, or a sync one with dirty bytes, refuses a checkpoint: the
secondary's last good checkpoint must never be replaced by an incomplete one.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Union

from repdisk.block.blockcache import BlockCache
from repdisk.block.device import BlockDevice
from repdisk.block.dirtymap import DirtyMap
from repdisk.block.rangelock import RangeLock
from repdisk.block.rawimage import RawImage
from repdisk.errors import ConfigError, ForwardError, check_range
from repdisk.replication import resync, resyncrate
from repdisk.replication.forwarder import Forwarder
from repdisk.replication.framework import (
    Registry,
    ReplicationError,
    ReplicationMode,
    ReplicationOps,
    ReplicationState,
)
from repdisk.replication.resync import differing_bytes, merge_runs
from repdisk.replication.resyncrate import ResyncRate
from repdisk.replication.sessions import SEAL_SUFFIX, make_tag
from repdisk.replication.stage import EventSink, Stage, StageMachine, no_events
from repdisk.replication.ticket import Ticket
from repdisk.uri import with_export_suffix

log = logging.getLogger(__name__)

__all__ = ["PrimaryReplica", "PrimaryView", "WRITE_MODES", "RESYNC_CHUNK"]

WRITE_MODES = ("sync", "async")
#: resync (and the async write-back) copies a dirty run in pieces of at most this many bytes.
RESYNC_CHUNK = 4 << 20
#: RESYNC_PROGRESS events are sent at most this often (the progress callback sees every chunk).
PROGRESS_INTERVAL = 0.5
#: async: the dirty map's grain.  Every guest write is marked, so a fine grain sends no more
#: than was written.  fio 4 KiB random writes on a 1 GiB disk, same IOPS within noise for
#: 4/16/64 KiB, but the secondary was 4.7 / 87 / 234 MiB behind when fio stopped.
ASYNC_GRANULARITY = 4096
#: resync keeps at most this many payload bytes queued or in flight (its memory bound).
SEND_BUDGET = 16 << 20
#: async: the forwarder gathers dirty pieces this long before a round (fio 4 KiB random
#: writes QD16, 2 vCPUs: see bench/README.md).
PULL_DELAY = 0.001
#: async: a checkpoint first waits (writes flowing) until at most this much is unsent.
CATCH_UP = 4 << 20
#: async: most bytes acknowledged to the guest but not yet sent (writers wait beyond it).
DEFAULT_MAX_LAG = 256 << 20
#: async: most 4 KiB blocks kept in memory for the forwarder (16 MiB; blockcache.py).
#: fio 4 KiB random writes QD16, 2 vCPUs, 3 interleaved runs: 35.9-41.9k IOPS with it,
#: 33.2-37.3k without; the primary's CPU per write 19.5-25.4 us, 23.5-27.9 us without.
CACHED_BLOCKS = 4096

Buffer = Union[bytes, bytearray, memoryview]
#: Pieces of the disk to send: (offset, bytes).
Pieces = list[tuple[int, Buffer]]
Submit = Callable[[Forwarder], Ticket]
Progress = Callable[[int, int], None]


class PrimaryView:
    """The guest's disk (a BlockDevice): served in every stage, whatever the secondary does."""

    def __init__(self, replica: PrimaryReplica) -> None:
        self._replica = replica
        self.size = replica.disk.size
        # Reads go straight to the local disk (which checks the range): no call of ours.
        self.pread_into = replica.disk.pread_into

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        self._replica.write(buf, offset, fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._replica.zero(offset, length, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._replica.trim(offset, length, fua)

    def flush(self) -> None:
        self._replica.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        check_range(self.size, offset, length)
        return self._replica.disk.extents(offset, length)


class PrimaryReplica:
    """One primary disk: every primary transition, and the guest's I/O path."""

    def __init__(self, name: str, disk: RawImage, secondary_uri: str | None, *,
                 write_mode: str = "sync", timeout: float = 5.0, window: int = 64,
                 granularity: int | None = None, max_lag: int = DEFAULT_MAX_LAG,
                 resync_rate: ResyncRate = ResyncRate(None, True),
                 events: EventSink = no_events, export_suffix: str = "") -> None:
        if write_mode not in WRITE_MODES:
            raise ConfigError("write-mode", f"unknown write mode {write_mode!r}; "
                                            f"use {' or '.join(WRITE_MODES)}")
        if not timeout > 0:
            raise ConfigError("timeout", f"the timeout must be positive, not {timeout}")
        if window < 1:
            raise ConfigError("window", f"the window must be at least 1, not {window}")
        if max_lag < 1:
            raise ConfigError("max-lag", f"the lag bound must be positive, not {max_lag}")
        self.name = name
        self.disk = disk
        self.secondary_uri = secondary_uri
        self.write_mode = write_mode
        self.timeout = float(timeout)
        self.window = window
        self.export_suffix = export_suffix
        #: The pair's epoch, set by the node at start; every connection this replica makes
        #: names it and a growing generation, so the secondary can fence stale ones.
        self.epoch = 0
        self.events = events
        self.sm = StageMachine(name, ReplicationMode.PRIMARY, events)
        if granularity is None:
            granularity = ASYNC_GRANULARITY if write_mode == "async" else 65536
        self.dirty = DirtyMap(disk.size, granularity)
        # Resync and the write-back copy RESYNC_CHUNK in whole granules (clear() only
        # clears whole granules).
        self._piece_size = max(RESYNC_CHUNK // granularity, 1) * granularity
        # async: writes acknowledged during a checkpoint hold, merged into ``dirty`` at resume.
        self.held = DirtyMap(disk.size, granularity)
        self.max_lag = max_lag
        #: How fast resync copies while the guest runs (resyncrate.py).
        self.resync_rate = resync_rate
        self._last_guest_write = float("-inf")
        #: The last verify's summary (node.verify): time, compared, ranges, bytes, repaired.
        self.last_verify: dict[str, Any] | None = None
        #: A verify under way: {"done", "total"} bytes (query-replication), else None.
        self.verify_progress: dict[str, int] | None = None
        self.view: BlockDevice = PrimaryView(self)
        # Exclusive holders: updates (local write + submit) and resync's read + submit.
        self._locks = RangeLock()
        # The connection writes are forwarded on; None = not forwarding (mark dirty instead).
        self._fwd: Forwarder | None = None
        self.degraded = False
        # Guards the checkpoint hold: _holding, _hold_gen (invalidates a stale expiry timer),
        # and, in async mode, the writers' side of it: _writers (writes that entered before
        # the hold and may still mark ``dirty``) and the ``held`` map's merge.  Writers and
        # the checkpoint wait on it (the hold's end, the last writer, a sent piece).
        self._hold_lock = threading.Lock()
        self._hold_cond = threading.Condition(self._hold_lock)
        self._writers = 0
        # async, for the block cache's rule (blockcache.py): changes of the disk under way
        # and begun so far, held ones included; a change that ran alone saw 1 under way
        # at its start and finds the count begun unchanged at its end.
        self._changing = 0
        self._changes = 0
        self.blocks = BlockCache(CACHED_BLOCKS)
        self._holding = False
        self._hold_gen = 0
        self._hold_timer: threading.Timer | None = None
        # Guards _counters.
        self._count_lock = threading.Lock()
        self._counters = {"writes": 0, "bytes": 0, "forwarded": 0, "forward_errors": 0,
                          "checkpoints": 0}
        self._last_checkpoint: dict[str, float] | None = None
        # async: writers waiting in _write_held or _wait_lag for pieces to be sent.
        self._waiting = 0
        #: async: guest writes are written back from the dirty map (module note).
        self.write_back = write_mode == "async"
        #: Nothing is known of what the secondary lacks (this primary did not stop cleanly,
        #: node.py): the first copy compares the disks by digest first (_copy_dirty).
        self.compare_first = False

    def __repr__(self) -> str:
        return f"PrimaryReplica({self.name!r})"

    def __str__(self) -> str:
        """The disk's name: the registry's error messages say which disk failed."""
        return self.name

    @property
    def stage(self) -> Stage:
        return self.sm.stage

    @property
    def error(self) -> str | None:
        return self.sm.error

    @property
    def holding(self) -> bool:
        return self._holding

    # -- the guest's I/O ---------------------------------------------------------

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        """A guest write: local, then forwarded (sync: waits for the secondary, up to timeout)."""
        view = memoryview(buf).cast("B")
        self._update(offset, view.nbytes, lambda: self.disk.pwrite(view, offset, fua),
                     lambda f: f.submit_write(view, offset, fua), view)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._update(offset, length, lambda: self.disk.zero(offset, length, fua),
                     lambda f: f.submit_zero(offset, length, fua))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._update(offset, length, lambda: self.disk.trim(offset, length, fua),
                     lambda f: f.submit_trim(offset, length, fua))

    def flush(self) -> None:
        """Flush locally, and in sync mode on the secondary too (waits for it, up to timeout).

        Async mode promises only the local disk; the secondary's copy is made durable by
        the checkpoint's barrier."""
        self.disk.flush()
        fwd = self._forwarding()
        if fwd is None or self.write_back:
            return
        fwd.submit_flush().wait(self.timeout)  # a failure is handled by on_failure

    def _update(self, offset: int, length: int, local: Callable[[], None], submit: Submit,
                data: memoryview | None = None) -> None:
        """The one write path: the mode's way of writing, then the counters.  ``data``:
        a write's bytes (async mode may keep them, see _write_back)."""
        check_range(self.disk.size, offset, length, write=True)
        if self.write_back:
            self._write_back(offset, length, local, data)
        else:
            self._write_through(offset, length, local, submit)
        self._last_guest_write = time.monotonic()   # what an adaptive resync backs off from
        with self._count_lock:
            self._counters["writes"] += 1
            self._counters["bytes"] += length

    def _write_through(self, offset: int, length: int, local: Callable[[], None],
                       submit: Submit) -> None:
        """sync: lock, local change, forward (or mark dirty), then wait for the secondary."""
        with self._locks.exclusive(offset, offset + length):
            local()
            ticket = self._submit(offset, length, submit)
        # The forwarder fails a request older than timeout (and an expired wait fails it),
        # so this never waits longer; the guest's write succeeds either way.
        if ticket is not None and not ticket.wait(self.timeout):
            self.dirty.mark(offset, length)  # on_failure marks it too: harmless

    def _write_back(self, offset: int, length: int, local: Callable[[], None],
                    data: memoryview | None = None) -> None:
        """async: local change, mark dirty, ask the forwarder to pull; during a hold, see
        _write_held.  A block written by a write that ran alone is kept for the forwarder
        (``data``; blockcache.py), any other change drops what it touches."""
        self._wait_lag()
        with self._hold_cond:
            holding = self._holding
            if not holding:
                self._writers += 1
                alone = self._begin_change()
        if holding:
            self._write_held(offset, length, local)
            return
        try:
            # No range lock: marked after the write, and pieces are cleared before they are
            # read (_read_piece), so a piece read meanwhile is sent again, never missed.
            try:
                local()
            except BaseException:
                data = None
                raise
            finally:
                with self._hold_cond:
                    self._end_change(offset, length, data, alone)
            self.dirty.mark(offset, length)
        finally:
            with self._hold_cond:
                self._writers -= 1
                if self._holding and not self._writers:
                    self._hold_cond.notify_all()
        self._pull()

    def _begin_change(self) -> int:
        """A change of the disk begins (hold lock held); its token for _end_change: nonzero
        if no other change is under way."""
        self._changing += 1
        self._changes += 1
        return self._changes if self._changing == 1 else 0

    def _end_change(self, offset: int, length: int, data: memoryview | None,
                    alone: int) -> None:
        """A change of the disk is done, before its mark (hold lock held): keep its block
        if it wrote ``data`` and ran alone (no other change under way at its start, none
        begun since), else forget the blocks it touched (blockcache.py)."""
        self._changing -= 1
        if data is not None and alone == self._changes and self.blocks.fits(offset, length):
            self.blocks.put(offset, data)
        else:
            self.blocks.drop(offset, length)

    def _write_held(self, offset: int, length: int, local: Callable[[], None]) -> None:
        """A write during an async hold: local now, sent after resume.

        It must not change a granule the checkpoint still has to send (that would put a
        later write into the checkpoint), so it waits for such granules to be sent, and
        first for the writers from before the hold (they take no range lock, so their
        marks may still be missing); the hold itself ends after timeout/2 at the latest,
        and then the write is an ordinary one (a granule of a failed link is never sent:
        it must not wait for that).
        """
        end = offset + length
        while self._holding:
            # No writer joins _writers during a hold: once 0, every pre-hold mark is in.
            with self._locks.exclusive(offset, end):
                if not self._writers and not self.dirty.is_dirty(offset, length):
                    with self._hold_cond:
                        self._begin_change()
                    written = False
                    try:
                        local()
                        written = True
                    finally:
                        with self._hold_cond:
                            self._end_change(offset, length, None, 0)
                            # A hold that ended meanwhile merged ``held``: mark where it
                            # goes now.
                            held = self._holding
                            if written:
                                (self.held if held else self.dirty).mark(offset, length)
                    if not held:
                        self._pull()
                    return
            with self._hold_cond:
                if self._holding:
                    self._waiting += 1
                    self._hold_cond.wait(0.05)  # woken by each piece sent and by resume
                    self._waiting -= 1
        self._write_back(offset, length, local)

    def _submit(self, offset: int, length: int, submit: Submit) -> Ticket | None:
        """Forward a change (range lock held), or mark it dirty; the ticket if it was sent.

        Shared by guest updates and resync, so both obey the same order and window.
        """
        fwd = self._forwarding()
        if fwd is None:
            self.dirty.mark(offset, length)
            return None
        ticket = submit(fwd)
        if ticket.done and not ticket.ok:
            self.dirty.mark(offset, length)  # rejected: the forwarder had already failed
            return None
        with self._count_lock:
            self._counters["forwarded"] += 1
        return ticket

    def _pull(self) -> None:
        """async: have the forwarder take what is dirty (its source is _next_pieces)."""
        fwd = self._forwarding()
        if fwd is not None:
            fwd.pull()

    def _forwarding(self) -> Forwarder | None:
        """The forwarder writes go to now, or None if they only go to the local disk."""
        fwd = self._fwd
        return None if fwd is None or self.degraded else fwd

    # -- the link to the secondary ---------------------------------------------------

    def _connect(self, session: bool = True) -> Forwarder:
        """A new connection to the secondary, checked for size; raises ReplicationError.

        ``session``: a writer session (sessions.py), fenced by the secondary once a newer
        one starts; the start-up probe only looks and is not one."""
        if self.secondary_uri is None:
            raise ReplicationError(f"{self.name}: cannot replicate: no secondary is configured "
                                   "(set the 'secondary' key to its NBD URI)")
        fwd: Forwarder

        def on_failure(error: str, ranges: list[tuple[int, int]]) -> None:
            self._on_failure(fwd, error, ranges)

        tag = make_tag(self.epoch, time.time_ns()) if session else ""
        fwd = Forwarder(self.secondary_uri, timeout=self.timeout, window=self.window,
                        on_failure=on_failure, export_suffix=self.export_suffix,
                        session_tag=tag,
                        source=self._next_pieces if self.write_back and session else None,
                        pull_delay=PULL_DELAY, batch=self.write_back and session)
        try:
            fwd.connect()
        except ForwardError as err:
            fwd.close()
            raise ReplicationError(f"{self.name}: {err}") from err  # err names the URI
        if fwd.size != self.disk.size:
            fwd.close()
            raise ReplicationError(
                f"{self.name}: the secondary {self.secondary_uri} is {fwd.size} bytes but the "
                f"local disk is {self.disk.size} bytes; give both disks the same size")
        return fwd

    def seal(self) -> None:
        """Tell the secondary that it holds every write this primary acknowledged: one
        write to its seal export on a new writer session (admitting it fences the
        forwarding session there).  Only after a barrier that covered every acknowledged
        write, with guest writes refused (a demote); raises ReplicationError if the
        secondary did not confirm."""
        if self.secondary_uri is None:
            raise ReplicationError(f"{self.name}: no secondary to seal")
        fwd = Forwarder(self.secondary_uri, timeout=self.timeout, window=1,
                        export_suffix=self.export_suffix + SEAL_SUFFIX,
                        session_tag=make_tag(self.epoch, time.time_ns()))
        try:
            fwd.connect()
            ok = fwd.submit_write(bytes(512), 0).wait(self.timeout)
        except ForwardError as err:
            raise ReplicationError(f"{self.name}: cannot seal the secondary: {err}") from err
        finally:
            fwd.close()
        if not ok:
            raise ReplicationError(f"{self.name}: the secondary {self.secondary_uri} did not "
                                   f"confirm the seal: {fwd.error or 'no answer'}")

    def probe(self) -> None:
        """Check that the secondary answers and has this disk's size (node start-up)."""
        self._connect(session=False).close()

    def link_acks(self) -> int | None:
        """Requests the secondary acknowledged on the current link; None when not forwarding.

        The node's isolation monitor watches it grow: an acknowledgement is proof of contact.
        """
        fwd = self._forwarding()
        if fwd is None:
            return None
        stats = fwd.stats
        return stats["writes"] + stats["zeros"] + stats["trims"] + stats["flushes"]

    def probe_link(self) -> None:
        """Send a flush on an idle link, so that an idle secondary still proves it answers
        (and a dead one is noticed before the next guest write)."""
        fwd = self._forwarding()
        if fwd is not None and not self._holding and not fwd.in_flight and not fwd.queued:
            fwd.submit_flush()

    def _on_failure(self, fwd: Forwarder, error: str, ranges: list[tuple[int, int]]) -> None:
        """Called once by a failing forwarder (its thread): mark, degrade, report."""
        for off, length in ranges:
            if length > 0:
                self.dirty.mark(off, length)
        with self._count_lock:
            self._counters["forward_errors"] += 1
        if fwd is not self._fwd:
            return  # an abandoned connection: its ranges are marked, nothing else to say
        self._degrade(f"forwarding to the secondary {self.secondary_uri} failed: {error}")

    def _degrade(self, why: str) -> None:
        """Stop forwarding until resync; get_error reports ``why`` (and an event goes out)."""
        self.degraded = True
        self.sm.record_error(f"{why}; writes are kept local and tracked as dirty until resync")

    def _link_up(self) -> None:
        """Connect and forward from now on; raises ReplicationError if the secondary is unfit."""
        fwd = self._connect()
        self._fwd, self.degraded = fwd, False
        if fwd.failed:  # failed before it was ours: _on_failure did not degrade
            self._degrade(f"forwarding to the secondary {self.secondary_uri} failed: "
                          f"{fwd.error}")

    def _drop_link(self) -> None:
        """Stop forwarding and close the connection; whatever it did not acknowledge is dirty."""
        fwd, self._fwd = self._fwd, None
        if fwd is None:
            return
        fwd.close()  # reports what it did not acknowledge to on_failure: marked dirty

    # -- transitions ---------------------------------------------------------------

    def start(self, mode: ReplicationMode, progress: Progress | None = None) -> None:
        """Connect, copy what is dirty, then RUNNING; ignored once DONE."""
        with self.sm.lock:
            if not self.sm.guard_start(mode):
                return
            self._link_up()
            try:
                self._copy_dirty(progress)
            except BaseException:
                self._drop_link()
                raise
            self.sm.set_stage(Stage.RUNNING)
            self.sm.clear_error()

    def checkpoint(self) -> None:
        """Barrier + hold: every write acknowledged before is on the secondary, later ones wait."""
        with self.sm.lock:
            if not self.sm.guard_running("checkpoint"):
                return
            began = time.monotonic()
            self.resume()  # a hold left from an earlier checkpoint: it is covered by this one
            gen = self._hold_in_sync("checkpoint", "resync before checkpointing")
            fwd = self._fwd
            assert fwd is not None  # RUNNING and not degraded
            if not fwd.barrier(self.timeout):
                self.resume()
                why = fwd.error or f"no answer within {self.timeout:g}s"
                self._degrade(f"checkpoint barrier on the secondary {self.secondary_uri} "
                              f"failed: {why}")
                raise ReplicationError(f"{self.name}: checkpoint failed: the secondary did not "
                                       f"confirm the writes: {why}")
            if not self._still_holding(gen):
                # Later writes were released before the secondary confirmed the earlier
                # ones: the secondary's disk is not a closed set, so no checkpoint now.
                raise ReplicationError(
                    f"{self.name}: checkpoint failed: the secondary took longer than the hold "
                    f"({self.timeout / 2:g}s, half the timeout) to confirm the writes; retry, "
                    "or raise the timeout")
            duration = time.monotonic() - began
            with self._count_lock:
                self._counters["checkpoints"] += 1
            self._last_checkpoint = {"time": time.time(), "duration": duration}
            self.sm.events("CHECKPOINT_COMPLETED", {"disk": self.name, "mode": self.sm.mode.value,
                                                    "duration": duration})

    def _require_in_sync(self, op: str, hint: str) -> None:
        """Refuse ``op`` unless every write is known to be on the secondary."""
        dirty = self.dirty.dirty_bytes
        if self.compare_first:
            raise ReplicationError(f"{self.name}: cannot {op}: this primary did not stop "
                                   "cleanly and has not compared its disk with the "
                                   f"secondary's yet; {hint}")
        if self.degraded or dirty:
            raise ReplicationError(f"{self.name}: cannot {op}: the secondary is not in sync: "
                                   f"{dirty} bytes dirty; {hint}")

    def _hold_in_sync(self, op: str, hint: str) -> int:
        """Begin a hold after which a barrier covers every earlier write; returns the
        hold's generation.  Raises ReplicationError (no hold) if the secondary is not in
        sync: degraded, or in sync mode with dirty bytes.

        Async mode first lets the forwarder bring the lag down with writes flowing, then
        holds the writers: its barrier then sends what is still dirty (the source comes
        up empty once the held writers are gone), so the hold lasts about that long.
        """
        if not self.write_back or self.degraded:
            self._require_in_sync(op, hint)
            fwd = self._fwd
            assert fwd is not None  # RUNNING and not degraded
            return self._begin_hold(fwd)
        self._catch_up()
        gen = self._begin_hold(None)
        with self._hold_cond:
            # Writers entered before the hold mark ``dirty``, not ``held``: wait for them,
            # but not past the hold (it ends by itself, and nothing notifies after that).
            while self._writers and self._holding and self._hold_gen == gen:
                self._hold_cond.wait()
        if not self._still_holding(gen):
            raise ReplicationError(f"{self.name}: cannot {op}: writes from before the hold "
                                   f"were still running when it ended ({self.timeout / 2:g}s, "
                                   "half the timeout); retry, or raise the timeout")
        return gen

    def _catch_up(self) -> None:
        """async: wait (at most timeout/2) for the unsent bytes to drop to CATCH_UP."""
        self._wait_sent(lambda: self.dirty.dirty_bytes <= CATCH_UP, self.timeout / 2)

    def _wait_lag(self) -> None:
        """async: wait while more than max_lag bytes are unsent (up to timeout, then go on:
        a secondary that slow is failing, and the forwarder's deadline degrades it)."""
        if self.dirty.dirty_bytes > self.max_lag:
            self._wait_sent(lambda: self.dirty.dirty_bytes <= self.max_lag, self.timeout)

    def _wait_sent(self, done: Callable[[], bool], timeout: float) -> None:
        """async: wait until ``done()``, re-checked as pieces are sent, or ``timeout``; also
        returns once nothing is being forwarded (nothing would be sent)."""
        deadline = time.monotonic() + timeout
        with self._hold_cond:
            self._waiting += 1
            try:
                while not done() and self._forwarding() is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._hold_cond.wait(min(left, 0.05))
            finally:
                self._waiting -= 1

    def _begin_hold(self, fwd: Forwarder | None) -> int:
        """Hold the forwarder (sync) or the writers (async, ``fwd`` None); the hold ends by
        itself after timeout/2 unless resume() comes.

        Half the timeout: a sync write held meanwhile still has the other half for the
        secondary to answer before its wait (and the forwarder's deadline) runs out.
        """
        with self._hold_lock:
            if fwd is not None:
                fwd.hold()
            self._holding = True
            self._hold_gen += 1
            timer = threading.Timer(self.timeout / 2, self._end_hold, (True, self._hold_gen))
            timer.daemon = True
            timer.start()
            self._hold_timer = timer
            return self._hold_gen

    def _still_holding(self, gen: int) -> bool:
        with self._hold_lock:
            return self._holding and self._hold_gen == gen

    def resume(self) -> None:
        """End the checkpoint hold: held writes are sent.  No hold: nothing to do."""
        self._end_hold(expired=False)

    def _end_hold(self, expired: bool, gen: int | None = None) -> None:
        with self._hold_lock:
            if not self._holding or (gen is not None and gen != self._hold_gen):
                return  # no hold, or a timer from a hold already ended
            self._holding = False
            timer, self._hold_timer = self._hold_timer, None
            fwd = self._fwd
            if self.write_back:
                self._merge_held()
                self._hold_cond.notify_all()
            elif fwd is not None:
                fwd.release()
        if self.write_back:
            self._pull()
        if timer is not None and not expired:
            timer.cancel()
        if expired:
            log.warning("%s: checkpoint hold expired after %gs without replication-resume; "
                        "held writes were sent", self.name, self.timeout / 2)
            self.sm.events("CHECKPOINT_HOLD_EXPIRED", {"disk": self.name,
                                                       "mode": self.sm.mode.value,
                                                       "held": self.timeout / 2})

    def _merge_held(self) -> None:
        """async, the hold ending (``_hold_lock`` held): writes made during it become dirty."""
        for offset, length in self.held.runs():
            self.dirty.mark(offset, length)
        self.held.clear_all()

    def get_error(self) -> None:
        self.sm.get_error()

    def stop(self, failover: bool) -> None:
        """DONE.  failover=True: the secondary is lost; False: first a barrier.  Keep serving."""
        with self.sm.lock:
            if not self.sm.guard_running("stop"):
                return
            self.resume()  # a barrier covers only what a hold let through
            fwd = self._fwd
            if not failover:
                self._hold_in_sync("stop cleanly", "resync first, or stop with failover=true")
                assert fwd is not None  # RUNNING and not degraded
                if not fwd.barrier(self.timeout):
                    self.resume()
                    why = fwd.error or f"no answer within {self.timeout:g}s"
                    raise ReplicationError(
                        f"{self.name}: cannot stop cleanly: the secondary {self.secondary_uri} "
                        f"did not confirm the writes ({why}); stop with failover=true to give "
                        "it up")
            self._drop_link()
            self.degraded = False
            self.sm.set_stage(Stage.DONE)
            self.sm.clear_error()
            self.resume()  # writes held by a clean stop: local from now on, so dirty

    def resync(self, progress: Progress | None = None) -> int:
        """Re-protect: reconnect if needed, then copy every dirty region; returns bytes sent.

        The guest keeps running: new writes are forwarded from the moment the link is up,
        so only what was dirty before (and the few writes racing the switch) is copied.
        """
        with self.sm.lock:
            if self.sm.stage is not Stage.RUNNING:
                raise ReplicationError(f"{self.name}: cannot resync: replication is not running "
                                       f"(stage {self.sm.stage.value}); start it instead")
            fwd = self._fwd
            if self.degraded or fwd is None or fwd.failed:
                self._drop_link()
                self._link_up()
            sent = self._copy_dirty(progress)
            self.sm.clear_error()
            log.info("%s: resync sent %d bytes", self.name, sent)
            return sent

    def verify(self, runs: list[tuple[int, int]],
               progress: Progress | None = None) -> list[tuple[int, int]]:
        """Compare ``runs`` of the local disk with the secondary's disk; returns the exact
        byte runs that differ (coalesced).  The guest keeps writing.

        Each piece is compared at a consistent point: under its range lock (a sync write
        holds it for its local write and its submission) the local bytes are read and a
        read of the secondary's is submitted on the forwarding link, which sends it after
        every earlier write that overlaps it and sends later ones after it.  Async writes
        take no range lock and are written back later: what is dirty (unsent) is not
        reported, and a difference is compared again (twice at most, each time after a
        moment with no writer between its write and its mark) before it is.  Paced like a resync (resync_rate).  Raises
        ReplicationError if replication is not running in sync, or the link fails
        (the verify stops; what it found so far is in the message).
        """
        if self.sm.stage is not Stage.RUNNING:
            raise ReplicationError(f"{self.name}: cannot verify: replication is not running "
                                   f"(stage {self.sm.stage.value})")
        if self.degraded or self._forwarding() is None:
            raise ReplicationError(f"{self.name}: cannot verify: the secondary is not in sync "
                                   f"({self.dirty.dirty_bytes} bytes dirty); resync first")
        total = sum(n for _, n in runs)
        self.verify_progress = {"done": 0, "total": total}
        try:
            return self._verify_runs(runs, total, progress)
        finally:
            self.verify_progress = None

    def _verify_runs(self, runs: list[tuple[int, int]], total: int,
                     progress: Progress | None) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        pacer, done, last_event = self.pacer(), 0, 0.0
        for offset, length in merge_runs(runs):
            end = offset + length
            while offset < end:
                step = pacer.step()
                n = min(step.piece, end - offset)
                pacer.pace(n, step)
                found += self._verify_piece(offset, n, done, total, found)
                offset += n
                done += n
                self.verify_progress = {"done": done, "total": total}
                if progress is not None:
                    progress(done, total)
                if time.monotonic() - last_event >= PROGRESS_INTERVAL:
                    last_event = time.monotonic()
                    self.sm.progress("VERIFY", done, total)
        self.sm.progress("VERIFY", done, total)
        return merge_runs(found)

    def _verify_piece(self, offset: int, length: int, done: int, total: int,
                      found: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The differing runs of one piece (async: confirmed, see verify)."""
        diffs = self._compare_piece(offset, length, done, total, found)
        for _ in range(2 if self.write_back else 0):
            if not diffs:
                break
            self._writers_settled(self.timeout / 2)
            diffs = [d for o, n in diffs if not self._unsent(o, n)
                     for d in self._compare_piece(o, n, done, total, found)]
        return [r for r in diffs if not self._unsent(*r)] if self.write_back else diffs

    def _unsent(self, offset: int, length: int) -> bool:
        return self.dirty.is_dirty(offset, length) or self.held.is_dirty(offset, length)

    def _writers_settled(self, timeout: float) -> bool:
        """async: wait for a moment with no writer between its entry and its mark (the
        writers that wrote before it have marked by then); False if none came in time."""
        deadline = time.monotonic() + timeout
        while self._writers:          # an int read; the writers change it under _hold_cond
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def _compare_piece(self, offset: int, length: int, done: int, total: int,
                 found: list[tuple[int, int]]) -> list[tuple[int, int]]:
        local = bytearray(length)
        with self._locks.exclusive(offset, offset + length):
            fwd = self._forwarding()
            ticket = None if fwd is None else fwd.submit_read(offset, length)
            self.disk.pread_into(memoryview(local), offset)
        if ticket is None or not ticket.wait(self.timeout) or ticket.data is None:
            fwd = self._fwd
            why = (fwd.error if fwd else None) or f"no answer within {self.timeout:g}s"
            raise ReplicationError(
                f"{self.name}: verify stopped at {done} of {total} bytes: the secondary "
                f"{self.secondary_uri} failed: {why}; {len(found)} differing ranges found "
                f"before it: {found[:16]}")
        return differing_bytes(offset, local, ticket.data)

    def _copy_dirty(self, progress: Progress | None) -> int:
        """Send every dirty region to the secondary (writes flowing), then a barrier; raise
        if the link fails.  Returns the bytes sent.

        Sync mode goes over what became dirty meanwhile (writes that chose "not
        forwarding" just before the link came up) until nothing is left.  Async mode
        makes one pass: writes keep marking, and the forwarder's pulls carry on from there.
        """
        last_event = 0.0

        def report(done: int) -> None:
            nonlocal last_event
            total = done + self.dirty.dirty_bytes
            if progress is not None:
                progress(done, total)
            if time.monotonic() - last_event >= PROGRESS_INTERVAL:
                last_event = time.monotonic()
                self.sm.progress("RESYNC", done, total)

        if self.compare_first:
            self._compare()
        done = self._send_dirty(chase=not self.write_back, report=report)
        fwd = self._forwarding()
        # Not draining: async writes may keep the dirty map from ever running dry.
        if fwd is None or not fwd.barrier(self.timeout, drain=False):
            self._copy_failed()
        self.sm.progress("RESYNC", done, done)
        self._pull()
        return done

    def _compare(self) -> None:
        """Mark dirty every granule where the secondary's disk differs from this one (by
        digest, resync.differing_granules); then the ordinary copy sends them.  Writes
        made meanwhile are marked as usual, so a granule compared before one is not lost."""
        began = time.monotonic()
        try:
            runs = resync.differing_granules(
                self.disk, with_export_suffix(self.secondary_uri or "", self.export_suffix),
                self.timeout)
        except ForwardError as err:
            raise ReplicationError(f"{self.name}: cannot compare the disks, so nothing is "
                                   f"copied yet: {err}") from err
        for offset, length in runs:
            self.dirty.mark(offset, length)
        self.compare_first = False
        log.warning("%s: compared with the secondary in %.1fs: %d bytes differ", self.name,
                    time.monotonic() - began, sum(n for _, n in runs))

    def _send_dirty(self, chase: bool = True,
                    report: Callable[[int], None] | None = None) -> int:
        """Send the dirty runs, SEND_BUDGET bytes and ``window`` pieces at most in flight;
        returns the bytes sent once they are all acknowledged.  ``chase``: go on until the
        map is empty, else one pass over the runs dirty at the start.  Raises
        ReplicationError (what was not acknowledged is dirty again) if the link fails.
        """
        done = 0
        pending: deque[Ticket] = deque()
        in_flight = 0
        pacer = self.pacer()
        while runs := self.dirty.runs():
            for offset, length in runs:
                end = offset + length
                while offset < end:
                    step = pacer.step()
                    clen = min(step.piece, end - offset)
                    while pending and (in_flight + clen > SEND_BUDGET
                                       or len(pending) >= step.in_flight):
                        in_flight -= self._settle_copy(pending.popleft())
                    pacer.pace(clen, step)
                    pending.append(self._copy_chunk(offset, clen))
                    in_flight += clen
                    done += clen
                    offset += clen
                    if report is not None:
                        report(done)
            if not chase:
                break
        while pending:
            self._settle_copy(pending.popleft())
        return done

    def pacer(self) -> resyncrate.Pacer:
        """A copy's pacing by ``resync_rate``: the guest's writes are the activity it
        backs off from; pieces and window are the copy's own limits."""
        return resyncrate.Pacer(self.resync_rate, lambda: self._last_guest_write,
                                self._piece_size, self.window, self.dirty.granularity)

    def _read_piece(self, offset: int, length: int) -> Buffer:
        """A dirty piece's current bytes, its bits cleared (caller holds its range lock)."""
        self.dirty.clear(offset, length)
        return self._read_cleared([(offset, length)])[0][1]

    def _read_cleared(self, runs: list[tuple[int, int]]) -> Pieces:
        """The current bytes of dirty pieces whose bits were just cleared (their ranges
        locked); on a failure, marks them all dirty again (none is sent) and raises.

        Cleared, then read: an async guest write takes no range lock (_write_back) and
        marks after writing, so a write that lands during the read marks the piece again
        and it is sent again; read first, a write between the read and the clear would
        be lost.  A kept block (blockcache.py) is read from memory, by the same rule."""
        try:
            return [(offset, self._current_bytes(offset, length)) for offset, length in runs]
        except BaseException:
            for offset, length in runs:
                self.dirty.mark(offset, length)
            raise

    def _current_bytes(self, offset: int, length: int) -> Buffer:
        """A piece's bytes: its kept block if it is one, else read from the disk."""
        kept = self.blocks.take(offset, length)
        if kept is not None:
            return kept
        buf = bytearray(length)
        self.disk.pread_into(memoryview(buf), offset)
        return buf

    def _next_pieces(self, count: int,
                     budget: int) -> tuple[Pieces, Callable[[], None]] | None:
        """async: the forwarder's source (its I/O thread): the highest dirty pieces, at
        most ``count``, taken while fewer than ``budget`` bytes are, cleared and read, with
        the range lock held until the forwarder has placed them in its order (a resync copy
        submits under that lock), or None.  A failed forward marks them dirty again
        (on_failure).

        The lock is the whole disk's, one per round: a round's pieces lie anywhere, and
        the other holders of an async disk's range lock (a resync copy, a write during a
        checkpoint hold) only wait for the round's reads."""
        entry = self._locks.acquire(0, self.disk.size)
        try:
            pieces = self._read_cleared(self.dirty.take_last(self._piece_size, count, budget))
        except BaseException:
            self._locks.release(entry)
            raise
        if not pieces:
            self._locks.release(entry)
            return None

        def placed() -> None:
            self._locks.release(entry)
            self._piece_sent()

        return pieces, placed

    def _piece_sent(self) -> None:
        """Wake writers waiting for a granule or for the lag to shrink (async)."""
        if self._waiting:
            with self._hold_cond:
                self._hold_cond.notify_all()

    def _copy_chunk(self, offset: int, length: int) -> Ticket:
        """Read a dirty piece locally, clear its bits and send it (under its range lock)."""
        with self._locks.exclusive(offset, offset + length):
            buf = self._read_piece(offset, length)
            try:
                ticket = self._submit(offset, length, lambda f: f.submit_write(buf, offset))
            except BaseException:
                self.dirty.mark(offset, length)
                raise
        self._piece_sent()
        if ticket is None:
            self._copy_failed()
        assert ticket is not None
        return ticket

    def _settle_copy(self, ticket: Ticket) -> int:
        """Wait for a piece's acknowledgement; its length, or ReplicationError."""
        if not ticket.wait(self.timeout):
            self._copy_failed()
        return ticket.length

    def _copy_failed(self) -> None:
        """Stop copying: what is left stays dirty, so the next resync continues from here."""
        fwd = self._fwd
        if fwd is not None and fwd.errno == errno.ESHUTDOWN:  # secondary.gate: stage NONE
            raise ReplicationError(
                f"{self.name}: the secondary {self.secondary_uri} is not started yet: start "
                "it first (repdisk ctl SECONDARY-CONTROL start mode=secondary), then this "
                f"primary; {self.dirty.dirty_bytes} bytes wait to be copied")
        why = (fwd.error if fwd else None) or f"no answer within {self.timeout:g}s"
        raise ReplicationError(f"{self.name}: resync stopped: the secondary "
                               f"{self.secondary_uri} failed: {why}; "
                               f"{self.dirty.dirty_bytes} bytes remain dirty, resync again")

    # -- framework, observability, teardown ---------------------------------------------

    def ops(self) -> ReplicationOps:
        return ReplicationOps.bound_to(self)

    def register(self, registry: Registry) -> ReplicationState:
        return registry.new(self, self.ops())

    def query(self) -> dict[str, Any]:
        fwd = self._fwd
        with self._count_lock:
            counters = dict(self._counters)
        counters["blocks_from_memory"] = self.blocks.taken
        unsent = self.dirty.dirty_bytes + self.held.dirty_bytes
        # async and forwarding: unsent bytes are the write-back's lag, not a resync's work.
        lagging = self.write_back and self._forwarding() is not None
        return {
            "disk": self.name,
            "mode": self.sm.mode.value,
            "stage": self.sm.stage.value,
            "error": self.sm.error,
            "degraded": self.degraded,
            "write_mode": self.write_mode,
            "resync_rate": self.resync_rate.describe(),
            "last_verify": self.last_verify,
            "verify_progress": self.verify_progress,
            "dirty_bytes": 0 if lagging else unsent,
            "in_flight": fwd.in_flight if fwd else 0,
            "queued": fwd.queued if fwd else 0,
            # acknowledged to the guest (or being written) but not yet confirmed by the secondary
            "lag_bytes": (unsent if lagging else 0) + (fwd.in_flight_bytes if fwd else 0),
            "counters": counters,
            "link": dict(fwd.stats) if fwd else None,
            "last_checkpoint": dict(self._last_checkpoint) if self._last_checkpoint else None,
            "holding": self._holding,
            "compare_first": self.compare_first,
        }

    def close(self) -> None:
        """Drop the link (unacknowledged writes become dirty) and close the local disk.

        Async mode first tries to send what is unsent, so a node shut down cleanly leaves
        its secondary with every acknowledged write; failing that, it stays dirty."""
        with self.sm.lock:
            self.resume()
            if (self.write_back and self.sm.stage is Stage.RUNNING
                    and self._forwarding() is not None):
                try:
                    self._copy_dirty(None)
                except ReplicationError as err:
                    log.warning("%s: closing with unsent writes: %s", self.name, err)
            self._drop_link()
        self.disk.close()

