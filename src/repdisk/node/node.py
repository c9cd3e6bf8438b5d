"""A repdisk node: one nbdkit process serving the disks of one consistency group.

The node turns checked keys (:class:`~repdisk.node.config.NodeConfig`) into replicas,
registers each in the node's own :class:`~repdisk.replication.framework.Registry` (so the
``*_all`` calls act on every disk of the group together), names their exports,
keeps the persisted epoch, and serves the control socket.  It holds no
replication logic of its own: every transition is the replicas'.

Exports: a primary serves each disk as ``NAME`` (the first one is the default
export).  A secondary serves ``replica/NAME`` (the primary writes here) and
``active/NAME`` (a secondary VM's view) for each disk, with ``replica`` and
``active`` naming the first disk and ``active`` the default export; each replica
export has an unlisted batch twin, ``replica/NAME+batch`` (batch.py), for an async
primary.

Guest-facing exports (a primary's ``NAME``, a secondary's ``active``) are
:class:`Export` objects: they delegate to the device behind them *now* and admit
writes through the node's :class:`Isolation` guard.  Promotion
(``replication-promote``) turns a failed-over secondary into a primary over the same
disks and switches its ``active`` exports to the new primaries' views; connections
already open keep their ``Export`` object, so they keep working and their writes are
replicated from then on.

A primary (born or promoted) fences itself when it hears from neither its secondary
nor the controller for ``isolation-timeout`` (see :class:`Isolation`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Union

from repdisk.block.device import BlockDevice
from repdisk.block.dirtymap import DirtyMap
from repdisk.block.imagelock import lock_image
from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError, ConfigError, ControlError, ForwardError, RepdiskError
from repdisk.node import threadstate
from repdisk.node.config import PRIMARY, SECONDARY, NodeConfig, default
from repdisk.node.state import NodeState
from repdisk.qmp.protocol import Command
from repdisk.qmp.server import QMPServer, serve_control
from repdisk.replication import batch, nbdclient, resync, sessions
from repdisk.replication.framework import Registry, ReplicationError, ReplicationMode
from repdisk.replication.primary import PrimaryReplica
from repdisk.replication.secondary import SecondaryReplica
from repdisk.replication.stage import EventSink, Stage
from repdisk.units import parse_duration

log = logging.getLogger(__name__)

Replica = Union[PrimaryReplica, SecondaryReplica]


class Export:
    """What nbdkit serves under one export name: the device behind it now, writes admitted.

    The plugin looks an export up when a connection opens and keeps the object for the
    connection's life, so switching ``target`` (promotion) reaches open connections too.
    """

    def __init__(self, target: BlockDevice, admission: Admission) -> None:
        self.target = target
        self.size = target.size
        self._admit = admission.enter
        self._done = admission.leave

    @property
    def target(self) -> BlockDevice:
        return self._target

    @target.setter
    def target(self, device: BlockDevice) -> None:
        # Reads are the most frequent request and need no admission: the target's own
        # method, one Python call fewer per read (rebound when promotion switches it).
        self._target = device
        self.pread_into = device.pread_into

    def pwrite(self, buf: bytes | memoryview, offset: int, fua: bool = False) -> None:
        self._admit()
        try:
            self.target.pwrite(buf, offset, fua)
        finally:
            self._done()

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._admit()
        try:
            self.target.zero(offset, length, fua)
        finally:
            self._done()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._admit()
        try:
            self.target.trim(offset, length, fua)
        finally:
            self._done()

    def flush(self) -> None:
        self.target.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return self.target.extents(offset, length)


class Admission:
    """Which guest writes the node lets in, and how many are under way.

    Every guest write (``Export``) enters and leaves here.  ``enter`` first passes the
    isolation guard (held while isolated, refused once fenced), then is refused with
    EROFS while the node refuses guest writes (a demoted primary); ``refuse`` waits
    until the writes already admitted have left, so a demote's barrier covers them all.
    """

    def __init__(self, isolation: Callable[[], Isolation | None]) -> None:
        self._isolation = isolation
        self._lock = threading.Lock()
        self._in_flight = 0
        self.refused = ""  # why guest writes are refused ("" = they are admitted)

    def enter(self) -> None:
        guard = self._isolation()
        if guard is not None:
            guard.admit()
        with self._lock:
            if self.refused:
                raise BlockIOError(errno.EROFS, f"guest write refused: {self.refused}")
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def refuse(self, why: str, timeout: float) -> bool:
        """Refuse new guest writes; True once none is under way, False (still refusing)
        if some did not finish within ``timeout``."""
        with self._lock:
            self.refused = why
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


class _SealView:
    """A secondary's ``replica/NAME+seal`` export as one writer session sees it: a write
    records that the primary of that session demoted cleanly (see Node.record_seal)."""

    def __init__(self, node: Node, gate: sessions.SessionFence, token: sessions.Token,
                 size: int) -> None:
        self._node, self._gate, self._token, self.size = node, gate, token, size

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))

    def pwrite(self, buf: bytes | memoryview, offset: int, fua: bool = False) -> None:
        self._gate.run_write(self._token, self._node.record_seal, self._gate.name,
                             self._token[0])

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        raise BlockIOError(errno.EINVAL, "the seal export takes one write")

    trim = zero

    def flush(self) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return [(offset, length, 3)]


class Isolation:
    """A primary's guard against split brain: no contact for ``timeout`` -> isolated.

    Contact is a controller heartbeat (:meth:`contact`) or an acknowledgement from the
    secondary (``secondary_answers``, polled by a monitor thread; it may probe an idle
    link).  Isolated with policy ``suspend``: guest writes wait in :meth:`admit` until
    contact returns (reads go on); with ``continue``: only reported.  Fenced (the
    controller failed over meanwhile): writes fail with EROFS for good.

    Armed by the first controller heartbeat: a primary that no controller manages
    (``repdisk lab``, tests of a bare pair) never suspends.  The controller must fail over
    only after its heartbeat-timeout, which must exceed ``timeout``: an isolated primary
    has then already stopped acknowledging writes.
    """

    def __init__(self, timeout: float, policy: str, secondary_answers: Callable[[], bool],
                 events: EventSink, fenced: str = "") -> None:
        self.timeout = timeout
        self.policy = policy
        self._secondary_answers = secondary_answers
        self._events = events
        # Guards every field below; waiters in admit() wait on it.
        self._cond = threading.Condition()
        self._armed = False
        self._last_contact = time.monotonic()
        self.isolated = False
        self.suspended = False
        self.fenced = fenced
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repdisk-isolation", daemon=True)
        self._thread.start()

    def admit(self) -> None:
        """Let a guest write through, hold it while suspended, refuse it once fenced."""
        if not self.suspended and not self.fenced:
            return
        with self._cond:
            while not self.fenced and self.suspended:
                self._cond.wait()
            if self.fenced:
                raise BlockIOError(errno.EROFS, f"guest write refused: this node is fenced: "
                                                f"{self.fenced}")

    def contact(self) -> None:
        """The controller was heard from (arms the guard)."""
        with self._cond:
            self._armed = True
            self._last_contact = max(self._last_contact, time.monotonic())
            self._update()

    def fence(self, reason: str) -> None:
        with self._cond:
            first = not self.fenced
            self.fenced = reason
            self._cond.notify_all()
        if first:
            log.error("fenced: %s; guest writes fail from now on", reason)
            self._events("NODE_FENCED", {"reason": reason})

    def _run(self) -> None:
        tick = min(self.timeout / 4, 0.25)
        looked = time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            # Ask the link only when contact is getting old: a probe costs a flush.
            if self._armed and now - self._last_contact > self.timeout / 3:
                if self._secondary_answers():
                    with self._cond:  # the acknowledgement came after the previous look
                        self._last_contact = max(self._last_contact, looked)
                looked = now
            with self._cond:
                self._update()

    def _update(self) -> None:
        """Re-evaluate isolation (``_cond`` held); log and report a change."""
        since = time.monotonic() - self._last_contact
        isolated = self._armed and since >= self.timeout
        if isolated == self.isolated:
            return
        self.isolated = isolated
        self.suspended = isolated and self.policy == "suspend"
        self._cond.notify_all()
        if isolated:
            log.error("isolated: no contact with the secondary or the controller for %.1fs; "
                      "guest writes %s", since,
                      "are held" if self.suspended else "go on (on-isolation=continue)")
            self._events("NODE_ISOLATED", {"policy": self.policy, "since": since})
        else:
            log.warning("contact restored; guest writes flow again")
            self._events("NODE_CONTACT_RESTORED", {})

    def query(self) -> dict[str, Any]:
        with self._cond:
            return {"policy": self.policy, "timeout": self.timeout, "armed": self._armed,
                    "isolated": self.isolated, "suspended": self.suspended,
                    "fenced": self.fenced or None,
                    "last_contact_age": round(time.monotonic() - self._last_contact, 3)}

    def close(self) -> None:
        """Stop the monitor; writes still held are refused (the node is going away)."""
        self._stop.set()
        self._thread.join()
        with self._cond:
            self.fenced = self.fenced or "the node is shutting down"
            self._cond.notify_all()


class ControllerLease:
    """One controller per pair: the controller heard from last holds this node's lease.

    Every command a controller sends names it (``controller``); a command from another
    controller is refused while the holder's lease is fresh (it was heard within
    ``duration`` seconds, which the holder's heartbeat sets).  Commands without a name
    (an operator's ``repdisk ctl``) pass.  Not persisted: a lease stands for a controller
    that is alive now, which a restarted node learns from the next heartbeat; a node that
    restarted grants it to the first controller it hears, and the other is refused from
    its next command on.  A controller that stops cleanly releases it (``lease`` 0).
    """

    #: Lease length until a heartbeat names one.
    DEFAULT = 10.0

    def __init__(self) -> None:
        # Guards the fields below (commands arrive on several control connections).
        self._lock = threading.Lock()
        self.holder: str | None = None
        self.duration = self.DEFAULT
        self._heard = 0.0

    def check(self, who: str | None, duration: float | None = None) -> None:
        """Grant or renew the lease to ``who``; raise if another controller holds it."""
        if who is None:
            return
        with self._lock:
            now = time.monotonic()
            if self.holder not in (None, who) and now - self._heard < self.duration:
                raise ControlError(
                    f"controller lease refused: controller {self.holder} holds this node "
                    f"(heard {now - self._heard:.1f}s ago, lease {self.duration:g}s); one "
                    "controller per pair: stop that controller first")
            if duration == 0:            # the holder stops cleanly: anyone may take it now
                if self.holder == who:
                    log.info("controller lease released by %s", who)
                    self.holder = None
                return
            if self.holder != who:
                log.info("controller lease granted to %s", who)
            self.holder, self._heard = who, now
            if duration is not None and duration > 0:
                self.duration = duration

    def query(self) -> dict[str, Any] | None:
        with self._lock:
            if self.holder is None:
                return None
            return {"holder": self.holder, "duration": self.duration,
                    "age": round(time.monotonic() - self._heard, 3)}


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.role = cfg.role
        self.mode = ReplicationMode(cfg.role)
        self.state = NodeState.load(cfg.state)
        self.instance = uuid.uuid4().hex  # tells the controller that this process restarted
        self.registry = Registry()
        self.replicas: dict[str, Replica] = {}
        self._retired: list[SecondaryReplica] = []  # a promoted node's former secondaries
        self.exports: dict[str, BlockDevice] = {}
        # Secondary: the writer gate of each replica export name (aliases share one).
        self._gates: dict[str, sessions.SessionFence] = {}
        self._server: QMPServer | None = None  # the control server, once serving
        self.isolation: Isolation | None = None
        self._acks: dict[str, int | None] = {}
        self.admission = Admission(lambda: self.isolation)
        self._state_lock = threading.Lock()  # the seal's writes of the state (nbdkit threads)
        self._demoted: list[PrimaryReplica] = []  # a demoted node's former primaries
        self.lease = ControllerLease()
        for spec in cfg.disks:
            replica = self._open_replica(spec.name, spec.path)
            self.replicas[spec.name] = replica
            self._lock(replica)
            replica.register(self.registry)
        self._state_file_lock = self._lock_state_file()
        self._name_exports()
        if self.state.failover_commit is not None:
            self._resume_failover()
        if self.mode is ReplicationMode.PRIMARY:
            self._recall_dirty()

    # -- building -------------------------------------------------------------

    def _open_replica(self, name: str, path: str) -> Replica:
        try:
            if self.mode is ReplicationMode.SECONDARY:
                hidden, active = self.cfg.overlays(path)
                return SecondaryReplica.open(name, path, hidden, active,
                                             cluster_size=self.cfg.cluster_size, events=self.emit)
            suffix = f"/{name}" if len(self.cfg.disks) > 1 else ""
            return PrimaryReplica(name, RawImage.open(path), self.cfg.secondary,
                                  write_mode=self.cfg.write_mode, timeout=self.cfg.timeout,
                                  window=self.cfg.window, max_lag=self.cfg.max_lag,
                                  resync_rate=self.cfg.resync_rate,
                                  events=self.emit, export_suffix=suffix)
        except ConfigError:
            raise
        except (RepdiskError, OSError, ValueError) as err:
            raise ConfigError("disk", f"{path}: {err}") from err

    def _lock(self, rep: Replica) -> None:
        """Mark every file the replica writes in use, as QEMU does (imagelock.lock_image): a
        second node, or a QEMU tool opening one for writing, is refused, naming this one."""
        try:
            rep.disk.lock()
            if isinstance(rep, SecondaryReplica):
                rep.hidden_overlay.lock()
                rep.active_overlay.lock()
        except BlockIOError as err:
            raise ConfigError("disk", str(err)) from err

    def _lock_state_file(self) -> int:
        """Lock ``STATE.lock`` (the state file itself is replaced on every save, so its
        lock would not last): two nodes given one state file are refused too."""
        path = self.cfg.state + ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError("state", f"cannot open {path}: {err.strerror}") from err
        try:
            lock_image(fd, self.cfg.state)
        except BlockIOError as err:
            os.close(fd)
            raise ConfigError("state", str(err)) from err
        return fd

    def _name_exports(self) -> None:
        if self.mode is ReplicationMode.PRIMARY:
            for name, rep in self.replicas.items():
                self.exports[name] = Export(rep.view, self.admission)  # type: ignore[union-attr]
            self.default_export = self.cfg.disks[0].name
            return
        self._secondary_exports()

    def _secondary_exports(self) -> None:
        """A secondary's exports; a demoted node's guest-facing ``Export`` objects are kept
        (open connections keep them) and switched to the secondaries' ``active`` views."""
        for i, (name, rep) in enumerate(self.replicas.items()):
            assert isinstance(rep, SecondaryReplica)
            active = self.exports.get(f"active/{name}") or self.exports.get(name)
            if isinstance(active, Export):
                active.target = rep.active_view
            else:
                active = Export(rep.active_view, self.admission)
            gate = sessions.SessionFence(name)
            aliases = [f"replica/{name}"] + (["replica"] if i == 0 else [])
            for replica in aliases:  # each with its batch and seal twins, one gate for all
                for export, dev in ((replica, rep.replica_view),
                                    (replica + batch.EXPORT_SUFFIX,
                                     batch.BatchView(rep.replica_view, rep.prefetch)),
                                    (replica + sessions.SEAL_SUFFIX, rep.replica_view)):
                    self.exports[export] = dev
                    self._gates[export] = gate
            for replica in aliases:  # read-only digests for a primary's own comparison
                self.exports[replica + resync.DIGEST_SUFFIX] = resync.DigestView(rep.disk)
            self.exports[f"active/{name}"] = active
            if i == 0:
                self.exports["active"] = active
        self.default_export = "active"

    def probe_secondary(self) -> None:
        """Primary: check at start-up that the secondary answers with equal sizes.

        A primary restarting (its state says it was one) serves its guest even if the
        secondary does not answer: both nodes may have died, and the primary's disk is
        then the only good copy; the controller syncs by checksum once the secondary is
        back.  A first start still refuses, as the URI is more likely wrong."""
        for rep in self.replicas.values():
            if isinstance(rep, PrimaryReplica):
                try:
                    rep.probe()
                except RepdiskError as err:
                    # The hint fits an unreachable secondary, not a size mismatch.
                    unreachable = isinstance(err, ForwardError) or isinstance(err.__cause__,
                                                                              ForwardError)
                    if unreachable and self.state.role == PRIMARY:
                        log.warning("%s; serving the guest alone until it is back", err)
                        continue
                    if unreachable:
                        self._check_disk_names()
                    hint = "; start the secondary first, or fix the URI" if unreachable else ""
                    raise ConfigError("secondary", f"{err}{hint}") from err

    def _check_disk_names(self) -> None:
        """A secondary that answers but lacks a disk's replica export: if it lists other
        disks, say that the names differ, with both lists (raises ConfigError)."""
        assert self.cfg.secondary is not None
        listed = nbdclient.list_exports(self.cfg.secondary, self.cfg.timeout)
        if not listed:
            return
        theirs = sorted({n.partition("/")[2] for n in listed if n.startswith("replica/")})
        ours = sorted(self.replicas)
        if theirs and len(self.replicas) > 1 and theirs != ours:
            raise ConfigError("secondary", f"the disk names differ: this primary has "
                                           f"{', '.join(ours)}; the secondary "
                                           f"{self.cfg.secondary} has {', '.join(theirs)}; "
                                           "give both nodes the same names (--disk NAME:PATH)")

    # -- serving ----------------------------------------------------------------

    def export(self, name: str) -> BlockDevice:
        """The device behind an export name; a primary's tagged ``replica...@EPOCH.GEN``
        connection gets a fenced session view (see sessions.py)."""
        base, token = sessions.split_tag(name)
        dev = self.exports.get(base or self.default_export)
        if dev is None or (token is not None and base not in self._gates):
            raise BlockIOError(errno.ENOENT, f"no export named {name!r}; this node serves "
                                             f"{', '.join(sorted(self.exports))}")
        if token is None:
            if base.endswith(sessions.SEAL_SUFFIX):
                raise BlockIOError(errno.EINVAL, f"export {name!r} is a primary's seal: it "
                                                 "needs a writer-session tag")
            return dev
        gate = self._gates[base]
        gate.admit(token, self.state.epoch)
        if base.endswith(sessions.SEAL_SUFFIX):
            return _SealView(self, gate, token, dev.size)
        if gate.name in self.state.sealed:  # a primary writes again: the seal is void
            with self._state_lock:
                self.state.sealed.pop(gate.name, None)
                self.state.save(self.cfg.state)
        return sessions.SessionView(dev, gate, token)

    def record_seal(self, disk: str, epoch: int) -> None:
        """The primary of ``epoch`` demoted cleanly: this disk holds every write it
        acknowledged (its final barrier came first).  Persisted: a promotion after a
        restart may use it too."""
        with self._state_lock:
            self.state.sealed[disk] = epoch
            self.state.save(self.cfg.state)
        log.warning("%s: the primary of epoch %d demoted cleanly: this disk holds every "
                    "write it acknowledged", disk, epoch)
        self.emit("PRIMARY_DEMOTED", {"disk": disk, "epoch": epoch})

    def list_exports(self) -> list[tuple[str, str]]:
        """Every export but the batch, seal and digest twins: those are the primary's, not a
        user's."""
        return [(name, self._describe(name)) for name in self.exports
                if not name.endswith((batch.EXPORT_SUFFIX, sessions.SEAL_SUFFIX,
                                      resync.DIGEST_SUFFIX))]

    def _describe(self, name: str) -> str:
        view, _, disk = name.partition("/")
        if self.mode is ReplicationMode.PRIMARY:
            return f"repdisk primary disk {name}"
        disk = disk or self.cfg.disks[0].name
        return (f"repdisk secondary disk {disk}: "
                + ("the primary writes here" if view == "replica" else "the secondary VM's view"))

    def serve_control(self, commands: list[Command]) -> None:
        """Serve ``commands`` on the control socket (and the TCP control port, if
        configured) and, on a primary, start the isolation monitor (call after nbdkit
        forked: all start threads)."""
        server = QMPServer(commands, name=f"repdisk-{self.cfg.role}")
        access = self.cfg.control_access
        server.serve_unix(self.cfg.control, 0o600 if access.mode is None else access.mode,
                          access.gid)
        if self.cfg.control_tcp:
            serve_control(server, self.cfg.control_tcp, self.cfg.control_tls)
        self._server = server
        if self.mode is ReplicationMode.PRIMARY:
            self._mark_unclean()
            self._guard(self.cfg.on_isolation, self.cfg.isolation_timeout)

    # -- the dirty maps across stops and crashes (issue 15: DRBD's on-disk bitmap) ---------

    def _map_path(self, disk: str) -> str:
        return f"{self.cfg.state}.{disk}.dirtymap"

    def _recall_dirty(self) -> None:
        """Primary at open: what the secondary lacks.  After a clean stop, each disk's map
        saved then; after an unclean one (``unclean`` still set: killed, crashed, or a map
        unreadable) nothing is known, so each disk compares itself with the secondary's
        by digest before its first copy (``compare_first``), and until then no checkpoint
        can make the secondary consistent (start and resync do it first)."""
        for rep in self._primaries():
            if self.state.unclean:
                rep.compare_first = True
                continue
            try:
                saved = DirtyMap.load(self._map_path(rep.name), rep.disk.size,
                                      rep.dirty.granularity)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                log.warning("%s: %s; comparing the disks instead", rep.name, err)
                rep.compare_first = True
                continue
            for offset, length in saved.runs():
                rep.dirty.mark(offset, length)
            log.info("%s: %d bytes dirty since the last clean stop", rep.name,
                     rep.dirty.dirty_bytes)
        if self.state.unclean:
            log.warning("this primary did not stop cleanly: it compares its disks with the "
                        "secondary's before replicating")

    def _mark_unclean(self) -> None:
        """Before serving the first write: from now on only a clean stop knows exactly what
        the secondary lacks (a write in flight or not yet written back at a crash is on
        this disk only), so record that it has not stopped cleanly.  Once per process,
        never on a write's path.  The saved maps are in memory now: remove them."""
        with self._state_lock:
            self.state.unclean = True
            self.state.save(self.cfg.state)
        for rep in self._primaries():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._map_path(rep.name))

    def _save_dirty(self) -> None:
        """Primary, at a clean stop (links dropped: what they did not acknowledge is dirty):
        save each disk's map, then clear ``unclean``."""
        for rep in self._primaries():
            path = self._map_path(rep.name)
            if rep.dirty:
                rep.dirty.save(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        with self._state_lock:
            self.state.unclean = False
            self.state.save(self.cfg.state)

    def _guard(self, policy: str, timeout: float) -> None:
        self.isolation = Isolation(timeout, policy, self._secondary_answers, self.emit,
                                   fenced=self.state.fenced)

    def _secondary_answers(self) -> bool:
        """True if every disk's link acknowledged something since the last look; an idle
        link is probed, so the next look can tell."""
        answered = True
        for rep in self._primaries():
            acks = rep.link_acks()
            if acks is None or acks == self._acks.get(rep.name):
                answered = False
                rep.probe_link()
            self._acks[rep.name] = acks
        return answered

    def emit(self, name: str, data: dict[str, Any]) -> None:
        if self._server is not None:
            self._server.emit(name, data)

    # -- replication: each maps to one *_all call of the node's registry ---------

    def start(self, mode: ReplicationMode,
              epoch: int | None = None) -> dict[str, str] | None:
        """Start every disk; returns ``{"ignored": why}`` where QEMU would ignore the start.

        A secondary that won a failover ignores ``start`` in mode primary, as QEMU does for a
        promoted secondary (continuous replication: this disk's replication is over).  Its
        epoch rules still apply first: an older epoch is refused, and so is a start as a
        secondary in the epoch it won (never two writers).
        """
        over = self.replication_over()
        if over and mode is ReplicationMode.PRIMARY:
            self.state.check_start(PRIMARY, epoch)
            return self._ignored("replication-start", over)
        self.state.check_start(self.role, epoch)
        for rep in self.replicas.values():
            if isinstance(rep, PrimaryReplica):  # its connections carry the epoch
                rep.epoch = max(self.state.epoch, epoch or 0)
        self.registry.start_all(mode)
        self.state.enter(self.role, epoch)
        self.state.save(self.cfg.state)
        return None

    def replication_over(self) -> str:
        """Why replication requests are ignored here ("" if they are not): this secondary
        won a failover and was not promoted, so its side of replication is over."""
        if self.mode is not ReplicationMode.SECONDARY or not self.state.failed_over:
            return ""
        return (f"this node took over in a failover (epoch {self.state.epoch}): its "
                "replication is over; promote it (replication-promote) to replicate again")

    def _ignored(self, command: str, why: str) -> dict[str, str]:
        """Answer a request QEMU ignores in this state: the reply, a log line, an event."""
        log.info("control: %s ignored: %s", command, why)
        self.emit("REPLICATION_REQUEST_IGNORED", {"command": command, "reason": why})
        return {"ignored": why}

    def checkpoint(self) -> dict[str, str] | None:
        over = self.replication_over()
        if over:
            return self._ignored("replication-do-checkpoint", over)
        self.registry.do_checkpoint_all()
        return None

    def resume(self) -> None:
        """Primary: end the checkpoint hold (the second half of a checkpoint)."""
        for rep in self._primaries():
            rep.resume()

    def get_error(self) -> None:
        self.registry.get_error_all()

    def stop(self, failover: bool) -> dict[str, str] | None:
        over = self.replication_over()
        if over:
            return self._ignored("replication-stop", over)
        if failover and self.mode is ReplicationMode.SECONDARY:
            self._failover()
        else:
            self.registry.stop_all(failover)
        return None

    def _failover(self) -> None:
        """All disks of the group fail over, or none: refuse before committing any.

        Crash-safe: once every disk's overlays are durable, the state file records that
        the commit is under way; a node killed before the commit ends finishes it when it
        reopens (:meth:`_resume_failover`).  A failover that is already over does nothing.
        """
        secondaries = self._secondaries()
        for rep in secondaries:
            rep.check_failover()
        began = [rep.begin_failover() for rep in secondaries]
        if not any(began):
            return
        self.state.begin_failover()
        self.state.save(self.cfg.state)
        self._commit_failover()

    def _commit_failover(self) -> None:
        for rep in self._secondaries():
            rep.resume_failover()
        self.state.end_failover()
        self.state.save(self.cfg.state)
        self.emit("EPOCH_CHANGED", {"epoch": self.state.epoch})

    def _resume_failover(self) -> None:
        """At open: finish the failover commit that a crash interrupted, before serving.

        If it fails again the node still serves, in failover-failed (reads work; starts
        are refused while the state says the commit is unfinished)."""
        if self.mode is not ReplicationMode.SECONDARY:
            raise ConfigError("role", f"{self.cfg.state} says a failover commit of epoch "
                                      f"{self.state.failover_commit} was interrupted on this "
                                      "node: start it as the secondary it was, to finish it")
        log.warning("the failover commit of epoch %s was interrupted: finishing it",
                    self.state.failover_commit)
        try:
            self._commit_failover()
        except ReplicationError as err:
            log.error("%s; the node serves the half-committed disk in failover-failed", err)
            return
        log.warning("failover commit finished: epoch %d", self.state.epoch)

    def _secondaries(self) -> list[SecondaryReplica]:
        return [r for r in self.replicas.values() if isinstance(r, SecondaryReplica)]

    def resync(self) -> int:
        return sum(rep.resync() for rep in self._primaries())

    # -- the controller's commands: contact, fencing, promotion, sync ------------------

    def heartbeat(self) -> dict[str, Any]:
        """The controller is alive and sees this node: contact for the isolation guard."""
        if self.isolation is not None:
            self.isolation.contact()
        return self.query()

    def fence(self, reason: str) -> None:
        """This primary lost a failover: refuse guest writes for good, stop replicating."""
        self._primaries()
        if self.isolation is None:
            self._guard(self.cfg.on_isolation, self.cfg.isolation_timeout)
        assert self.isolation is not None
        self.isolation.fence(reason)
        self.state.fenced = reason
        self.state.save(self.cfg.state)
        for rep in self._primaries():
            if rep.stage is Stage.RUNNING:
                rep.stop(failover=True)

    def demote(self) -> None:
        """A primary hands over without losing anything and becomes its peer's secondary.

        Guest writes are refused from now on (EROFS) and the ones under way finish; a
        final barrier (a checkpoint's) puts every acknowledged write on the secondary, and
        a seal (``replication-demote``'s proof, see :meth:`record_seal`) tells it so, so
        that its promotion is a role switch that copies nothing.  Then each disk becomes a
        ``SecondaryReplica`` over the same image (overlays ``DISK.hidden``/``.active``) in
        stage NONE: start it as the new primary's secondary (``replication-start``).
        Any failure before the seal of every disk rolls back: the node stays a running
        primary and admits writes again (a disk already sealed then degrades on its next
        write and is resynced, which voids its seal).
        """
        primaries = self._primaries()
        if self.state.fenced:
            raise ReplicationError(f"cannot demote: this node is fenced ({self.state.fenced})")
        for rep in primaries:
            if rep.stage is not Stage.RUNNING or rep.degraded:
                raise ReplicationError(
                    f"{rep.name}: cannot demote: replication is "
                    f"{'degraded' if rep.degraded else rep.stage.value}, so the secondary may "
                    "lack acknowledged writes; resync first, or stop this node and fail over")
        why = "this node was demoted: it is a secondary now; write to the new primary"
        if not self.admission.refuse(why, self.cfg.timeout):
            self.admission.admit()
            raise ReplicationError(f"cannot demote: guest writes under way did not finish "
                                   f"within {self.cfg.timeout:g}s; nothing changed")
        try:
            for rep in primaries:
                rep.checkpoint()   # the final barrier; its hold keeps the link quiet
            for rep in primaries:
                rep.seal()
        except RepdiskError:
            for rep in primaries:
                rep.resume()
            self.admission.admit()
            raise
        for rep in primaries:
            rep.stop(failover=True)  # drop the link: the barrier already covered everything
        self._become_secondary(primaries)
        log.warning("demoted: every acknowledged write is on the secondary; this node is a "
                    "secondary now (epoch %d)", self.state.epoch)
        self.emit("NODE_DEMOTED", {"epoch": self.state.epoch})

    def _become_secondary(self, primaries: list[PrimaryReplica]) -> None:
        """Each disk's image under a SecondaryReplica (stage NONE); exports switched."""
        # A node promoted earlier keeps its former secondaries (DONE: their views read the
        # disk and refuse writes, never touching the overlays); they hold the overlays'
        # locks, which the new secondaries must take: close them first.
        for old in self._retired:
            old.close(disk=False)
        self._retired = []
        registry, replicas = Registry(), {}
        for rep in primaries:
            hidden, active = self.cfg.overlays(rep.disk.path)
            sec = SecondaryReplica.over(rep.name, rep.disk, hidden, active,
                                        self.cfg.cluster_size, self.emit)
            self._lock(sec)
            sec.register(registry)
            replicas[rep.name] = sec
        if self.isolation is not None:
            self.isolation.close()
            self.isolation = None
        self._demoted += primaries
        self.replicas, self.registry = replicas, registry  # type: ignore[assignment]
        self.mode, self.role = ReplicationMode.SECONDARY, SECONDARY
        self._secondary_exports()
        self.state.role = SECONDARY
        self.state.save(self.cfg.state)

    def promote(self, secondary_uri: str, write_mode: str | None = None,
                timeout: float | None = None, isolation_timeout: float | None = None,
                force: bool = False, probe: bool = False) -> None:
        """Turn this failed-over secondary into a primary replicating to ``secondary_uri``.

        Each disk's PrimaryReplica takes over the same RawImage; the ``active`` exports
        switch to the primaries' views.  Replication starts with ``replication-start``
        (after the controller marked what differs on the new secondary).  ``write_mode``
        and ``timeout`` None: the key table's defaults; ``isolation_timeout`` None: the
        node's ``isolation-timeout``.
        """
        if self.mode is ReplicationMode.PRIMARY:
            raise ConfigError("role", "this node is already a primary")
        write_mode = write_mode or default("write-mode")
        timeout = parse_duration("timeout", default("timeout")) if timeout is None else timeout
        if probe and not force:  # the controller's: a wrong URI or a peer not up changes nothing
            if not self._sealed():
                self._check_promotable()  # before the probe: a wrong stage says so first
            self._probe(secondary_uri, timeout)
        if force:
            self._take_as_is()
        elif not self._switch():
            self._check_promotable()
        self._become_primary(secondary_uri, write_mode, timeout, isolation_timeout)

    def _probe(self, secondary_uri: str, timeout: float) -> None:
        """Before a promotion changes anything: each disk's replica export at
        ``secondary_uri`` answers with the disk's size (a wrong URI, a peer not up)."""
        for name, rep in self.replicas.items():
            suffix = f"/{name}" if len(self.replicas) > 1 else ""
            try:
                PrimaryReplica(name, rep.disk, secondary_uri, write_mode=self.cfg.write_mode,
                               timeout=timeout, window=self.cfg.window,
                               max_lag=self.cfg.max_lag, resync_rate=self.cfg.resync_rate,
                               export_suffix=suffix).probe()
            except RepdiskError as err:
                raise ConfigError("secondary", f"cannot promote: {err}; start the new "
                                               "secondary first, or fix the URI") from err

    def _switch(self) -> bool:
        """A running secondary whose primary sealed every disk (a clean demote): take the
        disk as it is (a checkpoint drops the undo data, nothing is copied) and start the
        next epoch.  False if there is no such seal."""
        if not self._sealed():
            return False
        for rep in self._secondaries():
            rep.stop(failover=False)  # a checkpoint, then DONE: the disk is the newest
        with self._state_lock:
            self.state.switch()
            self.state.save(self.cfg.state)
        log.warning("role switch: the primary demoted cleanly; this disk is the newest "
                    "(epoch %d), nothing rolled back", self.state.epoch)
        self.emit("EPOCH_CHANGED", {"epoch": self.state.epoch})
        return True

    def _take_as_is(self) -> None:
        """``force``: a secondary that is not replicating (stage none) declares its disk the
        newest as it is and starts the next epoch: the pair's last primary restarting, or
        the first primary of a new cluster.  The caller (Pacemaker's agent) has checked
        that no newer epoch exists elsewhere; a fenced node is still refused."""
        if self.state.fenced:
            raise ReplicationError(f"cannot promote: this node is fenced ({self.state.fenced})")
        for rep in self.replicas.values():
            if rep.stage is not Stage.NONE:
                raise ReplicationError(f"{rep.name}: cannot promote by force: stage "
                                       f"{rep.stage.value}; only a node that is not "
                                       "replicating takes its disk as it is")
        with self._state_lock:
            self.state.switch()
            self.state.save(self.cfg.state)
        log.warning("promoted by force: this disk is taken as it is (epoch %d)",
                    self.state.epoch)

    def _sealed(self) -> bool:
        """Every disk a running secondary whose primary sealed it (a clean demote)."""
        secondaries = self._secondaries()
        return bool(secondaries) and all(r.stage is Stage.RUNNING for r in secondaries) \
            and self.state.sealed_all([r.name for r in secondaries])

    def _check_promotable(self) -> None:
        for rep in self.replicas.values():
            restarted_winner = rep.stage is Stage.NONE and self.state.failed_over
            if rep.stage is not Stage.DONE and not restarted_winner:
                raise ReplicationError(f"{rep.name}: cannot promote: stage {rep.stage.value}; "
                                       "only a node whose failover completed, or whose "
                                       "primary was demoted cleanly, can be promoted")

    def _become_primary(self, secondary_uri: str, write_mode: str, timeout: float,
                        isolation_timeout: float | None) -> None:
        registry, replicas = Registry(), {}
        for name, rep in self.replicas.items():
            suffix = f"/{name}" if len(self.replicas) > 1 else ""
            primary = PrimaryReplica(name, rep.disk, secondary_uri, write_mode=write_mode,
                                     timeout=timeout, window=self.cfg.window,
                                     max_lag=self.cfg.max_lag, resync_rate=self.cfg.resync_rate,
                                     events=self.emit, export_suffix=suffix)
            primary.register(registry)
            replicas[name] = primary
        self._retired += [r for r in self.replicas.values() if isinstance(r, SecondaryReplica)]
        self.replicas, self.registry = replicas, registry  # type: ignore[assignment]
        self.mode, self.role = ReplicationMode.PRIMARY, PRIMARY
        self.admission.admit()  # a demoted node refused guest writes until now
        self._guard(self.cfg.on_isolation,
                    isolation_timeout or self.cfg.isolation_timeout)
        for _i, (name, primary) in enumerate(replicas.items()):
            self.exports[f"active/{name}"].target = primary.view  # type: ignore[attr-defined]
            self.exports[name] = self.exports[f"active/{name}"]
        self.state.role = PRIMARY
        self.state.unclean = True  # it serves from now on: see _mark_unclean
        self.state.save(self.cfg.state)
        log.warning("promoted to primary (epoch %d), replicating to %s", self.state.epoch,
                    secondary_uri)
        self.emit("NODE_PROMOTED", {"epoch": self.state.epoch, "secondary": secondary_uri})

    def _image(self, disk: str | None) -> RawImage:
        name = disk or self.cfg.disks[0].name
        rep = self.replicas.get(name)
        if rep is None:
            raise ConfigError("disk", f"no disk named {name!r}; this node has "
                                      f"{', '.join(self.replicas)}")
        return rep.disk

    def digests(self, disk: str | None, offset: int, length: int,
                granularity: int) -> list[str]:
        """Digests of the node's own disk (a secondary's: without its overlays)."""
        return resync.disk_digests(self._image(disk), offset, length, granularity)

    def allocation(self, disk: str | None, offset: int,
                   length: int | None) -> list[tuple[int, int]]:
        image = self._image(disk)
        return resync.data_runs(image, offset, image.size - offset if length is None else length)

    def mark_dirty(self, disk: str | None, runs: list[list[int]]) -> int:
        """Primary: these runs must be copied to the secondary (by start or resync)."""
        rep = self._primary(disk or self.cfg.disks[0].name)
        for offset, length in runs:
            rep.dirty.mark(offset, length)
        return rep.dirty.dirty_bytes

    def verify(self, disk: str | None, runs: list[list[int]] | None,
               repair: bool) -> list[dict[str, Any]]:
        """Primary: compare each disk (or ``disk``) with the secondary where either holds
        data (this node's allocation, plus ``runs``: e.g. the secondary's); with ``repair``
        copy the differing ranges.  One result per disk; an event and a log line each."""
        reps = self._primaries() if disk is None else [self._primary(disk)]
        if runs is not None and len(reps) > 1:
            raise ConfigError("runs", "name the disk the runs are of (disk=NAME)")
        results = []
        for rep in reps:
            began = time.monotonic()
            compare = resync.merge_runs(resync.data_runs(rep.disk, 0, rep.disk.size)
                                        + [(o, n) for o, n in runs or ()])
            found = rep.verify(compare)
            result: dict[str, Any] = {
                "disk": rep.name, "compared": sum(n for _, n in compare),
                "ranges": [list(r) for r in found], "bytes": sum(n for _, n in found),
                "duration": round(time.monotonic() - began, 3)}
            if found:
                log.warning("verify %s: %d ranges (%d bytes) differ on the secondary: %s",
                            rep.name, len(found), result["bytes"], found[:64])
            else:
                log.info("verify %s: %d bytes compared, no difference", rep.name,
                         result["compared"])
            if repair and found:
                for offset, length in found:
                    rep.dirty.mark(offset, length)
                result["repaired"] = rep.resync()
            rep.last_verify = {"time": time.time(), "compared": result["compared"],
                               "ranges": len(found), "bytes": result["bytes"],
                               "repaired": result.get("repaired", 0)}
            self.emit("VERIFY_COMPLETED", result)
            results.append(result)
        return results

    def _primary(self, disk: str) -> PrimaryReplica:
        self._primaries()
        rep = self.replicas.get(disk)
        if rep is None:
            raise ConfigError("disk", f"no disk named {disk!r}; this node has "
                                      f"{', '.join(self.replicas)}")
        assert isinstance(rep, PrimaryReplica)
        return rep

    def _primaries(self) -> list[PrimaryReplica]:
        if self.mode is not ReplicationMode.PRIMARY:
            raise ConfigError("role", "this command is for a primary node")
        return [r for r in self.replicas.values() if isinstance(r, PrimaryReplica)]

    def query(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "instance": self.instance,
            "epoch": self.state.epoch,
            "failed-over": self.state.failed_over,
            "fenced": self.state.fenced or None,
            "sealed": dict(self.state.sealed),
            "guest-writes-refused": self.admission.refused or None,
            "isolation": self.isolation.query() if self.isolation else None,
            "timeout": max((rep.timeout for rep in self._primaries()), default=None)
            if self.mode is ReplicationMode.PRIMARY else None,
            "lease": self.lease.query(),
            "default-export": self.default_export,
            "exports": sorted(name for name, _ in self.list_exports()),
            "disks": [{**rep.query(), "size": rep.disk.size} for rep in self.replicas.values()],
            "python-thread-states": threadstate.pinned_count(),
        }

    def close(self) -> None:
        if self.isolation is not None:
            self.isolation.close()
        if self._server is not None:
            self._server.close()
        for rep in self.replicas.values():
            rep.close()
        if self.mode is ReplicationMode.PRIMARY and self.state.unclean:
            try:
                self._save_dirty()
            except (OSError, ValueError) as err:
                log.error("cannot save the dirty maps (%s): the next start compares the disks",
                          err)
        for old in self._retired:
            old.close(disk=False)
        with contextlib.suppress(OSError):
            os.close(self._state_file_lock)

    @classmethod
    def from_keys(cls, pairs: list[tuple[str, str]]) -> Node:
        return cls(NodeConfig.from_keys(pairs))


__all__ = ["Node", "PRIMARY", "SECONDARY"]
