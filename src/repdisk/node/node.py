"""A repdisk node: one nbdkit process serving the disks of one consistency group.

The node turns checked keys (:class:`~repdisk.node.config.NodeConfig`) into a role, keeps
the persisted state, names the exports and serves the control socket.  It holds no
replication logic of its own: every transition is the replicas'.

What changes with the role lives in a role object the node holds and replaces on a
switch: :class:`~repdisk.node.primaryrole.PrimaryRole` (its disks as ``NAME``, isolation,
dirty maps, verify, demotion) or :class:`~repdisk.node.secondaryrole.SecondaryRole`
(``replica/NAME`` and ``active/NAME``, failover, promotion).  What outlives a switch (keys,
state, exports, admission of guest writes, events) is the node's
:class:`~repdisk.node.context.NodeContext`.

Guest-facing exports (a primary's ``NAME``, a secondary's ``active``) are
:class:`~repdisk.node.exports.Export` objects: promotion (``replication-promote``) turns a
failed-over secondary into a primary over the same disks and switches its ``active``
exports to the new primaries' views; demotion switches them back to the new secondaries'
``active`` views.  Connections already open keep their ``Export`` object, so they keep
working.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import Any

from repdisk.block.device import BlockDevice
from repdisk.block.dirtymap import DirtyMap
from repdisk.block.imagelock import lock_image
from repdisk.errors import BlockIOError, ConfigError, RepdiskError
from repdisk.node import threadstate
from repdisk.node.config import PRIMARY, SECONDARY, NodeConfig, check_max_lag, default
from repdisk.node.context import NodeContext
from repdisk.node.exports import Export, MarkView, SealView
from repdisk.node.lease import ControllerLease
from repdisk.node.primaryrole import PrimaryRole
from repdisk.node.role import Replica
from repdisk.node.secondaryrole import SecondaryRole
from repdisk.node.state import NodeState, dirty_map_path
from repdisk.qmp.protocol import Command
from repdisk.qmp.server import QMPServer, serve_control
from repdisk.replication import batch, resync, sessions
from repdisk.replication.framework import ReplicationMode
from repdisk.units import parse_duration

log = logging.getLogger(__name__)


class Node:
    """One consistency group's node, in one role at a time (see the module docstring).

    The control commands (control.py) call its methods from any control connection;
    :meth:`export`, :meth:`list_exports` and :meth:`record_seal` run on nbdkit's threads;
    :meth:`probe_secondary`, :meth:`serve_control` and :meth:`close` are the plugin's
    start-up and shutdown steps.
    """

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.ctx = NodeContext(cfg)
        self.lease = ControllerLease()
        self._role: PrimaryRole | SecondaryRole = (
            PrimaryRole.open(self.ctx) if cfg.role == PRIMARY else SecondaryRole.open(self.ctx))
        self._state_file_lock = self._lock_state_file()
        self._role.name_exports()
        self._role.recover()

    @classmethod
    def from_keys(cls, pairs: list[tuple[str, str]]) -> Node:
        return cls(NodeConfig.from_keys(pairs))

    @property
    def state(self) -> NodeState:
        return self.ctx.state

    @property
    def role(self) -> str:
        """PRIMARY or SECONDARY: the role the node has now."""
        return self._role.name

    @property
    def default_export(self) -> str:
        return self.ctx.default_export

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

    def probe_secondary(self) -> None:
        """A primary checks at start-up that its secondary answers (PrimaryRole)."""
        self._role.probe_secondary()

    # -- serving ----------------------------------------------------------------

    def export(self, name: str) -> BlockDevice:
        """The device behind an export name; a primary's tagged ``replica...@EPOCH.GEN``
        connection gets a fenced session view (see sessions.py)."""
        base, token, writer = sessions.split_tag(name)
        exports, fences = self.ctx.exports, self.ctx.fences
        dev = exports.get(base or self.ctx.default_export)
        if dev is None or (token is not None and base not in fences):
            raise BlockIOError(errno.ENOENT, f"no export named {name!r}; this node serves "
                                             f"{', '.join(sorted(exports))}")
        if token is None:
            if base.endswith((sessions.SEAL_SUFFIX, sessions.MARK_SUFFIX)):
                raise BlockIOError(errno.EINVAL, f"export {name!r} is a primary's signal: "
                                                 "it needs a writer-session tag")
            if isinstance(dev, Export):
                dev.cell.bind()  # this connection's writes may take the fast path
            return dev
        fence = fences[base]
        fence.admit(token, self.state.epoch, writer, self.state.failed_over)
        if isinstance(self._role, SecondaryRole):
            self._role.admitted(fence.name, writer)
            if self._role.started(fence.name):   # else its start joins, before any write
                self._join_writer(fence.name, token[0])
        if base.endswith(sessions.SEAL_SUFFIX):
            return SealView(self.record_seal, fence, token, dev.size)
        if base.endswith(sessions.MARK_SUFFIX):
            return MarkView(fence, token, dev.size)
        if fence.name in self.state.sealed:  # a primary writes again: the seal is void
            with self.ctx.changing_state() as state:
                state.sealed.pop(fence.name, None)
        return sessions.SessionView(dev, fence, token)

    def _join_writer(self, disk: str, epoch: int) -> tuple[int, bool, str] | None:
        """A secondary whose ``disk`` a primary of the newer ``epoch`` may write to from now
        on joins that epoch, durably, before the first write: were it to fail over in its
        old epoch, it would start the writer's own, and two nodes would write in one.  Only
        a started secondary joins: one not started refuses every write, and must not move
        (its start may still be refused: the disk of an old primary is not its peer's).
        Returns what the join replaced (None: nothing joined), for ``_leave_writer``."""
        if epoch <= self.state.epoch:
            return None
        with self.ctx.changing_state() as state:
            replaced = state.join(epoch)
        log.warning("%s: a primary of epoch %d writes to it: this node is in that epoch now",
                    disk, epoch)
        return replaced

    def _leave_writer(self, replaced: tuple[int, bool, str] | None) -> None:
        """A secondary's start that joined a writer's epoch and then failed before any disk
        started leaves that epoch again: no write of it landed, and a refused start changes
        nothing (restarted as a primary, the node must still see that writer as newer).
        Once a disk started, the writer may have written to it: the join stays."""
        role = self._role
        if replaced is None or not isinstance(role, SecondaryRole) \
                or any(role.started(disk) for disk in role.replicas):
            return
        with self.ctx.changing_state() as state:
            state.leave(replaced)
        log.warning("start failed: this node is back in epoch %d", replaced[0])

    def record_seal(self, disk: str, epoch: int) -> None:
        """The primary of ``epoch`` demoted cleanly: this disk holds every write it
        acknowledged (its final barrier came first).  Persisted: a promotion after a
        restart may use it too."""
        with self.ctx.changing_state() as state:
            state.sealed[disk] = epoch
        log.warning("%s: the primary of epoch %d demoted cleanly: this disk holds every "
                    "write it acknowledged", disk, epoch)
        self.ctx.emit("PRIMARY_DEMOTED", {"disk": disk, "epoch": epoch})

    def list_exports(self) -> list[tuple[str, str]]:
        """Every export but the batch, seal, mark and digest twins: those are the primary's,
        not a user's."""
        return [(name, self._role.describe(name)) for name in self.ctx.exports
                if not name.endswith((batch.EXPORT_SUFFIX, sessions.SEAL_SUFFIX,
                                      sessions.MARK_SUFFIX, resync.DIGEST_SUFFIX))]

    def serve_control(self, commands: list[Command]) -> None:
        """Serve ``commands`` on the control socket (and the TCP control port, if
        configured) and start the role's threads (call after nbdkit forked)."""
        server = QMPServer(commands, name=f"repdisk-{self.cfg.role}")
        access = self.cfg.control_access
        server.serve_unix(self.cfg.control, 0o600 if access.mode is None else access.mode,
                          access.gid)
        if self.cfg.control_tcp:
            serve_control(server, self.cfg.control_tcp, self.cfg.control_tls)
        self.ctx.server = server
        self._role.serving()

    # -- replication: each maps to one *_all call of the role's registry ---------------

    def start(self, mode: ReplicationMode, epoch: int | None = None,
              secondary_instance: str | None = None) -> dict[str, str] | None:
        """Start every disk; returns ``{"ignored": why}`` where QEMU would ignore the start.
        ``secondary_instance`` (a controller's): a primary refuses, changing nothing, a
        --secondary served by another node.

        A secondary that won a failover ignores ``start`` in mode primary, as QEMU does for a
        promoted secondary (continuous replication: this disk's replication is over).  Its
        epoch rules still apply first: an older epoch is refused, and so is a start as a
        secondary in the epoch it won (never two writers).
        """
        over = self._role.replication_over()
        if over and mode is ReplicationMode.PRIMARY:
            self.state.check_start(PRIMARY, epoch)
            return self._ignored("replication-start", over)
        if over and not self.state.failed_over:   # stopped without a failover
            return self._ignored("replication-start", over)
        self.state.check_start(self._role.name, epoch, self._unsent())
        if secondary_instance is not None and isinstance(self._role, PrimaryRole):
            self._role.check_secondary(secondary_instance)
        joined = None
        if isinstance(self._role, SecondaryRole):   # a writer admitted before this start
            for disk, writer_epoch in self._role.writer_epochs().items():
                replaced = self._join_writer(disk, writer_epoch)
                joined = joined or replaced   # the first join's, to restore all
        self._role.before_start(epoch)
        try:
            self._role.registry.start_all(mode)
        except RepdiskError as err:
            self._leave_writer(joined)
            # The peer refused or did not answer: it may have won a failover meanwhile.
            role = self._role
            lost = role.superseded() if isinstance(role, PrimaryRole) else None
            if lost is None or not isinstance(role, PrimaryRole):
                raise
            role.fence(lost)
            raise ConfigError("epoch", f"start refused, and this node is fenced now: {lost}; "
                                       "start its disk as that node's secondary") from err
        with self.ctx.changing_state() as state:
            state.enter(self._role.name, epoch)
        if isinstance(self._role, PrimaryRole):
            self._role.note_replicated()
        return None

    def _unsent(self) -> str:
        """What this node's disks may hold that its peer lacks, from its last run as a
        primary ("" nothing, or it was not a primary): after an unclean stop anything,
        after a clean one what its saved dirty maps hold (NodeState.check_start)."""
        if self.state.role != PRIMARY:
            return ""
        if self.state.unclean:
            return "did not stop cleanly, so its disks may hold writes its secondary lacks"
        held = []
        for name, rep in self._role.replicas.items():
            path = dirty_map_path(self.cfg.state, name)
            try:
                dirty = DirtyMap.load(path, rep.disk.size).dirty_bytes
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                return f"may hold writes its secondary lacks ({err})"
            if dirty:
                held.append(f"{name}: {dirty} bytes in {path}")
        return f"holds writes its secondary lacks ({'; '.join(held)})" if held else ""

    def _ignored(self, command: str, why: str) -> dict[str, str]:
        """Answer a request QEMU ignores in this state: the reply, a log line, an event."""
        log.info("control: %s ignored: %s", command, why)
        self.ctx.emit("REPLICATION_REQUEST_IGNORED", {"command": command, "reason": why})
        return {"ignored": why}

    def checkpoint(self) -> dict[str, str] | None:
        over = self._role.replication_over()
        if over:
            return self._ignored("replication-do-checkpoint", over)
        self._role.check_checkpoint()
        self._role.registry.do_checkpoint_all()
        self._role.checkpointed()
        return None

    def resume(self) -> None:
        """Primary: end the checkpoint hold (the second half of a checkpoint)."""
        self._primary().resume()

    def get_error(self) -> None:
        self._role.registry.get_error_all()

    def stop(self, failover: bool) -> dict[str, str] | None:
        over = self._role.replication_over()
        if over:
            return self._ignored("replication-stop", over)
        self._role.stop(failover)
        return None

    def resync(self) -> int:
        return self._primary().resync()

    # -- the controller's commands: contact, fencing, promotion, sync ------------------

    def heartbeat(self) -> dict[str, Any]:
        """The controller is alive and sees this node: contact for the isolation guard."""
        self._role.contact()
        return self.query()

    def fence(self, reason: str) -> None:
        """This primary lost a failover: refuse guest writes for good, stop replicating."""
        self._primary().fence(reason)

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
        primary = self._primary()
        primary.hand_over()
        secondary = SecondaryRole.over(self.ctx, primary.replicas)
        primary.disarm()
        self._role = secondary
        secondary.name_exports()
        with self.ctx.changing_state() as state:
            state.role = SECONDARY
        log.warning("demoted: every acknowledged write is on the secondary; this node is a "
                    "secondary now (epoch %d)", self.state.epoch)
        self.ctx.emit("NODE_DEMOTED", {"epoch": self.state.epoch})

    def promote(self, secondary_uri: str, write_mode: str | None = None,
                timeout: float | None = None, isolation_timeout: float | None = None,
                force: bool = False, probe: bool = False,
                secondary_instance: str | None = None, max_lag: int | None = None) -> None:
        """Turn this failed-over secondary into a primary replicating to ``secondary_uri``.

        Each disk's PrimaryReplica takes over the same RawImage; the ``active`` exports
        switch to the primaries' views.  Replication starts with ``replication-start``
        (after the controller marked what differs on the new secondary).  ``write_mode``
        and ``timeout`` None: the key table's defaults; ``isolation_timeout`` and ``max_lag``
        None: the node's ``isolation-timeout`` and ``max-lag``; ``secondary_instance``: with
        ``probe``, the node the caller means (the controller's new secondary), refused if
        another serves the URI.
        """
        secondary = self._role
        if isinstance(secondary, PrimaryRole):
            raise ConfigError("role", "this node is already a primary")
        write_mode = write_mode or default("write-mode")
        timeout = parse_duration("timeout", default("timeout")) if timeout is None else timeout
        if max_lag is not None:
            check_max_lag(max_lag)
        secondary.prepare_promotion(secondary_uri, timeout, force, probe, secondary_instance)
        self._role = PrimaryRole.promoted(self.ctx, secondary.replicas, secondary_uri,
                                          write_mode, timeout,
                                          isolation_timeout or self.cfg.isolation_timeout,
                                          max_lag)
        with self.ctx.changing_state() as state:
            state.role = PRIMARY
            state.unclean = True  # it serves from now on: see PrimaryRole._mark_unclean
        log.warning("promoted to primary (epoch %d), replicating to %s", self.state.epoch,
                    secondary_uri)
        self.ctx.emit("NODE_PROMOTED", {"epoch": self.state.epoch,
                                        "secondary": secondary_uri})

    def digests(self, disk: str | None, offset: int, length: int,
                granularity: int) -> list[str]:
        """Digests of the node's own disk (a secondary's: without its overlays)."""
        return resync.disk_digests(self._role.image(disk), offset, length, granularity)

    def allocation(self, disk: str | None, offset: int,
                   length: int | None) -> list[tuple[int, int]]:
        image = self._role.image(disk)
        return resync.data_runs(image, offset, image.size - offset if length is None else length)

    def mark_dirty(self, disk: str | None, runs: list[list[int]]) -> int:
        """Primary: these runs must be copied to the secondary (by start or resync)."""
        return self._primary().mark_dirty(disk, runs)

    def verify(self, disk: str | None, runs: list[list[int]] | None,
               repair: bool) -> list[dict[str, Any]]:
        """Primary: compare the disks with the secondary's (PrimaryRole.verify)."""
        return self._primary().verify(disk, runs, repair)

    def _primary(self) -> PrimaryRole:
        if not isinstance(self._role, PrimaryRole):
            raise ConfigError("role", f"this command is for a primary node, and this one is a "
                                      f"{self._role.name}: send it to the primary's control "
                                      "socket")
        return self._role

    def query(self) -> dict[str, Any]:
        role, state = self._role, self.state
        return {
            "role": role.name,
            "instance": self.ctx.instance,
            "epoch": state.epoch,
            # A secondary process whose state says it was last a primary (a winner promoted
            # since) won nothing it did not hand on: what it may hold is unsent-as-primary.
            "failed-over": state.failed_over and not (role.name == SECONDARY
                                                      and state.role == PRIMARY),
            "fenced": state.fenced or None,
            # A node about to start as a secondary that may hold what its peer lacks: the
            # controller's check before it starts it (NodeState.check_start is the node's).
            "unsent-as-primary": self._unsent() if role.name == SECONDARY else "",
            "sealed": dict(state.sealed),
            "guest-writes-refused": self.ctx.admission.refused or None,
            "isolation": role.isolation(),
            "timeout": role.link_timeout(),
            "lease": self.lease.query(),
            "default-export": self.ctx.default_export,
            "exports": sorted(name for name, _ in self.list_exports()),
            "disks": [self._disk_query(name, rep) for name, rep in role.replicas.items()],
            "python-thread-states": threadstate.pinned_count(),
        }

    def _disk_query(self, name: str, rep: Replica) -> dict[str, Any]:
        """One disk's query; a secondary's says since when no primary has been connected
        (``no_primary_since``: time.time(), None while one is) and which primary disk's
        sessions it admits (``writer``, sessions.writer_id; "" before any)."""
        q = {**rep.query(), "size": rep.disk.size}
        fence = self.ctx.fence(name)
        if fence is not None and isinstance(self._role, SecondaryRole):  # not a promoted one's
            q["no_primary_since"] = fence.unconnected_since()
            q["writer"] = fence.writer
        return q

    def closed(self, dev: BlockDevice) -> None:
        """A connection to ``dev`` (what :meth:`export` gave it) closed."""
        if isinstance(dev, sessions.SessionView):
            dev.close()

    def close(self) -> None:
        """nbdkit is shutting down (it was sent SIGTERM or SIGINT, and every NBD client has
        hung up since): stop serving control, then the role, which saves what must
        survive a restart."""
        log.warning("stopping: nbdkit is shutting down (SIGTERM or SIGINT; its NBD clients "
                    "have hung up)")
        if self.ctx.server is not None:
            self.ctx.server.close()
        self._role.close()
        with contextlib.suppress(OSError):
            os.close(self._state_file_lock)
        log.warning("stopped")


__all__ = ["Node", "PRIMARY", "SECONDARY"]
