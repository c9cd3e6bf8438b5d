"""A node's primary role: its PrimaryReplicas, their isolation guard and dirty maps.

A primary serves each disk as ``NAME`` (the first one is the default export) through an
:class:`~repdisk.node.exports.Export`.  It fences itself when it hears from neither its
secondary nor the controller for ``isolation-timeout``
(:class:`~repdisk.node.isolation.Isolation`).  What its secondary lacks survives a clean
stop in a dirty map per disk (``STATE.NAME.dirtymap``); after an unclean one it compares
its disks with the secondary's first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from dataclasses import replace
from typing import Any

from repdisk.block.dirtymap import DirtyMap
from repdisk.block.rawimage import RawImage
from repdisk.errors import ConfigError, ForwardError, RepdiskError
from repdisk.node.config import PRIMARY, SECONDARY
from repdisk.node.context import NodeContext
from repdisk.node.exports import Export
from repdisk.node.isolation import Isolation
from repdisk.node.role import Role, describe_disk, newer_writer_at, serving_nodes
from repdisk.node.state import dirty_map_path
from repdisk.replication import nbdclient, resync
from repdisk.replication.framework import ReplicationError, ReplicationMode
from repdisk.replication.primary import PrimaryReplica
from repdisk.replication.secondary import SecondaryReplica
from repdisk.replication.stage import Stage

log = logging.getLogger(__name__)


def new_primary(ctx: NodeContext, name: str, disk: RawImage, secondary_uri: str | None,
                write_mode: str, timeout: float, disks: int,
                max_lag: int | None = None) -> PrimaryReplica:
    """A PrimaryReplica of one of the node's ``disks`` disks, with the node's settings
    (``max_lag`` None: the node's; in a group, a disk's replica export on the secondary is
    ``replica/NAME``)."""
    settings = replace(ctx.cfg.primary, write_mode=write_mode, timeout=timeout,
                       max_lag=ctx.cfg.primary.max_lag if max_lag is None else max_lag)
    return PrimaryReplica(name, disk, secondary_uri, settings, events=ctx.emit,
                          export_suffix=f"/{name}" if disks > 1 else "")


class PrimaryRole(Role[PrimaryReplica]):
    name = PRIMARY
    mode = ReplicationMode.PRIMARY

    def __init__(self, ctx: NodeContext, replicas: dict[str, PrimaryReplica],
                 retired: list[SecondaryReplica]) -> None:
        super().__init__(ctx, replicas)
        #: A promoted node's former secondaries: DONE, their views read the disk and refuse
        #: writes; they hold the overlays' locks until closed.
        self.retired = retired
        self.guard: Isolation | None = None
        self._acks: dict[str, int | None] = {}
        self._watching: threading.Event | None = None   # set: the winner watch ends
        for rep in replicas.values():
            rep.link.on_refused = functools.partial(self._refused, rep)

    # -- becoming a primary ------------------------------------------------------------

    @classmethod
    def open(cls, ctx: NodeContext) -> PrimaryRole:
        """Open every disk of the keys as a primary (locked), before serving."""
        cfg = ctx.cfg
        replicas = {}
        for spec in cfg.disks:
            try:
                rep = new_primary(ctx, spec.name, RawImage.open(spec.path), cfg.secondary,
                                  cfg.primary.write_mode, cfg.primary.timeout, len(cfg.disks))
            except ConfigError:
                raise
            except (RepdiskError, OSError, ValueError) as err:
                raise ConfigError("disk", f"{spec.path}: {err}") from err
            ctx.lock(rep.disk)
            replicas[spec.name] = rep
        return cls(ctx, replicas, [])

    @classmethod
    def promoted(cls, ctx: NodeContext, secondaries: dict[str, SecondaryReplica],
                 secondary_uri: str, write_mode: str, timeout: float,
                 isolation_timeout: float, max_lag: int | None = None) -> PrimaryRole:
        """A primary over the disks of ``secondaries`` (which it keeps, retired), replicating
        to ``secondary_uri``; the guest-facing ``active`` exports switch to its views and
        take guest writes again (a demoted node refused them)."""
        replicas = {name: new_primary(ctx, name, rep.disk, secondary_uri, write_mode, timeout,
                                      len(secondaries), max_lag)
                    for name, rep in secondaries.items()}
        role = cls(ctx, replicas, list(secondaries.values()))
        ctx.admission.admit()  # a demoted node refused guest writes until now
        role.arm(ctx.cfg.on_isolation, isolation_timeout)
        for name, primary in replicas.items():
            export = ctx.exports[f"active/{name}"]
            assert isinstance(export, Export)  # a secondary's guest-facing export
            export.target = primary.view
            ctx.exports[name] = export
        return role

    def name_exports(self) -> None:
        for name, rep in self.replicas.items():
            self.ctx.exports[name] = Export(rep.view, self.ctx.admission)
        self.ctx.default_export = self.ctx.cfg.disks[0].name

    def describe(self, name: str) -> str:
        return describe_disk("primary", name, self.ctx)

    def recover(self) -> None:
        """At open: refuse a node whose state says a secondary's failover commit was cut
        short; recall what the secondary lacks."""
        if self.ctx.state.failover_commit is not None:
            raise ConfigError("role", f"{self.ctx.cfg.state} says a failover commit of epoch "
                                      f"{self.ctx.state.failover_commit} was interrupted on "
                                      "this node: start it as the secondary it was, to "
                                      "finish it")
        self._recall_dirty()

    def probe_secondary(self) -> None:
        """Check at start-up that the secondary answers with equal sizes.

        A primary restarting (its state says it was one) serves its guest even if the
        secondary does not answer: both nodes may have died, and the primary's disk is
        then the only good copy; the controller syncs by checksum once the secondary is
        back.  A first start still refuses, as the URI is more likely wrong."""
        self._fence_if_superseded()
        for rep in self.replicas.values():
            try:
                rep.probe()
            except RepdiskError as err:
                # The hint fits an unreachable secondary, not a size mismatch.
                unreachable = isinstance(err, ForwardError) or isinstance(err.__cause__,
                                                                          ForwardError)
                if unreachable and self.ctx.state.role == PRIMARY:
                    log.warning("%s; serving the guest alone until it is back", err)
                    continue
                if unreachable:
                    self._check_disk_names()
                hint = _unreachable_hint(str(err)) if unreachable else ""
                raise ConfigError("secondary", f"{err}{hint}") from err

    def _fence_if_superseded(self) -> None:
        """At start-up, before serving: come up fenced if the node at ``--secondary`` is in
        a newer epoch (:meth:`superseded`).  Guest writes then fail (EROFS) from the first
        one, as for a primary the controller fenced, controller or not."""
        reason = self.superseded()
        if reason is None:
            return
        with self.ctx.changing_state() as changed:
            changed.fenced = reason
        log.error("fenced at start-up: %s; guest writes fail: start this disk as its "
                  "secondary (repdisk secondary) to re-protect the pair", reason)

    def superseded(self, uri: str | None = None) -> str | None:
        """Why this node lost to its ``--secondary``, if it did: that node is the writer of a
        newer epoch (role.newer_writer), so it won a failover while this one was down or cut
        off (it may have been promoted since), and every guest write acknowledged here would
        be lost.  A secondary merely started in a newer epoch (a typo) supersedes nothing:
        it refuses this primary's writes, which then go on degraded.  Only for a node that
        ran before (its state names a role: a primary, or a secondary started as a primary
        now, such as one demoted for a switchover; a first start is the controller's to
        judge) and is not fenced yet; None when the peer cannot be asked (at most 2 s: a
        host that is down must not hold up a primary that serves alone)."""
        cfg, state = self.ctx.cfg, self.ctx.state
        uri = uri or cfg.secondary
        if uri is None or state.role not in (PRIMARY, SECONDARY) or state.fenced:
            return None
        newest = newer_writer_at(uri, state.epoch, cfg.primary.timeout)
        if newest is None:
            return None
        where = f"--secondary {uri}" if uri == cfg.secondary else uri
        return (f"the node at {where} is in epoch {newest}, newer than this node's "
                f"{state.epoch}: it won a failover and holds the newest data")

    def check_secondary(self, instance: str) -> None:
        """Refuse (ConfigError) a --secondary served by another node than ``instance`` (the
        node a controller runs as this pair's secondary), when its exports can be listed
        (at most 2 s): this primary would replicate into a disk the controller does not
        checkpoint or fail over to."""
        uri = self.ctx.cfg.secondary
        if uri is None:
            return
        serving = serving_nodes(nbdclient.list_exports(uri, min(self.ctx.cfg.primary.timeout,
                                                                2.0)) or {})
        if serving and instance not in serving:
            raise ConfigError("secondary", f"start refused: --secondary {uri} is served by "
                                           "another node than the secondary its controller "
                                           "runs: restart this primary with that node's "
                                           "replica URI, or give the controller the control "
                                           f"socket of the node at {uri}")

    def _refused(self, rep: PrimaryReplica, error: str) -> None:
        """The secondary refused this primary's writes (``Link.on_refused``: the failing
        forwarder's thread, before the writes it failed are settled).  Hold guest writes
        and judge, on a thread of its own, whether another node took over: then fence this
        one, so that no write is acknowledged here and lost there; if not within the
        link's timeout (replication stopped without a failover), let them go on."""
        guard = self.guard
        if guard is None:
            return
        guard.hold_for_verdict(True)
        threading.Thread(target=self._judge_refusal, args=(rep, error, guard),
                         name="repdisk-verdict", daemon=True).start()

    def _judge_refusal(self, rep: PrimaryReplica, error: str, guard: Isolation) -> None:
        deadline = time.monotonic() + rep.timeout
        try:
            while (reason := self.superseded(rep.secondary_uri)) is None:
                if self.ctx.state.fenced or time.monotonic() >= deadline:
                    return
                time.sleep(0.1)
            log.error("%s: %s", rep.name, error)
            self.fence(reason)
        except RepdiskError as err:
            log.error("%s: judging the secondary's refusal failed: %s", rep.name, err)
        finally:
            guard.hold_for_verdict(False)

    def _check_disk_names(self) -> None:
        """A secondary that answers but lacks a disk's replica export: if it lists other
        disks, say that the names differ, with both lists (raises ConfigError)."""
        cfg = self.ctx.cfg
        assert cfg.secondary is not None
        listed = list(nbdclient.list_exports(cfg.secondary, cfg.primary.timeout) or ())
        if not listed:
            return
        theirs = sorted({n.partition("/")[2] for n in listed if n.startswith("replica/")})
        ours = sorted(self.replicas)
        if theirs and len(self.replicas) > 1 and theirs != ours:
            raise ConfigError("secondary", f"the disk names differ: this primary has "
                                           f"{', '.join(ours)}; the secondary "
                                           f"{cfg.secondary} has {', '.join(theirs)}; "
                                           "give both nodes the same names (--disk NAME:PATH)")

    def serving(self) -> None:
        self._mark_unclean()
        self.arm(self.ctx.cfg.on_isolation, self.ctx.cfg.isolation_timeout)

    # -- the dirty maps across stops and crashes (DRBD's on-disk bitmap) -------------

    def _map_path(self, disk: str) -> str:
        return dirty_map_path(self.ctx.cfg.state, disk)

    def _recall_dirty(self) -> None:
        """At open: what the secondary lacks.  After a clean stop, each disk's map
        saved then; after an unclean one (``unclean`` still set: killed, crashed, or a map
        unreadable) nothing is known, so each disk compares itself with the secondary's
        by digest before its first copy (``compare_first``), and until then no checkpoint
        can make the secondary consistent (start and resync do it first)."""
        unclean = self.ctx.state.unclean
        for rep in self.replicas.values():
            rep.known_peer = self.ctx.state.replicated_to.get(rep.name)  # _link_up compares
            if unclean:
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
        if unclean:
            log.warning("this primary did not stop cleanly: it compares its disks with the "
                        "secondary's before replicating")

    def _mark_unclean(self) -> None:
        """Before serving the first write: from now on only a clean stop knows exactly what
        the secondary lacks (a write in flight or not yet written back at a crash is on
        this disk only), so record that it has not stopped cleanly.  Once per process,
        never on a write's path.  The saved maps are in memory now: remove them."""
        with self.ctx.changing_state() as state:
            state.unclean = True
            state.forget_synced()  # this disk changes now as no secondary's does
        for rep in self.replicas.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._map_path(rep.name))

    def _save_dirty(self) -> None:
        """At a clean stop (links dropped: what they did not acknowledge is dirty): save
        each disk's map, then clear ``unclean``."""
        for rep in self.replicas.values():
            path = self._map_path(rep.name)
            if rep.dirty:
                rep.dirty.save(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        with self.ctx.changing_state() as state:
            state.unclean = False

    # -- isolation ---------------------------------------------------------------------

    def arm(self, policy: str, timeout: float) -> None:
        """Start the isolation guard (guest writes pass it from now on) and the watch for
        a winner at --secondary."""
        self.guard = Isolation(timeout, policy, self._secondary_answers, self.ctx.emit,
                               fenced=self.ctx.state.fenced)
        self.ctx.admission.guard = self.guard
        if self._watching is None:
            self._watching = threading.Event()
            threading.Thread(target=self._watch_for_a_winner, args=(self._watching, timeout),
                             name="repdisk-winner-watch", daemon=True).start()

    def _watch_for_a_winner(self, ended: threading.Event, every: float) -> None:
        """While this primary replicates to nobody (a link degraded, or replication not
        running) and is not fenced, ask its --secondary every ``every`` seconds whether it
        writes in a newer epoch (:meth:`superseded`: it failed over while this node was cut
        off or down); if so, fence this node, so that it acknowledges no more writes that
        the pair will drop.  With a controller, its contact fences such a node too."""
        while not ended.wait(every):
            if self.ctx.state.fenced:
                return
            if all(rep.stage is Stage.RUNNING and not rep.degraded
                   for rep in self.replicas.values()):
                continue
            reason = self.superseded()
            if reason is None:
                continue
            try:
                self.fence(reason)
            except RepdiskError as err:   # fenced already; stopping a replica failed
                log.error("fencing after a winner was found: %s", err)
            return

    def _secondary_answers(self) -> bool:
        """True if every disk's link acknowledged something since the last look; an idle
        link is probed, so the next look can tell."""
        answered = True
        for rep in self.replicas.values():
            acks = rep.link_acks()
            if acks is None or acks == self._acks.get(rep.name):
                answered = False
                rep.probe_link()
            self._acks[rep.name] = acks
        return answered

    def contact(self) -> None:
        if self.guard is not None:
            self.guard.contact()

    def isolation(self) -> dict[str, Any] | None:
        return self.guard.query() if self.guard else None

    def link_timeout(self) -> float | None:
        return max((rep.timeout for rep in self.replicas.values()), default=None)

    def disarm(self) -> None:
        """Stop the isolation guard (writes it holds are refused) and the winner watch."""
        if self._watching is not None:
            self._watching.set()
            self._watching = None
        if self.guard is not None:
            self.guard.close()
            self.guard = None
            self.ctx.admission.guard = None

    # -- the controller's commands ---------------------------------------------------

    def replication_over(self) -> str:
        """Every disk's replication was stopped (stage done): as in QEMU, a start is then
        ignored, so say so rather than answer ok and change nothing."""
        if any(rep.stage is not Stage.DONE for rep in self.replicas.values()):
            return ""
        if self.ctx.state.fenced:       # it lost a failover: never a primary again
            return (f"this primary was fenced ({self.ctx.state.fenced}): its replication is "
                    "over; restart its disk as the winner's secondary (repdisk secondary "
                    "--disk ...), in the winner's epoch")
        return ("replication was stopped on this primary (stage done) and does not start "
                "again in this process, as in QEMU: restart the node (stop its guest, stop "
                "the node, repdisk primary again) to replicate again")

    def before_start(self, epoch: int | None) -> None:
        for rep in self.replicas.values():  # its connections carry the epoch
            rep.epoch = max(self.ctx.state.epoch, epoch or 0)

    def resume(self) -> None:
        """End the checkpoint hold (the second half of a checkpoint)."""
        for rep in self.replicas.values():
            rep.resume()

    def resync(self) -> int:
        copied = sum(rep.resync() for rep in self.replicas.values())
        self.note_replicated()
        return copied

    def note_replicated(self) -> None:
        """After a start or resync copied to the secondary: each dirty map says what that
        secondary disk lacks from now on (what the next start trusts for the same disk)."""
        copied_to = {**self.ctx.state.replicated_to,
                     **{name: rep.peer_disk for name, rep in self.replicas.items()
                        if rep.peer_disk is not None}}
        for name, rep in self.replicas.items():
            rep.known_peer = copied_to.get(name)
        if copied_to != self.ctx.state.replicated_to:
            with self.ctx.changing_state() as state:
                state.replicated_to = copied_to

    def replica(self, disk: str) -> PrimaryReplica:
        rep = self.replicas.get(disk)
        if rep is None:
            raise ConfigError("disk", f"no disk named {disk!r}; this node has "
                                      f"{', '.join(self.replicas)}")
        return rep

    def mark_dirty(self, disk: str | None, runs: list[list[int]]) -> int:
        """These runs must be copied to the secondary (by start or resync)."""
        rep = self.replica(disk or self.ctx.cfg.disks[0].name)
        for offset, length in runs:
            rep.dirty.mark(offset, length)
        return rep.dirty.dirty_bytes

    def verify(self, disk: str | None, runs: list[list[int]] | None,
               repair: bool) -> list[dict[str, Any]]:
        """Compare each disk (or ``disk``) with the secondary where either holds data (this
        node's allocation, plus ``runs``: e.g. the secondary's); with ``repair`` copy the
        differing ranges.  One result per disk; an event and a log line each."""
        reps = list(self.replicas.values()) if disk is None else [self.replica(disk)]
        if runs is not None and len(reps) > 1:
            raise ConfigError("runs", "name the disk the runs are of (disk=NAME)")
        return [self._verify(rep, runs, repair) for rep in reps]

    def _verify(self, rep: PrimaryReplica, runs: list[list[int]] | None,
                repair: bool) -> dict[str, Any]:
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
        self.ctx.emit("VERIFY_COMPLETED", result)
        return result

    def fence(self, reason: str) -> None:
        """This primary lost a failover: refuse guest writes for good, stop replicating."""
        if self.guard is None:
            self.arm(self.ctx.cfg.on_isolation, self.ctx.cfg.isolation_timeout)
        assert self.guard is not None
        self.guard.fence(reason)
        with self.ctx.changing_state() as state:
            state.fenced = reason
        for rep in self.replicas.values():
            if rep.stage is Stage.RUNNING:
                rep.stop(failover=True)

    def hand_over(self) -> None:
        """The primary half of a demote: refuse guest writes, a final barrier, the seals,
        the links dropped; on a failure before every seal, roll back (still a running
        primary that admits writes) and raise.  See :meth:`Node.demote`."""
        ctx, primaries = self.ctx, list(self.replicas.values())
        if ctx.state.fenced:
            raise ReplicationError(f"cannot demote: this node is fenced ({ctx.state.fenced})")
        for rep in primaries:
            if rep.stage is not Stage.RUNNING or rep.degraded:
                raise ReplicationError(
                    f"{rep.name}: cannot demote: replication is "
                    f"{'degraded' if rep.degraded else rep.stage.value}, so the secondary may "
                    "lack acknowledged writes; resync first, or stop this node and fail over")
        why = "this node was demoted: it is a secondary now; write to the new primary"
        if not ctx.admission.refuse(why, ctx.cfg.primary.timeout):
            ctx.admission.admit()
            raise ReplicationError(f"cannot demote: guest writes under way did not finish "
                                   f"within {ctx.cfg.primary.timeout:g}s; nothing changed")
        try:
            for rep in primaries:
                rep.checkpoint()   # the final barrier; its hold keeps the link quiet
            for rep in primaries:
                rep.seal()
        except RepdiskError:
            for rep in primaries:
                rep.resume()
            ctx.admission.admit()
            raise
        for rep in primaries:
            rep.stop(failover=True)  # drop the link: the barrier already covered everything
        # The former secondaries hold the overlays' locks, which the new secondaries must
        # take: close them first.
        self.close_retired()

    def close_retired(self) -> None:
        for old in self.retired:
            old.close(disk=False)
        self.retired = []

    def close(self) -> None:
        """Stop the guard, the replicas; save the dirty maps if this primary served."""
        self.disarm()
        super().close()
        if self.ctx.state.unclean:
            try:
                self._save_dirty()
            except (OSError, ValueError) as err:
                log.error("cannot save the dirty maps (%s): the next start compares the disks",
                          err)
        self.close_retired()


def _unreachable_hint(error: str) -> str:
    """What to do about a secondary that did not answer at start-up: a failed TLS
    handshake (libnbd names GnuTLS) is a credentials mismatch, not a node that is down."""
    if "gnutls" in error.lower():
        return ("; the TLS handshake failed: give both nodes the same PSK file, or "
                "certificates of one CA naming the secondary's host (repdisk tls), not expired")
    return "; start the secondary first, or fix the URI"
