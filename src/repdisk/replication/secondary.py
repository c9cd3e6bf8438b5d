"""The secondary side of a replicated disk: QEMU's ``block/replication.c`` in secondary mode.

Layout (all three the same length)::

    active overlay  --backing-->  hidden overlay  --backing-->  secondary disk
    (secondary VM's writes)       (old contents the primary     (the primary's writes)
                                   overwrote since the last
                                   checkpoint)

The images are ``disk``, ``hidden_overlay`` and ``active_overlay``.  Two views over
them are served, both ``BlockDevice``-shaped:

* ``replica_view`` -- what the primary writes into.  A write first copies the old
  contents of every cluster it touches into the hidden overlay (copy-before-write,
  once per cluster per checkpoint interval), then writes the disk.
* ``active_view`` -- the secondary VM's disk: its own writes, else the disk as it was
  at the last checkpoint (reads fall through active, hidden, disk).

One gate, :func:`gate`, decides every request's fate from (view, op, stage);
the views ask only the gate, under the range lock of the request, so a request
that waited for a checkpoint or a failover commit sees the stage that commit
left behind.

Locking (``SecondaryReplica._ranges``, a FairRangeLock over cluster-rounded byte ranges
of the disk):

* replica writes, zeroes and trims: exclusive over copy-before-write + disk write,
  so nobody reads a cluster whose old contents are not yet in ``hidden``; a batch
  record (``write_record``): exclusive over the span of its pieces;
* replica and active reads: shared;
* active writes: exclusive (a partial cluster is read-modify-written from hidden/disk);
* checkpoint and the failover commit: exclusive over the whole disk.

Transitions (``start``, ``checkpoint``, ``stop`` = ``begin_failover`` +
``resume_failover``) run under ``sm.lock`` and are the
only writers of the stage (through ``_set_stage``).

The fast path (fastpath.py): while the stage is RUNNING and no transition holds the disk,
the ``repdisk-fast`` filter serves a replica ``pwrite`` of the current writer session
itself when every cluster it touches is already in hidden (``COPY_BEFORE_WRITE`` with
nothing left to copy: a write to the disk, which the range lock would not change).
Everything else comes here.  A transition first hands every write to the plugin and waits
for those in C to end (``_fast_held``), so they are all before it or after it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

from repdisk.block.device import BlockDevice, Buffer, Extent
from repdisk.block.overlay import Overlay, coalesce
from repdisk.block.rangelock import FairRangeLock
from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError, check_range
from repdisk.replication import fastpath
from repdisk.replication.framework import (
    Registry,
    ReplicationError,
    ReplicationMode,
    ReplicationOps,
    ReplicationState,
)
from repdisk.replication.stage import EventSink, Stage, StageMachine, no_events

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

__all__ = ["SecondaryReplica", "View", "Op", "Route", "gate"]


class View(enum.Enum):
    REPLICA = "replica"  # the primary writes here
    ACTIVE = "active"    # the secondary VM's disk


class Op(enum.Enum):
    READ = "read"        # pread and extents
    WRITE = "write"      # pwrite, zero, trim
    FLUSH = "flush"


class Route(enum.Enum):
    DISK = "disk"                            # straight to the secondary disk
    COPY_BEFORE_WRITE = "copy-before-write"  # old clusters into hidden, then the disk
    ACTIVE = "active"                        # the active overlay (reads fall through)
    SPLIT = "split"                          # per cluster: active where allocated in
                                             # active or hidden, else the disk


def gate(name: str, view: View, op: Op, stage: Stage) -> Route:
    """Where a request goes, or the BlockIOError that refuses it; the only I/O policy.

    Raises:
        BlockIOError: EIO before start (ESHUTDOWN on the replica view, which the
            primary reports as "not started yet") and for replica reads of a half-committed
            disk; EROFS for the primary's writes once failover has begun (fencing).
    """
    if stage is Stage.NONE:
        # ESHUTDOWN on the replica view: the primary tells "not started yet" from a failure.
        raise BlockIOError(errno.ESHUTDOWN if view is View.REPLICA else errno.EIO,
                           f"{name}: {view.value} {op.value} refused: replication not started")
    if view is View.REPLICA:
        return _replica_route(name, op, stage)
    if stage is Stage.DONE:
        return Route.DISK
    if stage is Stage.FAILOVER_FAILED and op is not Op.READ:
        return Route.SPLIT
    return Route.ACTIVE


def _replica_route(name: str, op: Op, stage: Stage) -> Route:
    if op is Op.READ:
        if stage is Stage.FAILOVER_FAILED:
            raise BlockIOError(errno.EIO, f"{name}: replica read refused: the failover commit "
                                          "failed and the disk is half committed")
        return Route.DISK
    if stage is not Stage.RUNNING:
        raise BlockIOError(errno.EROFS, f"replication of {name} is over (stage {stage.value}): "
                                        "refusing the old primary's write")
    return Route.COPY_BEFORE_WRITE if op is Op.WRITE else Route.DISK


class _ReplicaView:
    """A ``BlockDevice`` facade over one view; every call goes to ``SecondaryReplica._io``."""

    def __init__(self, owner: SecondaryReplica, view: View,
                 fast_cell: fastpath.Cell | None = None) -> None:
        self._owner = owner
        self._view = view
        self.size = owner.size
        #: The replica view's cell in the fast path (a session binds its connections).
        self.fast_cell = fast_cell

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._owner._io(self._view, Op.READ, "pread", offset, len(buf), buf)

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        self._owner._io(self._view, Op.WRITE, "pwrite", offset, len(buf), buf, fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._owner._io(self._view, Op.WRITE, "zero", offset, length, None, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._owner._io(self._view, Op.WRITE, "trim", offset, length, None, fua)

    def flush(self) -> None:
        self._owner._flush(self._view)

    def extents(self, offset: int, length: int) -> list[Extent]:
        extents = self._owner._io(self._view, Op.READ, "extents", offset, length)
        assert extents is not None  # a read's answer
        return extents

    def __repr__(self) -> str:
        return f"<{self._owner.name} {self._view.value} view>"


class SecondaryReplica:
    """One replicated disk on the secondary node (a node may hold several).

    Owns the three images it is given (``disk``, ``hidden_overlay``, ``active_overlay``):
    ``close`` closes them.  Serves them through ``replica_view`` and ``active_view``.
    """

    def __init__(self, name: str, disk: RawImage, hidden: Overlay, active: Overlay, *,
                 events: EventSink = no_events) -> None:
        self.name = name
        self.disk = disk
        self.hidden_overlay = hidden
        self.active_overlay = active
        self.size = disk.size
        self.cluster_size = hidden.cluster_size
        if active.cluster_size != hidden.cluster_size:
            raise ReplicationError(f"{name}: the active overlay's cluster size "
                                   f"{active.cluster_size} differs from the hidden overlay's "
                                   f"{hidden.cluster_size}; recreate them with one cluster size")
        self.sm = StageMachine(name, ReplicationMode.SECONDARY, events)
        # Cluster-rounded byte ranges of the disk; see the module docstring for who holds what.
        self._ranges = FairRangeLock()
        # Guards _counters only (they are bumped by nbdkit's worker threads).
        self._counters_lock = threading.Lock()
        self._counters = dict.fromkeys(
            ("replica_writes", "replica_bytes", "cbw_bytes", "active_writes", "checkpoints"), 0)
        self._last_checkpoint: dict[str, float] | None = None
        self.consistent = False
        #: The C fast path of replica writes (fastpath.py); None: the plugin serves all.
        self.fast_slot = fastpath.Slot.make_replica(hidden.bitmap, self.cluster_size)
        self._fast_cell = fastpath.Cell()
        self._fast_cell.point(self.fast_slot)
        self.replica_view: BlockDevice = _ReplicaView(self, View.REPLICA, self._fast_cell)
        self.active_view: BlockDevice = _ReplicaView(self, View.ACTIVE)

    @classmethod
    def open(cls, name: str, disk_path: str, hidden_path: str | None = None,
             active_path: str | None = None, *, cluster_size: int,
             events: EventSink = no_events) -> SecondaryReplica:
        """Open the disk and its two overlays (``DISK.hidden``, ``DISK.active`` by default).
        ``cluster_size`` has no default here: the node's is its key table's ``cluster-size``.

        Missing overlays are created empty; present ones are validated against the
        disk's length and ``cluster_size`` by ``Overlay.open``.
        """
        disk = RawImage.open(disk_path)
        try:
            return cls.over(name, disk, hidden_path or disk_path + ".hidden",
                            active_path or disk_path + ".active", cluster_size, events)
        except BaseException:
            disk.close()
            raise

    @classmethod
    def over(cls, name: str, disk: RawImage, hidden_path: str, active_path: str,
             cluster_size: int, events: EventSink = no_events) -> SecondaryReplica:
        """A secondary over a disk that is already open (a demoted primary's); the overlays
        are opened or created as :meth:`open` does.  The disk stays the caller's on failure."""
        hidden = _open_overlay(hidden_path, disk, cluster_size)
        try:
            active = _open_overlay(active_path, hidden, cluster_size)
        except BaseException:
            hidden.close()
            raise
        return cls(name, disk, hidden, active, events=events)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"SecondaryReplica({self.name!r}, stage={self.stage.value})"

    @property
    def stage(self) -> Stage:
        return self.sm.stage

    @property
    def error(self) -> str | None:
        return self.sm.error

    # -- transitions ------------------------------------------------------------

    def start(self, mode: ReplicationMode) -> None:
        """Check the chain, empty both overlays, go RUNNING; consistent only after a checkpoint.

        The overlays are emptied before the stage changes (QEMU does it after): every
        request is refused until RUNNING, so no write can slip in between, and a failure
        leaves the replica in NONE, ready for another start.
        """
        with self.sm.lock:
            if not self.sm.guard_start(mode):
                return
            self._check_chain()
            try:
                self._empty_buffers()
            except OSError as err:
                raise ReplicationError(f"{self.name}: cannot start: emptying the overlays "
                                       f"failed: {err}") from err
            self.consistent = False  # the disk holds whatever the primary wrote before
            self._set_stage(Stage.RUNNING)
            self.sm.clear_error()

    def checkpoint(self) -> None:
        """Drop the undo data: the disk as it is now becomes the secondary VM's base."""
        with self.sm.lock:
            if not self.sm.guard_running("checkpoint"):
                return
            self._checkpoint()

    def get_error(self) -> None:
        self.sm.get_error()

    def stop(self, failover: bool, progress: Progress | None = None) -> None:
        """End replication: with a checkpoint (failover=False) or by committing the overlays."""
        with self.sm.lock:
            if not self.sm.guard_running("stop"):
                return
            if not failover:
                self._checkpoint()
                self._set_stage(Stage.DONE)
                return
            self.begin_failover()
            self.resume_failover(progress)

    def begin_failover(self) -> bool:
        """A failover's first half: refuse an inconsistent one, refuse the primary's writes
        from now on, make both overlays durable (their bitmaps on disk then hold every
        buffered cluster, so a commit interrupted by a crash can be run again from them).

        Returns False when replication is already over (nothing to commit).  The node
        records that the commit is under way between this and :meth:`resume_failover`.
        """
        with self.sm.lock:
            if not self.sm.guard_running("fail over"):
                return False
            self.check_failover()
            self._set_stage(Stage.FAILOVER)  # from here on the replica view refuses writes
            try:
                with self._ranges.whole(self.size):
                    self.active_overlay.flush()
                    self.hidden_overlay.flush()
            except OSError as err:
                self._commit_failed(err)
            return True

    def resume_failover(self, progress: Progress | None = None) -> None:
        """A failover's second half, the commit: after :meth:`begin_failover`, or when a node
        reopens after a crash in the middle of it (stage NONE, the overlays as persisted).

        Running the commit again is safe: every cluster still in an overlay is written
        into the layer below once more, so whatever the crash left half done is redone.
        """
        with self.sm.lock:
            if self.stage is Stage.NONE:
                log.warning("%s: finishing a failover commit interrupted by a crash "
                            "(active %d bytes, hidden %d bytes still buffered)", self.name,
                            self.active_overlay.allocated_bytes,
                            self.hidden_overlay.allocated_bytes)
                self._set_stage(Stage.FAILOVER)
            elif self.stage is not Stage.FAILOVER:
                raise ReplicationError(f"{self.name}: no failover commit to finish "
                                       f"(stage {self.stage.value})")
            self._failover_commit(progress or functools.partial(self.sm.progress, "FAILOVER"))

    def reopen_done(self) -> None:
        """Reopened after its failover completed (the node's state says so): DONE again,
        as before the restart, the active view straight onto the disk.  A completed commit
        left the overlays empty; whatever they still hold is committed first."""
        with self.sm.lock:
            if self.stage is not Stage.NONE:
                raise ReplicationError(f"{self.name}: cannot reopen as done "
                                       f"(stage {self.stage.value})")
            if self.active_overlay.allocated_bytes or self.hidden_overlay.allocated_bytes:
                self.resume_failover()
                return
            self._set_stage(Stage.DONE)
            self.consistent = True      # the failover's disk: its last checkpoint and after

    def check_failover(self) -> None:
        """Refuse a failover that would hand the guest an inconsistent disk.

        A node fails over all its disks or none, so it asks every disk first.
        """
        if self.stage is Stage.RUNNING and not self.consistent:
            raise ReplicationError(
                f"{self.name}: cannot fail over: the secondary has no complete checkpoint "
                "since it started (e.g. a resync is in progress); failing over now would "
                "hand the guest an inconsistent disk")

    # -- framework glue -----------------------------------------------------------

    def ops(self) -> ReplicationOps:
        return ReplicationOps.bound_to(self)

    def register(self, registry: Registry) -> ReplicationState:
        return registry.new(self, self.ops())

    def query(self) -> dict[str, Any]:
        """A JSON-able snapshot for ``query-replication`` (never waits for a transition)."""
        with self._counters_lock:
            counters = dict(self._counters)
        fast = None if self.fast_slot is None else self.fast_slot.stats()
        if fast is not None:
            counters["replica_writes"] += fast["writes"]
            counters["replica_bytes"] += fast["bytes"]
        return {
            "disk": self.name, "mode": self.sm.mode.value, "stage": self.stage.value,
            "error": self.error, "consistent": self.consistent,
            "hidden_bytes": self.hidden_overlay.allocated_bytes,
            "active_bytes": self.active_overlay.allocated_bytes,
            "counters": counters,
            "last_checkpoint": dict(self._last_checkpoint) if self._last_checkpoint else None,
            "fast_path": fast,
        }

    def close(self, disk: bool = True) -> None:
        """Flush and close the overlays, then the disk (``disk=False``: a promoted node's
        primary owns it now)."""
        try:
            self._fast_drain(False)
        except ReplicationError as err:
            log.warning("%s: closing with %s", self.name, err)
        self._fast_cell.point(None)
        self.active_overlay.close()
        self.hidden_overlay.close()
        if disk:
            self.disk.flush()
            self.disk.close()

    # -- transition helpers (called with sm.lock held) ------------------------------

    def _set_stage(self, stage: Stage) -> None:
        """The one setter of the stage: the fast path serves replica writes only while
        it is RUNNING, and none is under way in C when it changes."""
        with self._fast_held():
            self.sm.set_stage(stage)

    @contextlib.contextmanager
    def _fast_held(self) -> Iterator[None]:
        """Every replica write comes through the plugin (and its range locks) meanwhile;
        afterwards the fast path serves them again if the stage is RUNNING.  Raises
        ReplicationError (nothing done) if writes under way in C do not end in time."""
        self._fast_drain(False)
        try:
            yield
        finally:
            self._fast_drain(self.stage is Stage.RUNNING)

    def _fast_drain(self, armed: bool) -> None:
        """Arm or disarm the fast path; disarming waits for the writes in C to end."""
        slot = self.fast_slot
        if slot is None:
            return
        slot.set(self.disk.fd, None, 0, armed)
        if not armed and not slot.wait(fastpath.DRAIN_TIMEOUT):
            raise ReplicationError(f"{self.name}: replica writes under way did not finish "
                                   f"within {fastpath.DRAIN_TIMEOUT:g}s (is the disk hung?); "
                                   "retry once they have")

    def _check_chain(self) -> None:
        """Equal lengths first (an overlay made for another disk shows up here), then links."""
        sizes = (self.active_overlay.size, self.hidden_overlay.size, self.disk.size)
        if len(set(sizes)) != 1:
            raise ReplicationError(f"{self.name}: active disk, hidden disk, secondary disk's "
                                   f"length are not the same ({sizes[0]}, {sizes[1]}, "
                                   f"{sizes[2]} bytes); recreate the overlays for this disk")
        if (self.active_overlay.backing is not self.hidden_overlay
                or self.hidden_overlay.backing is not self.disk):
            raise ReplicationError(f"{self.name}: the chain must be active -> hidden -> disk: "
                                   "the active overlay must be backed by the hidden overlay "
                                   "and the hidden overlay by the secondary disk")

    def _empty_buffers(self) -> None:
        """Flush the disk, then empty active and hidden: the checkpoint's core (start uses it)."""
        with self._fast_held(), self._ranges.whole(self.size):
            self.disk.flush()  # the primary's writes are durable before their undo data goes
            try:
                self.active_overlay.make_empty()
                self.hidden_overlay.make_empty()
            except BaseException:
                self.consistent = False  # neither the old nor the new checkpoint is whole now
                raise

    def _checkpoint(self) -> None:
        t0 = time.monotonic()
        try:
            self._empty_buffers()
        except OSError as err:
            self.sm.record_error(f"checkpoint failed: {err}")
            raise ReplicationError(f"{self.name}: checkpoint failed: {err}") from err
        duration = time.monotonic() - t0
        self.consistent = True
        self._last_checkpoint = {"time": time.time(), "duration": duration}
        self._count(checkpoints=1)
        self.sm.events("CHECKPOINT_COMPLETED", {"disk": self.name, "mode": self.sm.mode.value,
                                              "duration": duration})

    def _failover_commit(self, progress: Progress | None) -> None:
        """Commit active into hidden, hidden into the disk; DONE, or FAILOVER_FAILED.

        ``progress`` is handed to both commits, so it sees two runs of (done, total).
        """
        t0 = time.monotonic()
        try:
            with self._ranges.whole(self.size):
                self.active_overlay.commit(progress)
                committed = self.hidden_overlay.commit(progress)  # holds active's clusters too now
                self.disk.flush()
        except Exception as err:
            self._commit_failed(err)
        self._set_stage(Stage.DONE)
        self.consistent = True  # checked before the commit began, or before the crash
        self.sm.clear_error()
        self.sm.events("FAILOVER_COMPLETED", {"disk": self.name,
                                            "duration": time.monotonic() - t0,
                                            "bytes": committed})

    def _commit_failed(self, err: Exception) -> NoReturn:
        self._set_stage(Stage.FAILOVER_FAILED)
        self.sm.clear_error()  # the failed commit is what get_error must report now
        self.sm.record_error(f"failover commit failed: {err}")
        raise ReplicationError(f"{self.name}: failover commit failed: {err}; the disk "
                               "is half committed (stage failover-failed)") from err

    # -- I/O -------------------------------------------------------------------------

    def prefetch(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Start reading from the disk, all at once, the clusters that replica writes of
        these (offset, length) ranges will copy before writing (those hidden lacks;
        ``posix_fadvise(WILLNEED)``, which queues the reads and returns), so that copies
        run one after another overlap their reads on a cold cache instead of each waiting
        for its own.  Returns those clusters as ascending (first, count) runs; none before
        start.  Changes nothing and refuses nothing: the writes take the gate and the
        locks.  A single run gets no hint: its copy reads it at once anyway.
        """
        if self.stage is not Stage.RUNNING:
            return []
        cs, allocated = self.cluster_size, self.hidden_overlay.is_allocated
        runs = list(coalesce(sorted({c for offset, length in ranges
                                     for c in range(offset // cs, -(-(offset + length) // cs))
                                     if not allocated(c)})))
        try:
            for first, count in runs if len(runs) > 1 else ():
                os.posix_fadvise(self.disk.fd, first * cs, count * cs, os.POSIX_FADV_WILLNEED)
        except OSError as err:  # a hint: the copy reads what it needs anyway
            log.debug("%s: prefetch not given: %s", self.name, err)
        return runs

    def write_record(self, pieces: Sequence[tuple[int, Buffer]], fua: bool = False) -> None:
        """Write a batch record's pieces, ``(offset, bytes)`` already checked against the
        disk, through the replica view as one request.

        The result is that of ``replica_view.pwrite`` of each piece in turn, for less work
        per piece: one gate and one range lock over the pieces' span, then one
        copy-before-write pass over every cluster they touch that hidden lacks (their
        reads started together by ``prefetch``), then the pieces in order.  Copying
        before any piece is written is what each piece's own copy would have seen: a
        cluster not in hidden holds on the disk what it held at the last checkpoint.
        """
        lo = min(offset for offset, _ in pieces)
        start, end = self._round(lo, max(offset + len(buf) for offset, buf in pieces) - lo)
        cs, hidden, disk = self.cluster_size, self.hidden_overlay, self.disk
        with self._ranges.exclusive(start, end):
            gate(self.name, View.REPLICA, Op.WRITE, self.sm.stage)  # raises when refused
            try:
                copied = 0
                for first, count in self.prefetch((o, len(b)) for o, b in pieces):
                    at = first * cs
                    copied += hidden.copy_from_backing(at, min(count * cs, self.size - at))
                for offset, buf in pieces:
                    disk.pwrite(buf, offset, fua)
            except OSError as err:  # BlockIOError included: the images name the file and call
                raise self._write_failed(View.REPLICA, f"record of {len(pieces)} pieces at "
                                                       f"{pieces[0][0]}", err) from err
        self._count_replica_writes(len(pieces), sum(len(buf) for _, buf in pieces), copied)

    def _io(self, view: View, op: Op, call: str, offset: int, length: int,
            buf: Buffer | None = None, fua: bool = False) -> list[Extent] | None:
        """Check the range, lock it, ask the gate, run ``call`` on the route it names;
        the extents for ``extents``, else None."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            check_range(self.size, offset, length, op is Op.WRITE)  # raises: names what is wrong
        start, end = self._round(offset, length)
        lock = self._ranges.shared if op is Op.READ else self._ranges.exclusive
        with lock(start, end):
            route = gate(self.name, view, op, self.sm.stage)
            if op is Op.READ:
                return self._read(route, call, offset, length, buf)
            self._write(view, route, call, offset, length, buf, fua)
        return None

    def _read(self, route: Route, call: str, offset: int, length: int,
              buf: Buffer | None) -> list[Extent] | None:
        dev: RawImage | Overlay = self.disk if route is Route.DISK else self.active_overlay
        if call == "extents":
            return dev.extents(offset, length)
        assert buf is not None  # pread passes its buffer
        dev.pread_into(buf, offset)
        return None

    def _write(self, view: View, route: Route, call: str, offset: int, length: int,
               buf: Buffer | None, fua: bool) -> None:
        try:
            if route is Route.COPY_BEFORE_WRITE:
                copied = self.hidden_overlay.copy_from_backing(offset, length)
                _apply(self.disk, call, offset, length, buf, fua)
                self._count_replica_writes(1, length, copied)
                return
            if route is Route.SPLIT:
                self._split_write(call, offset, length, buf, fua)
            else:
                _apply(self.disk if route is Route.DISK else self.active_overlay,
                       call, offset, length, buf, fua)
            self._count(active_writes=1)
        except OSError as err:  # BlockIOError included: the images name the file and call
            raise self._write_failed(view, f"{call} of {length} bytes at {offset}", err) from err

    def _write_failed(self, view: View, what: str, err: OSError) -> BlockIOError:
        """The EIO a failed write of ``view`` answers; a lost primary write (the replica
        view) breaks replication and is recorded, a VM's does not."""
        if view is View.REPLICA:
            self.sm.record_error(f"{view.value} {what} failed: {err}")
        return BlockIOError(errno.EIO, f"{self.name}: {view.value} {what} failed: {err}")

    def _split_write(self, call: str, offset: int, length: int,
                     buf: Buffer | None, fua: bool) -> None:
        """FAILOVER_FAILED: per cluster, active if active or hidden holds it, else the disk."""
        data = memoryview(buf) if buf is not None else None
        cs, end = self.cluster_size, offset + length
        pos = offset
        while pos < end:
            stop = min(end, (pos // cs + 1) * cs)
            cluster = pos // cs
            buffered = (self.active_overlay.is_allocated(cluster)
                        or self.hidden_overlay.is_allocated(cluster))
            piece = data[pos - offset:stop - offset] if data is not None else None
            dev = self.active_overlay if buffered else self.disk
            _apply(dev, call, pos, stop - pos, piece, fua)
            pos = stop

    def _flush(self, view: View) -> None:
        """Flush what the view writes into; the hidden overlay's undo data needs no
        durability (start empties it, so it never outlives a restart)."""
        route = gate(self.name, view, Op.FLUSH, self.stage)
        targets: dict[Route, tuple[BlockDevice, ...]] = {
            Route.DISK: (self.disk,), Route.ACTIVE: (self.active_overlay,),
            Route.SPLIT: (self.active_overlay, self.disk)}
        try:
            for dev in targets[route]:
                dev.flush()
        except OSError as err:
            if view is View.REPLICA:
                self.sm.record_error(f"{view.value} flush failed: {err}")
            raise BlockIOError(errno.EIO, f"{self.name}: {view.value} flush failed: {err}") from err

    def _round(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        return offset // cs * cs, min(self.size, -(-(offset + length) // cs) * cs)

    def _count_replica_writes(self, writes: int, nbytes: int, copied: int) -> None:
        """The per-request counters of the replica view (no keyword dict on the hot path)."""
        counters = self._counters
        with self._counters_lock:
            counters["replica_writes"] += writes
            counters["replica_bytes"] += nbytes
            counters["cbw_bytes"] += copied

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for key, delta in deltas.items():
                self._counters[key] += delta


def _open_overlay(path: str, backing: BlockDevice, cluster_size: int) -> Overlay:
    """Open the overlay at ``path``, or create it if neither of its files exists.

    A bitmap without its data file is refused, never replaced: it says which clusters the
    overlay held, and only the operator knows whether the data file was removed on purpose.
    """
    if os.path.exists(path):
        return Overlay.open(path, backing, cluster_size=cluster_size)
    bitmap = path + ".bitmap"
    if os.path.lexists(bitmap):
        raise ReplicationError(
            f"overlay bitmap {bitmap} was found without its data file {path} (removed, or "
            "lost in a crash while it was created): the overlay cannot be read without it. "
            f"Put {path} back if it was moved; otherwise remove {bitmap} and start the node "
            "again: it creates both files empty (a secondary's start empties them anyway)")
    return Overlay.create(path, backing, cluster_size=cluster_size)


def _apply(dev: BlockDevice, call: str, offset: int, length: int,
           buf: Buffer | None, fua: bool) -> None:
    """Run one write-class call (pwrite, zero, trim) on ``dev``."""
    if call == "pwrite":
        assert buf is not None
        dev.pwrite(buf, offset, fua)
    elif call == "zero":
        dev.zero(offset, length, fua)
    else:
        dev.trim(offset, length, fua)
