"""The primary side of a replicated disk: its stage transitions, as QEMU's block/replication.c.

The guest is served in every stage (**repdisk**: QEMU's primary node serves no I/O
itself).  Reads come from the local disk; a write goes to the local disk and then where
the write path's gate routes it (writepath.py: ``sync`` forwards it and waits for the
secondary; ``async``, writeback.py, writes it back from the dirty map).  The parts:

* :class:`~repdisk.replication.writepath.WritePath` -- the guest's disk (``view``), a
  strategy per write mode with its own state;
* :class:`~repdisk.replication.link.Link` -- the connection to the secondary: connect,
  degrade, failure, probe, seal;
* :class:`~repdisk.replication.copier.Copier` -- resync's copy, the disks' comparison;
* :class:`PrimaryReplica` (here) -- one function per transition (``start``,
  ``checkpoint``, ``resume``, ``stop``, ``resync``, ``verify``), each under ``sm.lock``
  with guard clauses first; only these write the stage.

Every write *not* known to be on the secondary (made before ``start``, after ``stop``,
while degraded, whose forward failed or timed out, or, in async mode, not yet sent) is
marked in the :class:`~repdisk.block.dirtymap.DirtyMap`, so ``resync`` (and the async
write-back) copies exactly those regions.  A failing or hanging secondary never fails a
guest write and never stalls one past ``timeout``: the write is local, its range is
dirty, the link is *degraded* (``get_error`` reports why) until ``resync``.

Checkpoints follow DESIGN.md: ``checkpoint()`` = hold + barrier, ``resume()`` (or
``timeout / 2``) ends the hold.  A degraded primary, or a sync one with dirty bytes,
refuses a checkpoint: the secondary's last good checkpoint must never be replaced by an
incomplete one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from repdisk.block.device import BlockDevice
from repdisk.block.dirtymap import DirtyMap
from repdisk.block.rawimage import RawImage
from repdisk.errors import ConfigError
from repdisk.replication.copier import Copier, Progress
from repdisk.replication.framework import (
    Registry,
    ReplicationError,
    ReplicationMode,
    ReplicationOps,
    ReplicationState,
)
from repdisk.replication.link import Link
from repdisk.replication.sessions import writer_id
from repdisk.replication.settings import PrimarySettings
from repdisk.replication.stage import EventSink, Stage, StageMachine, no_events
from repdisk.replication.writeback import WriteBack
from repdisk.replication.writepath import WriteMode, WritePath, WriteThrough

log = logging.getLogger(__name__)

__all__ = ["PrimaryReplica", "PrimarySettings", "WRITE_MODES", "RESYNC_CHUNK"]

WRITE_MODES = tuple(m.value for m in WriteMode)
#: resync (and the async write-back) copies a dirty run in pieces of at most this many bytes.
RESYNC_CHUNK = 4 << 20
#: async: the dirty map's grain.  Every guest write is marked, so a fine grain sends no more
#: than was written (the secondary's lag at the end of a random-write job grows with it:
#: bench/README.md).
ASYNC_GRANULARITY = 4096


class PrimaryReplica:
    """One primary disk: every primary transition; the guest's I/O is ``view``'s."""

    def __init__(self, name: str, disk: RawImage, secondary_uri: str | None,
                 settings: PrimarySettings, *, granularity: int | None = None,
                 events: EventSink = no_events, export_suffix: str = "") -> None:
        write_mode, timeout, window, max_lag, resync_rate = (
            settings.write_mode, settings.timeout, settings.window, settings.max_lag,
            settings.resync_rate)
        if write_mode not in WRITE_MODES:
            raise ConfigError("write-mode", f"unknown write mode {write_mode!r}; "
                                            f"use {' or '.join(WRITE_MODES)}")
        if not timeout > 0:
            raise ConfigError("timeout", f"the timeout must be positive, not {timeout}")
        if window < 1:
            raise ConfigError("window", f"the window must be at least 1, not {window}")
        if max_lag < 1:
            raise ConfigError("max-lag", f"the lag bound must be positive, not {max_lag}")
        mode = WriteMode(write_mode)
        self.name = name
        self.disk = disk
        self.secondary_uri = secondary_uri
        self.write_mode = write_mode
        #: async: most bytes unsent before guest writes wait (query's ``max_lag``).
        self.max_lag = max_lag
        self.timeout = float(timeout)
        self.events = events
        self.sm = StageMachine(name, ReplicationMode.PRIMARY, events)
        if granularity is None:
            granularity = ASYNC_GRANULARITY if mode is WriteMode.ASYNC else 65536
        self.dirty = DirtyMap(disk.size, granularity)
        # Resync and the write-back copy RESYNC_CHUNK in whole granules (clear() only
        # clears whole granules).
        piece_size = max(RESYNC_CHUNK // granularity, 1) * granularity
        #: How fast resync copies while the guest runs (resyncrate.py).
        self.resync_rate = resync_rate
        #: The last verify's summary (node.verify): time, compared, ranges, bytes, repaired.
        self.last_verify: dict[str, Any] | None = None
        self.link = Link(name, secondary_uri, self.dirty, self.sm, timeout=self.timeout,
                         window=window, export_suffix=export_suffix,
                         writer=writer_id(disk.named()))
        self.write_path: WritePath
        if mode is WriteMode.ASYNC:
            self.write_path = WriteBack(name, disk, self.dirty, self.link, self.sm,
                                        self.timeout, max_lag, piece_size)
        else:
            self.write_path = WriteThrough(name, disk, self.dirty, self.link, self.sm,
                                           self.timeout)
        #: The guest's disk: served in every stage, whatever the secondary does.
        self.view: BlockDevice = self.write_path
        self.copier = Copier(name, self.write_path, self.link, self.sm, rate=resync_rate,
                             piece_size=piece_size)
        self._checkpoints = 0
        self._last_checkpoint: dict[str, float] | None = None
        #: Nothing is known of what the secondary lacks (this primary did not stop cleanly,
        #: node.py): the first copy compares the disks by digest first (_copy).
        self.compare_first = False
        #: The secondary disk (its DISK_ID) the dirty map is of, as the node recorded it
        #: (None: not known), and the one the link reached last.
        self.known_peer: str | None = None
        self.peer_disk: str | None = None
        #: A start is under way (it connects and copies; the stage is still NONE): a
        #: controller that came after the one which asked for it waits instead.
        self.starting = False

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
        """A checkpoint hold is under way (between checkpoint and resume)."""
        return self.write_path.holding

    @property
    def degraded(self) -> bool:
        """Writes are not forwarded until a resync (the link failed)."""
        return self.link.degraded

    @property
    def epoch(self) -> int:
        """The pair's epoch, set by the node at start; every connection names it."""
        return self.link.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.link.epoch = epoch

    # -- transitions ---------------------------------------------------------------

    def start(self, mode: ReplicationMode, progress: Progress | None = None) -> None:
        """Connect, copy what is dirty, then RUNNING; ignored once DONE."""
        with self.sm.lock:
            if not self.sm.guard_start(mode):
                return
            self.starting = True
            try:
                with self.write_path.exclusive("start"):
                    self._link_up()
                    try:
                        self._copy(progress)
                    except BaseException:
                        # A refused start changes nothing: the link DOWN as before it
                        # (what its copy did not send stays dirty), no error kept.
                        self.link.stop()
                        self.sm.clear_error()
                        raise
                self.sm.set_stage(Stage.RUNNING)
                self.sm.clear_error()
            finally:
                self.starting = False

    def checkpoint(self) -> None:
        """Barrier + hold: every write acknowledged before is on the secondary, later ones wait."""
        with self.sm.lock:
            if not self.sm.guard_running("checkpoint"):
                return
            began = time.monotonic()
            self.resume()  # a hold left from an earlier checkpoint: it is covered by this one
            gen = self._hold_in_sync("checkpoint", "resync before checkpointing")
            fwd = self.link.forwarder
            assert fwd is not None  # RUNNING and not degraded
            if not fwd.barrier(self.timeout):
                self.resume()
                why = fwd.error or f"no answer within {self.timeout:g}s"
                self.link.degrade(f"checkpoint barrier on the secondary {self.secondary_uri} "
                                  f"failed: {why}")
                raise ReplicationError(f"{self.name}: checkpoint failed: the secondary did not "
                                       f"confirm the writes: {why}")
            if not self.write_path.still_holding(gen):
                # Later writes were released before the secondary confirmed the earlier
                # ones: the secondary's disk is not a closed set, so no checkpoint now.
                raise ReplicationError(
                    f"{self.name}: checkpoint failed: the secondary took longer than the hold "
                    f"({self.timeout / 2:g}s, half the timeout) to confirm the writes; retry, "
                    "or raise the timeout")
            try:
                self.link.mark_checkpoint()      # the secondary's checkpoint may follow
            except ReplicationError:
                self.resume()
                raise
            duration = time.monotonic() - began
            self._checkpoints += 1
            self._last_checkpoint = {"time": time.time(), "duration": duration}
            self.sm.events("CHECKPOINT_COMPLETED", {"disk": self.name, "mode": self.sm.mode.value,
                                                    "duration": duration})

    def resume(self) -> None:
        """End the checkpoint hold: held writes are sent.  No hold: nothing to do."""
        self.write_path.end_hold()

    def get_error(self) -> None:
        self.sm.get_error()

    def stop(self, failover: bool) -> None:
        """DONE.  failover=True: the secondary is lost; False: first a barrier.  Keep serving."""
        with self.sm.lock:
            if not self.sm.guard_running("stop"):
                return
            self.resume()  # a barrier covers only what a hold let through
            fwd = self.link.forwarder
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
            self.link.stop()
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
                then = ("restart the node to replicate again" if self.sm.finished()
                        else "start it instead")
                raise ReplicationError(f"{self.name}: cannot resync: replication is not running "
                                       f"(stage {self.sm.stage.value}); {then}")
            with self.write_path.exclusive("resync"):
                fwd = self.link.forwarder
                if self.link.degraded or fwd is None or fwd.failed:
                    self.link.drop()
                    try:
                        self._link_up()
                    except ReplicationError as err:
                        self.link.still_degraded(str(err).removeprefix(f"{self.name}: "))
                        raise
                sent = self._copy(progress)
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
        moment with no writer between its write and its mark) before it is.  Paced like
        a resync (resync_rate).  Raises ReplicationError if replication is not running
        in sync, or the link fails (the verify stops; what it found so far is in the
        message).
        """
        if self.sm.stage is not Stage.RUNNING:
            raise ReplicationError(f"{self.name}: cannot verify: replication is not running "
                                   f"(stage {self.sm.stage.value})")
        if self.link.sending is None:
            raise ReplicationError(f"{self.name}: cannot verify: the secondary is not in sync "
                                   f"({self.dirty.dirty_bytes} bytes dirty); resync first")
        with self.write_path.exclusive("verify"):
            return self.copier.verify(runs, progress)

    # -- the transitions' steps ----------------------------------------------------------

    def _link_up(self) -> None:
        """Connect (a write-back's forwarder pulls from its source); raises
        ReplicationError if the secondary is unfit.  A secondary whose disk is new to it
        (replaced, swapped, its state lost) makes the next copy compare first."""
        self.link.up(self.write_path.source, self.write_path.source_wake)
        unknown, self.peer_disk = self.link.peer_replica()
        if not self.compare_first and unknown:
            log.warning("%s: the secondary %s says its disk is new to it: comparing the "
                        "disks before copying", self.name, self.link.uri)
            self.compare_first = True
        elif not self.compare_first and None not in (self.known_peer, self.peer_disk) \
                and self.peer_disk != self.known_peer:
            log.warning("%s: the secondary %s serves another disk than the one this "
                        "primary's dirty map is of: comparing the disks before copying",
                        self.name, self.link.uri)
            self.compare_first = True

    def _copy(self, progress: Progress | None) -> int:
        """Compare first if nothing is known of the secondary, then copy what is dirty."""
        if self.compare_first:
            self.copier.compare()
            self.compare_first = False
        return self.copier.copy(progress)

    def _require_in_sync(self, op: str, hint: str) -> None:
        """Refuse ``op`` unless every write is known to be on the secondary."""
        dirty = self.dirty.dirty_bytes
        if self.compare_first:
            raise ReplicationError(f"{self.name}: cannot {op}: this primary has not compared "
                                   "its disk with the secondary's yet (it did not stop "
                                   "cleanly, or the secondary's disk is new to it); "
                                   f"{hint}")
        if self.link.degraded or dirty:
            raise ReplicationError(f"{self.name}: cannot {op}: the secondary is not in sync: "
                                   f"{dirty} bytes dirty; {hint}")

    def _hold_in_sync(self, op: str, hint: str) -> int:
        """Begin a hold after which a barrier covers every earlier write; returns the
        hold's generation.  Raises ReplicationError (no hold) if the secondary is not in
        sync: degraded, or in sync mode with dirty bytes (the write-back's dirty bytes
        are its lag, which the barrier sends)."""
        if not self.write_path.write_back or self.link.degraded:
            self._require_in_sync(op, hint)
        return self.write_path.hold(op)

    # -- the link, for the node --------------------------------------------------------

    def seal(self) -> None:
        """Tell the secondary it holds every acknowledged write (Link.seal; a demote)."""
        self.link.seal()

    def probe(self) -> None:
        """Check that the secondary answers and has this disk's size (node start-up)."""
        self.link.probe()

    def link_acks(self) -> int | None:
        """Requests the secondary acknowledged on the current link; None when not forwarding."""
        return self.link.acks()

    def probe_link(self) -> None:
        """Send a flush on an idle link outside a hold, so that an idle secondary still
        proves it answers (and a dead one is noticed before the next guest write)."""
        if not self.write_path.holding:
            self.link.probe_idle()

    # -- framework, observability, teardown ---------------------------------------------

    def ops(self) -> ReplicationOps:
        return ReplicationOps.bound_to(self)

    def register(self, registry: Registry) -> ReplicationState:
        return registry.new(self, self.ops())

    def query(self) -> dict[str, Any]:
        fwd = self.link.forwarder
        path = self.write_path
        written = path.counts()
        counters = {"writes": written["writes"], "bytes": written["bytes"],
                    "forwarded": written["forwarded"] + self.copier.sent,
                    "forward_errors": self.link.errors, "checkpoints": self._checkpoints,
                    "blocks_from_memory": path.blocks.taken}
        unsent = path.unsent_bytes
        # async and forwarding: unsent bytes are the write-back's lag, not a resync's work.
        lagging = path.write_back and self.link.sending is not None
        return {
            "disk": self.name,
            "mode": self.sm.mode.value,
            "stage": self.sm.stage.value,
            "writer": self.link.writer,     # its sessions' name on the secondary
            "starting": self.starting,
            "error": self.sm.error,
            "degraded": self.link.degraded,
            "write_mode": self.write_mode,
            "max_lag": self.max_lag,
            "resync_rate": self.resync_rate.describe(),
            "last_verify": self.last_verify,
            "verify_progress": self.copier.verify_progress,
            "dirty_bytes": 0 if lagging else unsent,
            "in_flight": fwd.in_flight if fwd else 0,
            "queued": fwd.queued if fwd else 0,
            # acknowledged to the guest (or being written) but not yet confirmed by the secondary
            "lag_bytes": (unsent if lagging else 0) + (fwd.in_flight_bytes if fwd else 0),
            "counters": counters,
            "link": dict(fwd.stats) if fwd else None,
            "last_checkpoint": dict(self._last_checkpoint) if self._last_checkpoint else None,
            "holding": path.holding,
            "compare_first": self.compare_first,
            # the C fast path of writes (fastpath.py): None without one
            "fast_path": path.fast_query(),
        }

    def close(self) -> None:
        """Drop the link (unacknowledged writes become dirty) and close the local disk.

        Async mode first tries to send what is unsent, so a node shut down cleanly leaves
        its secondary with every acknowledged write; failing that, it stays dirty."""
        with self.sm.lock:
            self.resume()
            if (self.write_path.write_back and self.sm.stage is Stage.RUNNING
                    and self.link.sending is not None):
                try:
                    self._copy(None)
                except ReplicationError as err:
                    log.warning("%s: closing with unsent writes: %s", self.name, err)
            self.link.drop()
        self.write_path.close()
        self.disk.close()
