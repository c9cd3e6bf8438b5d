"""A node's secondary role: its SecondaryReplicas, their exports, failover and promotion.

A secondary serves ``replica/NAME`` (the primary writes here) and ``active/NAME`` (a
secondary VM's view) for each disk, with ``replica`` and ``active`` naming the first disk
and ``active`` the default export.  Each replica export has unlisted twins: ``+batch``
(batch.py, an async primary's records), ``+seal`` (a demoting primary's proof) and
``+digest`` (resync.py, read-only digests); all of one disk share its session fence
(sessions.py).
"""

from __future__ import annotations

import logging

from repdisk.block.device import BlockDevice
from repdisk.errors import ConfigError, RepdiskError
from repdisk.node.config import SECONDARY
from repdisk.node.context import NodeContext
from repdisk.node.exports import Export
from repdisk.node.primaryrole import new_primary
from repdisk.node.role import Role, describe_disk, newer_writer_at, serving_nodes
from repdisk.replication import batch, nbdclient, resync, sessions
from repdisk.replication.framework import ReplicationError, ReplicationMode
from repdisk.replication.link import CONTENTS_UNKNOWN, DISK_ID
from repdisk.replication.primary import PrimaryReplica
from repdisk.replication.secondary import SecondaryReplica
from repdisk.replication.stage import Stage
from repdisk.uri import export_name

log = logging.getLogger(__name__)


#: How a replica export's description ends (what a promotion checks its URI against).
REPLICA_VIEW = "the primary writes here"


#: Why a secondary whose replication was stopped without a failover refuses requests.
STOPPED = "replication was stopped on this secondary without a failover (stage done)"


class SecondaryRole(Role[SecondaryReplica]):
    name = SECONDARY
    mode = ReplicationMode.SECONDARY

    def __init__(self, ctx: NodeContext, replicas: dict[str, SecondaryReplica],
                 demoted: list[PrimaryReplica], unknown: set[str]) -> None:
        super().__init__(ctx, replicas)
        self.demoted = demoted  # a demoted node's former primaries (links dropped)
        #: Disks new to this node (their file is not the one a checkpoint last made a
        #: consistent copy, NodeState.synced): the replica export says so (CONTENTS_UNKNOWN)
        #: until a checkpoint, so that the primary compares before it copies.
        self.unknown = unknown

    # -- becoming a secondary ----------------------------------------------------------

    @classmethod
    def open(cls, ctx: NodeContext) -> SecondaryRole:
        """Open every disk of the keys with its overlays (locked), before serving."""
        cfg = ctx.cfg
        replicas = {}
        for spec in cfg.disks:
            hidden, active = cfg.overlays(spec.path)
            try:
                rep = SecondaryReplica.open(spec.name, spec.path, hidden, active,
                                            cluster_size=cfg.cluster_size, events=ctx.emit)
            except ConfigError:
                raise
            except (RepdiskError, OSError, ValueError) as err:
                raise ConfigError("disk", f"{spec.path}: {err}") from err
            ctx.lock(rep.disk, rep.hidden_overlay, rep.active_overlay)
            replicas[spec.name] = rep
        unknown = {name for name, rep in replicas.items()
                   if (mine := rep.disk.identity()) is None
                   or ctx.state.synced.get(name) != mine}
        if unknown:
            log.warning("%s: not the file last synced as this node's disk (or no record of "
                        "one): the primary compares the disks before copying",
                        ", ".join(sorted(unknown)))
        return cls(ctx, replicas, [], unknown)

    @classmethod
    def over(cls, ctx: NodeContext, primaries: dict[str, PrimaryReplica]) -> SecondaryRole:
        """Each of a demoted primary's images under a SecondaryReplica (stage NONE), its
        overlays beside it; the caller switches the exports (:meth:`name_exports`)."""
        replicas = {}
        for name, rep in primaries.items():
            hidden, active = ctx.cfg.overlays(rep.disk.path)
            sec = SecondaryReplica.over(name, rep.disk, hidden, active,
                                        ctx.cfg.cluster_size, ctx.emit)
            ctx.lock(sec.disk, sec.hidden_overlay, sec.active_overlay)
            replicas[name] = sec
        # Demoted after a final barrier: each disk holds what the new primary's does.
        return cls(ctx, replicas, list(primaries.values()), set())

    def name_exports(self) -> None:
        """A secondary's exports; a demoted node's guest-facing ``Export`` objects are kept
        (open connections keep them) and switched to the secondaries' ``active`` views."""
        exports, fences = self.ctx.exports, self.ctx.fences
        for i, (name, rep) in enumerate(self.replicas.items()):
            kept = exports.get(f"active/{name}") or exports.get(name)
            if isinstance(kept, Export):
                kept.target = rep.active_view
                active = kept
            else:
                active = Export(rep.active_view, self.ctx.admission)
            fence = sessions.SessionFence(name, rep.fast_slot)
            aliases = [f"replica/{name}"] + (["replica"] if i == 0 else [])
            for replica in aliases:  # each with its batch and seal twins, one fence for all
                twins: tuple[tuple[str, BlockDevice], ...] = (
                    (replica, rep.replica_view),
                    (replica + batch.EXPORT_SUFFIX,
                     batch.BatchView(rep.replica_view, rep.write_record)),
                    (replica + sessions.SEAL_SUFFIX, rep.replica_view),
                    (replica + sessions.MARK_SUFFIX, rep.replica_view))
                for export, dev in twins:
                    exports[export] = dev
                    fences[export] = fence
            for replica in aliases:  # read-only digests for a primary's own comparison
                exports[replica + resync.DIGEST_SUFFIX] = resync.DigestView(rep.disk)
            exports[f"active/{name}"] = active
            if i == 0:
                exports["active"] = active
        self.ctx.default_export = "active"

    def describe(self, name: str) -> str:
        view, _, disk = name.partition("/")
        disk = disk or self.ctx.cfg.disks[0].name
        if view != "replica":
            return describe_disk("secondary", disk, self.ctx) + ": the secondary VM's view"
        unknown = f"{CONTENTS_UNKNOWN}; " if disk in self.unknown else ""
        fence = self.ctx.fence(disk)
        refused = f"; {fence.refusal}" if fence is not None and fence.refusal else ""
        named = f"{DISK_ID} {self.replicas[disk].disk.named()}; "
        return (f"{describe_disk('secondary', disk, self.ctx)}: {unknown}{named}{REPLICA_VIEW}"
                f"{refused}")

    def started(self, disk: str) -> bool:
        """Whether ``disk``'s replication was started (its stage is not none)."""
        return self.replicas[disk].stage is not Stage.NONE

    def writer_epochs(self) -> dict[str, int]:
        """Each disk's writer session's epoch (-1 where none was admitted)."""
        return {name: fence.writer_epoch for name in self.replicas
                if (fence := self.ctx.fence(name)) is not None}

    def before_start(self, epoch: int | None) -> None:
        """A start: how long no primary has been connected counts from now (status)."""
        for name in self.replicas:
            fence = self.ctx.fence(name)
            if fence is not None:
                fence.restart_clock()

    def check_checkpoint(self) -> None:
        """Refuse a checkpoint that no checkpoint of the primary came before (its mark,
        sessions.MARK_SUFFIX): the disk may then be half a copy, or between two writes."""
        for name in self.replicas:
            fence = self.ctx.fence(name)
            if fence is not None and not fence.checkpointable():
                raise ReplicationError(
                    f"{name}: no checkpoint: the primary wrote since its last checkpoint (or "
                    "took none yet: a copy may be under way); checkpoint the primary first "
                    "(repdisk ctl PRI checkpoint, then this, then repdisk ctl PRI resume), or "
                    "let a controller do it")

    def checkpointed(self) -> None:
        """Record which file each disk that is a consistent copy now is (the state is
        written only when that changes); those disks are no longer new to the node."""
        consistent = [name for name, rep in self.replicas.items() if rep.consistent]
        synced = {**self.ctx.state.synced,
                  **{name: self.replicas[name].disk.named() for name in consistent}}
        synced_by = {**self.ctx.state.synced_by,
                     **{name: self.ctx.fences[f"replica/{name}"].writer for name in consistent}}
        if (self.ctx.state.synced, self.ctx.state.synced_by) != (synced, synced_by):
            with self.ctx.changing_state() as state:
                state.synced, state.synced_by = synced, synced_by
        self.unknown = {name for name in self.unknown
                        if synced.get(name) != self.replicas[name].disk.identity()}

    def admitted(self, disk: str, writer: str) -> None:
        """A writer session of the primary disk ``writer`` was admitted to ``disk``: if
        the disk's last checkpoint made it another primary's copy (or it has no record of
        whose), its contents are unknown to this one, which compares before it copies
        (its link-up reads the replica export's description after connecting)."""
        if writer and disk not in self.unknown and self.ctx.state.synced_by.get(disk) != writer:
            log.warning("%s: last synced as a copy of another primary disk (%s), now "
                        "written by %s: its primary compares the disks before copying", disk,
                        self.ctx.state.synced_by.get(disk, "none recorded"), writer)
            self.unknown = self.unknown | {disk}

    def recover(self) -> None:
        """At open: finish the failover commit that a crash interrupted, before serving;
        a failover's winner not promoted since serves as it did before it stopped (done).

        If the commit fails again the node still serves, in failover-failed (reads work;
        starts are refused while the state says the commit is unfinished)."""
        state = self.ctx.state
        if state.failover_commit is None:
            if state.failed_over and state.role == SECONDARY:
                for rep in self.replicas.values():
                    rep.reopen_done()
                log.warning("this node won the failover into epoch %d: its active export "
                            "serves the disk (done) until it is promoted", state.epoch)
            return
        log.warning("the failover commit of epoch %s was interrupted: finishing it",
                    self.ctx.state.failover_commit)
        try:
            self._commit_failover()
        except ReplicationError as err:
            log.error("%s; the node serves the half-committed disk in failover-failed", err)
            return
        log.warning("failover commit finished: epoch %d", self.ctx.state.epoch)

    # -- replication -------------------------------------------------------------------

    def replication_over(self) -> str:
        """This secondary won a failover and was not promoted (a node promoted since and
        restarted as a secondary is the last primary, not a winner), or its replication
        was stopped without one: its side of replication is over (start, stop, failover
        and checkpoint are ignored, as in QEMU, and the node says so)."""
        if self.ctx.state.failed_over and self.ctx.state.role == SECONDARY:
            return (f"this node took over in a failover (epoch {self.ctx.state.epoch}): its "
                    "replication is over; promote it (replication-promote) to replicate "
                    "again")
        if self.replicas and all(r.stage is Stage.DONE for r in self.replicas.values()):
            return (STOPPED + ": it neither starts nor fails over again in this process, "
                    "as in QEMU; restart the node to replicate again")
        return ""

    def stop(self, failover: bool) -> None:
        if failover:
            self._failover()
            return
        super().stop(failover)
        # The primary still writes in this epoch: a secondary VM's write here would make
        # two writers (and be overwritten by the next resync).
        self.ctx.admission.refuse(STOPPED + ": the primary is the writer; fail over a "
                                  "running secondary to write here", 5.0)

    def _failover(self) -> None:
        """All disks of the group fail over, or none: refuse before committing any.

        Crash-safe: once every disk's overlays are durable, the state file records that
        the commit is under way; a node killed before the commit ends finishes it when it
        reopens (:meth:`recover`).  A failover that is already over does nothing.
        """
        state = self.ctx.state
        if state.primary_of is not None and state.primary_of == state.epoch \
                and any(rep.stage is Stage.RUNNING for rep in self.replicas.values()):
            raise ConfigError("epoch", f"cannot fail over: this node was the primary of epoch "
                                       f"{state.epoch} until it restarted as a secondary, and "
                                       "no newer primary has written to it since: its peer "
                                       "may have failed over already, and a second winner of "
                                       f"epoch {state.epoch + 1} would make two writers; start "
                                       "it as the winner's secondary "
                                       f"(epoch={state.epoch + 1}), or as the primary again")
        secondaries = list(self.replicas.values())
        for rep in secondaries:
            rep.check_failover()
        began = [rep.begin_failover() for rep in secondaries]
        if not any(began):
            return
        with self.ctx.changing_state() as state:
            state.begin_failover()
        self._commit_failover()

    def _commit_failover(self) -> None:
        for rep in self.replicas.values():
            rep.resume_failover()
        with self.ctx.changing_state() as state:
            state.end_failover()
        self.ctx.emit("EPOCH_CHANGED", {"epoch": self.ctx.state.epoch})

    # -- promotion -----------------------------------------------------------------------

    def prepare_promotion(self, secondary_uri: str, timeout: float, force: bool,
                          probe: bool, secondary_instance: str | None = None) -> None:
        """Everything a promotion checks and records before the role changes: refuse (and
        change nothing) a node that may not be promoted, or whose new secondary does not
        answer (``probe``); a role switch or ``force`` starts the next epoch."""
        if probe and not force:  # the controller's: a wrong URI or a peer not up changes nothing
            if not self._sealed():
                self._check_promotable()  # before the probe: a wrong stage says so first
            self._probe(secondary_uri, timeout, secondary_instance)
        if force:
            self._take_as_is(secondary_uri, timeout)
        elif not self._switch():
            self._check_promotable()

    def _probe(self, secondary_uri: str, timeout: float, instance: str | None) -> None:
        """Before a promotion changes anything: each disk's replica export at
        ``secondary_uri`` answers with the disk's size (a wrong URI, a peer not up), and is
        served by node ``instance`` if given (the URI names the node the caller means)."""
        listed = nbdclient.list_exports(secondary_uri, timeout) or {}
        serving = serving_nodes(listed)
        if self.ctx.instance in serving:
            raise ConfigError("secondary", f"cannot promote: {secondary_uri} is this node's own "
                                           "replica export: give the new secondary's URI")
        if instance is not None and serving and instance not in serving:
            raise ConfigError("secondary", f"cannot promote: {secondary_uri} is served by "
                                           "another node than the new secondary's control "
                                           "socket names: give that node's replica URI (its "
                                           "--nbd-socket), or the control socket of the node "
                                           "at this URI")
        write_mode = self.ctx.cfg.primary.write_mode
        for name, rep in self.replicas.items():
            export = export_name(secondary_uri) + (f"/{name}" if len(self.replicas) > 1 else "")
            if listed and not listed.get(export, "").endswith(REPLICA_VIEW):
                raise ConfigError("secondary", f"cannot promote: {secondary_uri} names export "
                                               f"{export!r}, not a secondary's replica export: "
                                               "give its replica export (.../replica?...)")
            try:
                new_primary(self.ctx, name, rep.disk, secondary_uri, write_mode, timeout,
                            len(self.replicas)).probe()
            except RepdiskError as err:
                raise ConfigError("secondary", f"cannot promote: {err}; start the new "
                                               "secondary first, or fix the URI") from err

    def _switch(self) -> bool:
        """A running secondary whose primary sealed every disk (a clean demote): take the
        disk as it is (a checkpoint drops the undo data, nothing is copied) and start the
        next epoch.  False if there is no such seal."""
        if not self._sealed():
            return False
        for rep in self.replicas.values():
            rep.stop(failover=False)  # a checkpoint, then DONE: the disk is the newest
        with self.ctx.changing_state() as state:
            state.switch()
        log.warning("role switch: the primary demoted cleanly; this disk is the newest "
                    "(epoch %d), nothing rolled back", self.ctx.state.epoch)
        self.ctx.emit("EPOCH_CHANGED", {"epoch": self.ctx.state.epoch})
        return True

    def _take_as_is(self, secondary_uri: str, timeout: float) -> None:
        """``force``: a secondary that is not replicating (stage none) declares its disk the
        newest as it is and starts the next epoch: the pair's last primary restarting, or
        the first primary of a new cluster.  The caller (Pacemaker's agent) has checked
        that no newer epoch exists elsewhere; a fenced node is still refused, and so is one
        whose new secondary answers as the writer of a newer epoch than this node's (it
        was forced, or won, first: two forced nodes would write in one epoch)."""
        state = self.ctx.state
        if state.fenced:
            raise ReplicationError(f"cannot promote: this node is fenced ({state.fenced})")
        newer = newer_writer_at(secondary_uri, state.epoch, timeout)
        if newer is not None:
            raise ReplicationError(f"cannot promote by force: the node at {secondary_uri} "
                                   f"writes in epoch {newer}, newer than this node's "
                                   f"{state.epoch}: it holds the newest data; start this disk "
                                   "as its secondary instead")
        for rep in self.replicas.values():
            if rep.stage is not Stage.NONE:
                raise ReplicationError(f"{rep.name}: cannot promote by force: stage "
                                       f"{rep.stage.value}; only a node that is not "
                                       "replicating takes its disk as it is")
        with self.ctx.changing_state() as state:
            state.switch()
        log.warning("promoted by force: this disk is taken as it is (epoch %d)",
                    self.ctx.state.epoch)

    def _sealed(self) -> bool:
        """Every disk a running secondary whose primary sealed it (a clean demote)."""
        secondaries = list(self.replicas.values())
        return (bool(secondaries) and all(r.stage is Stage.RUNNING for r in secondaries)
                and self.ctx.state.sealed_all([r.name for r in secondaries]))

    def _check_promotable(self) -> None:
        for rep in self.replicas.values():
            if rep.stage is not Stage.DONE:
                raise ReplicationError(f"{rep.name}: cannot promote: stage {rep.stage.value}; "
                                       "only a node whose failover completed, or whose "
                                       "primary was demoted cleanly, can be promoted")
