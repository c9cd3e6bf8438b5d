"""The controller: checkpoints, heartbeat, failover, resync and re-protection of a pair.

    repdisk controller --primary PRI.qmp --secondary SEC.qmp --control CTRL.qmp
    repdisk controller --primary 10.0.0.1:7000 --secondary 10.0.0.2:7000 --tls DIR ...

It talks only to control sockets (the nodes', the guest's QMP and guest agent) and never
touches data itself.  One thread (``run``) heartbeats both nodes every ``heartbeat`` and
acts on what it sees (``step``); operations also come from its own control socket.

State machine (states.py): the controller's state is a ``ControllerState``, written only by
``_set_state`` (which logs and emits ``CONTROLLER_STATE_CHANGED``) inside an operation.
Every operation is an ``Operation`` whose row in ``TRANSITIONS`` says the states it may
run in, the state shown while it runs and the states it may leave; ``gate`` is the only
check, and ``_operation`` runs one operation at a time under one lock (a second one waits,
then is gated against the state the first left).  A failed operation leaves its
``on_error`` state; ``promote`` changes nothing on either node until its checks pass, and
once the winner is a primary the promotion is complete (what is left is re-protection).

The other modules: the settings (config.py), a node as the controller sees it (peer.py),
the guest (guest.py), the control socket's commands (commands.py), a planned switchover
(switchover.py), the metrics (metrics.py); ``repdisk controller`` is cli/controllercmd.py.

What a heartbeat round (``step``) decides, in order (docs/failure-matrix.md has it all):

* starting or fenced -> adopt the pair as the nodes describe it (roles, epoch, state;
  refusing what it cannot adopt), then bring it up if it is not started;
* failed-over -> fence the failover's loser when it answers as a primary of an older
  epoch; wait for ``controller-promote``;
* primary silent for ``heartbeat_timeout`` -> fail over (refused by the node while the
  secondary is inconsistent), run the hook;
* secondary silent -> degraded (the primary tracks dirty regions by itself);
* degraded, a node not started, the primary dirty -> re-protect (start what is not
  started, copy the dirty regions, checkpoint; a restarted primary knows by itself what
  its secondary lacks), retried with a back-off of its own;
* otherwise a checkpoint every ``interval``.

Timing rules (checked against the primary's settings when the pair is adopted): the
primary's ``isolation-timeout`` and ``timeout`` < ``heartbeat_timeout``, so a primary that
is cut off from everyone holds its guest writes before the controller fails over.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from repdisk.controller import metrics, pairfile
from repdisk.controller import switchover as planned
from repdisk.controller.commands import control_commands
from repdisk.controller.config import ControllerConfig, same_address
from repdisk.controller.guest import Guest, migration_pause, save_vm_state
from repdisk.controller.peer import (
    ControllerRefused,
    NodeUnreachable,
    Peer,
    consistent,
    needs_resync,
    not_started,
    stages,
    start_under_way,
    won_failover,
)
from repdisk.controller.states import ControllerState, Operation, StateMachine
from repdisk.controller.syncplan import SYNC_MODES, Progress, SyncPlan
from repdisk.errors import ControlError, RepdiskError
from repdisk.node.role import serving_nodes
from repdisk.qmp.server import QMPServer, serve_control
from repdisk.replication import nbdclient
from repdisk.uri import export_name, tcp_address

log = logging.getLogger(__name__)


#: Events kept for query-controller.
EVENT_HISTORY = 50
#: Checkpoint records kept for query-controller.
CHECKPOINT_HISTORY = 10
#: Progress is logged and sent as an event at most this often.
PROGRESS_EVERY = 1.0
#: Longest wait between two failed attempts to re-protect (it doubles from heartbeat-timeout).
MAX_BACKOFF = 30.0


class Controller(StateMachine):
    """Runs one pair; see the module docstring.  Thread-safe: one operation at a time."""

    def __init__(self, cfg: ControllerConfig, serve: bool = True) -> None:
        cfg.check()
        super().__init__()
        self.cfg = cfg
        self.primary = Peer("primary", cfg.primary, cfg)
        self.secondary = Peer("secondary", cfg.secondary, cfg)
        self.epoch = 0
        self.progress: Progress | None = None
        self.last_failover: dict[str, Any] | None = None
        self.counters = {"checkpoints": 0, "checkpoint_failures": 0, "resync_bytes": 0,
                         "failovers": 0}
        self.checkpoints: deque[dict[str, Any]] = deque(maxlen=CHECKPOINT_HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)
        self._stop = threading.Event()
        self._next_checkpoint = 0.0
        #: (wall-clock time of the first, count) of the checkpoints failed since the last
        #: one that succeeded; None while they succeed.
        self.failing: tuple[float, int] | None = None
        self._retry_at = 0.0                     # no re-protection attempt before this
        self._backoff = cfg.heartbeat_timeout
        self._marked_for: str | None = None   # primary instance whose dirty map we filled
        self._sync_next: str | None = None    # the next bring-up's sync (promotion: checksum)
        self._old_primary_fenced = False
        #: The primary's write mode and max-lag (None: not seen), as last seen: a promotion
        #: keeps them (the write mode unless told).
        self.write_mode = "sync"
        self.max_lag: int | None = None
        self.last_error: str | None = None
        self._hook: subprocess.Popen[bytes] | None = None
        self.guest = Guest(cfg.qmp, cfg.libvirt_domain, cfg.libvirt_uri, cfg.freeze, cfg.qga,
                           timeout=cfg.heartbeat_timeout)
        self._progress_said = 0.0
        self._server: QMPServer | None = None
        self._recall_pair()
        if serve:
            self.serve()

    # -- which nodes the pair is, across restarts -----------------------------------------

    @property
    def pair_file(self) -> str | None:
        """``CONTROL.pair``: the pair's sockets now and the options that named it first."""
        return self.cfg.control + ".pair" if self.cfg.control else None

    def _recall_pair(self) -> None:
        """Restarted with the options it was first given, run the pair as it is now
        (pairfile.py)."""
        path = self.pair_file
        options = (self.cfg.primary, self.cfg.secondary)
        now = pairfile.recall(path, options) if path else None
        if path is not None:
            mode, self.max_lag = pairfile.recall_primary(path, options)
            self.write_mode = mode or self.write_mode
        if now is None or now == (self.primary.socket, self.secondary.socket):
            return
        log.warning("the pair changed since these options were first given: %s is its "
                    "primary node now, %s its secondary (from %s)", now[0], now[1], path)
        self.primary.close()
        self.secondary.close()
        self.primary = Peer("primary", now[0], self.cfg)
        self.secondary = Peer("secondary", now[1], self.cfg)

    def _pair_file_stale(self) -> bool:
        """A pair file is there but about other options (it lost to them at the start): it
        is rewritten, so that nothing reads the nodes it names as this pair's."""
        path = self.pair_file
        return path is not None and os.path.exists(path) and pairfile.recall(
            path, (self.cfg.primary, self.cfg.secondary)) != (self.primary.socket,
                                                              self.secondary.socket)

    def _note_primary(self, p: dict[str, Any] | None, remember: bool = True) -> None:
        """Keep the primary's write mode and max-lag (``remember``: in the pair file, when
        they change): a promotion after the primary is lost gives them to the new
        primary."""
        disk = (p["disks"][0] if p is not None and p.get("role") == "primary"
                and p.get("disks") else {})
        mode = disk.get("write_mode") or self.write_mode
        max_lag = disk.get("max_lag") or self.max_lag
        if (mode, max_lag) != (self.write_mode, self.max_lag):
            self.write_mode, self.max_lag = mode, max_lag
            if remember:
                self._remember_pair()

    def _carried(self) -> dict[str, Any]:
        """replication-promote's arguments that the new primary takes from the pair."""
        return {"write-mode": self.write_mode,
                **({"max-lag": self.max_lag} if self.max_lag is not None else {})}

    def _remember_pair(self) -> None:
        """Write the pair file (durably): after every change of the peers."""
        if self.pair_file is not None:
            pairfile.remember(self.pair_file, (self.cfg.primary, self.cfg.secondary),
                              self.primary.socket, self.secondary.socket, self.write_mode,
                              self.max_lag)

    def serve(self) -> None:
        """Serve the controller's control socket (and TCP port, if configured)."""
        cfg = self.cfg
        if self._server is None and (cfg.control or cfg.control_tcp):
            self._server = QMPServer(control_commands(self), name="repdisk-controller")
            if cfg.control:
                self._server.serve_unix(cfg.control)
            if cfg.control_tcp:
                serve_control(self._server, cfg.control_tcp, cfg.control_tls)

    # -- events --------------------------------------------------------------------------

    def _event(self, name: str, level: int = logging.INFO, /, **data: Any) -> None:
        """Log, remember (query-controller) and send (control socket) one event."""
        self.events.append({"time": time.time(), "event": name, "data": data})
        log.log(level, "%s %s", name, " ".join(f"{k}={v}" for k, v in data.items()))
        if self._server is not None:
            self._server.emit(name, data)

    # -- adopting the pair ---------------------------------------------------------------

    def start(self) -> None:
        """Adopt the pair and, if it is not started, bring it up; raise if that fails."""
        self.adopt()
        with self._lock:
            if self.state is ControllerState.STARTING:
                self._start()

    def adopt(self) -> None:
        """Learn from the nodes which one is primary, the epoch and the pair's state.

        Changes nothing on the nodes (but takes their leases).  Raises ControllerRefused for
        a pair it cannot run (the message names the command to run instead) and
        NodeUnreachable while neither node answers."""
        with self._operation(Operation.ADOPT):
            before = (self.primary.socket, self.secondary.socket, self.write_mode, self.max_lag)
            self._adopt()
            if (self.primary.socket, self.secondary.socket, self.write_mode,
                    self.max_lag) != before or self._pair_file_stale():
                self._remember_pair()   # once the adoption stands: a refusal writes nothing

    def _peek(self, peer: Peer) -> dict[str, Any] | None:
        try:
            return peer.query()
        except NodeUnreachable as err:
            peer.lost(err)
            return None

    def _adopt(self) -> None:
        a, b = self._peek(self.primary), self._peek(self.secondary)
        if a is None and b is None:
            raise NodeUnreachable(f"neither {self.primary.socket} nor {self.secondary.socket} "
                                  "answers")
        if a is not None and b is not None and a.get("instance") == b.get("instance"):
            raise ControllerRefused(f"{self.primary.socket} and {self.secondary.socket} are the "
                                    "same node: give the other node's control socket")
        roles = (a or {}).get("role"), (b or {}).get("role")
        if roles in (("secondary", "primary"), ("secondary", None), (None, "primary")) \
                or (roles == ("secondary", "secondary") and won_failover(a)
                    and (not won_failover(b) or a["epoch"] > b["epoch"])):
            self._swap(remember=False)
            a, b = b, a
            log.warning("adopting the pair as it is now: %s is the primary, %s the secondary "
                        "(their roles changed since this controller's options were written)",
                        self.primary.socket, self.secondary.socket)
        p, s = a, b
        # The nodes' epoch, as they say it (a pair started by hand runs in epoch 0); the
        # controller's own start of a pair begins at 1 (_protect).
        self.epoch = max(self.epoch, (p or {}).get("epoch", 0), (s or {}).get("epoch", 0))
        if won_failover(s) and (p is None or p.get("role") != "primary" or p.get("fenced")
                           or p["epoch"] < s["epoch"]):
            self._set_state(ControllerState.FAILED_OVER,
                            f"{self.secondary.socket} won the failover into epoch "
                            f"{s['epoch']}: promote it (controller-promote)")
            return
        if p is not None and p.get("role") != "primary":
            raise ControllerRefused(
                f"{self.primary.socket} and {self.secondary.socket} are both secondaries and "
                "neither won a failover: start the node with the newest data as a primary "
                "(repdisk primary --disk ... --secondary URI)")
        if s is not None and s.get("role") != "secondary":
            fenced = [q for q in (p, s) if q and q.get("fenced")]
            hint = ("restart the fenced node's disk as a secondary (repdisk secondary) and "
                    "start the controller with the other as --primary" if fenced else
                    "restart the one with the older data as a secondary")
            raise ControllerRefused(f"{self.primary.socket} and {self.secondary.socket} are "
                                    f"both primaries: {hint}")
        if p is None:
            # The primary is silent: adopt a replicating pair (it fails over after
            # heartbeat-timeout, as it would have), wait otherwise.
            assert s is not None
            if not not_started(s) and consistent(s):
                self._set_state(ControllerState.RUNNING, "adopted; the primary does not answer")
            return
        self._check_timing(p)
        self._note_primary(p, remember=False)   # adopt() writes the pair file
        if p.get("fenced"):
            self._set_state(ControllerState.FENCED, f"the primary is fenced: {p['fenced']}")
        elif s is not None and won_failover(s) and s["epoch"] >= p["epoch"]:
            raise ControllerRefused(f"secondary {self.secondary.socket} won the failover into "
                                    f"epoch {s['epoch']} and holds the newest data: "
                                    "promote it (controller-promote) instead of overwriting it")
        elif not_started(p) or s is None or not_started(s):
            self._set_state(ControllerState.STARTING if not_started(p) else
                            ControllerState.DEGRADED, "adopted; the pair is not started")
        else:
            clean = consistent(s) and not needs_resync(p)
            self._set_state(ControllerState.RUNNING if clean else ControllerState.DEGRADED,
                            "adopted the running pair")
            self._next_checkpoint = 0.0          # a checkpoint at once

    def _swap(self, remember: bool = True) -> None:
        """The peers exchange roles; ``remember`` writes the pair file."""
        self.primary, self.secondary = self.secondary, self.primary
        self.primary.set_role("primary")
        self.secondary.set_role("secondary")
        if remember:
            self._remember_pair()

    def _check_timing(self, p: dict[str, Any]) -> None:
        """docs/failure-matrix.md's timing rules against the primary's own settings."""
        limit = self.cfg.heartbeat_timeout
        over = [(key, value) for key, value in
                (("isolation-timeout", (p.get("isolation") or {}).get("timeout")),
                 ("timeout", p.get("timeout"))) if value is not None and value >= limit]
        if over:  # one suggestion that satisfies every rule at once
            has = " and ".join(f"{key}={value:g}s" for key, value in over)
            keys = " and ".join(key for key, _ in over)
            raise ControllerRefused(
                f"the primary {self.primary.socket} has {has}, which must be below "
                f"--heartbeat-timeout ({limit:g}s) or an isolated primary could still "
                f"acknowledge writes after a failover: give --heartbeat-timeout "
                f"{max(value for _, value in over) + 1:g}s (or start the primary with a "
                f"shorter {keys})")

    # -- bringing up and re-protecting ---------------------------------------------------

    def _start(self) -> None:
        with self._operation(Operation.START):
            self._protect("dirty")

    def resync(self, mode: str = "dirty") -> int:
        """Re-protect now: ``dirty`` copies the primary's dirty map; ``checksum`` or ``full``
        first mark what differs (e.g. after the secondary's host crashed)."""
        if mode not in ("dirty", *SYNC_MODES):
            raise ControlError(f"unknown resync mode {mode!r}: use dirty, checksum or full")
        with self._operation(Operation.RESYNC):
            return self._protect(mode)

    def _protect(self, mode: str) -> int:
        """Start what is not started, sync, copy what is dirty, checkpoint -> running.

        Acts on fresh answers (never on a heartbeat taken before another operation); a
        failure backs off (heartbeat-timeout, doubling to MAX_BACKOFF) before the heartbeat
        tries again, whatever the checkpoint interval."""
        try:
            p, s = self.primary.query(), self.secondary.query()
            if p.get("fenced"):
                raise ControlError(f"primary {self.primary.socket} is fenced ({p['fenced']}): "
                                   "promote the winner, or restart this node as its secondary")
            if won_failover(s) and s["epoch"] >= p["epoch"]:
                raise ControlError(f"secondary {self.secondary.socket} won the failover into "
                                   f"epoch {s['epoch']} and holds the newest data: promote "
                                   "it (controller-promote) instead of overwriting it")
            unsent = s.get("unsent-as-primary")
            if unsent and not_started(s) and p["epoch"] <= s["epoch"]:
                raise ControlError(f"{self.secondary.socket} was the primary of epoch "
                                   f"{s['epoch']} and {unsent}: start it as the primary "
                                   "again (swap the nodes' roles), or, once those writes are "
                                   "no longer wanted, start it as a secondary with epoch="
                                   f"{s['epoch'] + 1} (repdisk ctl SOCKET start "
                                   f"mode=secondary epoch={s['epoch'] + 1})")
            # A pair this controller starts begins in epoch 1; a running primary's epoch is
            # the pair's (a pair started by hand runs in 0): a secondary started in any
            # other would refuse its writer sessions (sessions.py).
            self.epoch = max(self.epoch, p["epoch"], s["epoch"], 1 if not_started(p) else 0)
            sent = self._start_pair(p, s, mode)
        except RepdiskError:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            raise
        self._backoff, self._retry_at = self.cfg.heartbeat_timeout, 0.0
        self._set_state(ControllerState.RUNNING)
        return sent

    def _start_pair(self, p: dict[str, Any], s: dict[str, Any], mode: str) -> int:
        if not_started(s):
            self.secondary.ops.call("replication-start", {"mode": "secondary",
                                                          "epoch": self.epoch})
        if not_started(p) and start_under_way(p):
            p = self._await_start()
        sent = 0
        if not_started(p):
            sync = self._sync_mode(p)
            if sync != "none":
                self._sync(sync, p)
            self._marked_for, self._sync_next = p["instance"], None
            sent = self._copy("replication-start", {"mode": "primary", "epoch": self.epoch,
                                                    "secondary-instance": s["instance"]})
        else:
            if mode != "dirty":
                self._sync(mode, p)
            if mode != "dirty" or needs_resync(p) or not_started(s):
                sent = self._copy("replication-resync", {})
        self._marked_for = p["instance"]
        self._checkpoint_now()
        return sent

    def _await_start(self) -> dict[str, Any]:
        """Wait for a start of the primary that someone else asked for (a controller killed
        during its start: the node's start goes on), rather than start again; the primary's
        answer once it ended.  Heartbeats both nodes meanwhile, as during a copy; raises
        NodeUnreachable if the primary stops answering."""
        log.warning("%s: a start is under way on the primary (asked for before this "
                    "controller): waiting for it", self.primary.socket)
        while (p := self.primary.beat()) is not None and start_under_way(p):
            self.secondary.beat()
            time.sleep(self.cfg.heartbeat)
        return self.primary.query()

    def _sync_mode(self, p: dict[str, Any]) -> str:
        """How to find what the secondary lacks before a primary process first starts."""
        if self._marked_for == p["instance"]:
            return "none"                       # this process's dirty map has it already
        if self._sync_next is not None:
            return self._sync_next              # a promotion: compare by checksum
        if self._marked_for is None:
            return self.cfg.initial_sync        # this controller's first bring-up
        # The primary restarted: it knows by itself what its secondary lacks (the dirty map
        # a clean stop saved, or its own digest comparison after a crash: DESIGN.md, "The
        # dirty map across stops and crashes"), so a comparison here would only repeat it.
        return "none"

    def _sync(self, mode: str, p: dict[str, Any]) -> None:
        disks = [(d["disk"], d["size"]) for d in p["disks"]]
        self._event("SYNC_STARTED", mode=mode, bytes=sum(n for _, n in disks))
        t0 = time.monotonic()
        plan = SyncPlan(primary=self.primary.ops.call, secondary=self.secondary.ops.call,
                               disks=disks, mode=mode, granularity=self.cfg.granularity,
                               on_progress=self._on_progress)
        marked = plan.run()
        self.progress = None
        self._event("SYNC_COMPARED", mode=mode, marked=marked, dirty=sum(plan.dirty.values()),
                    duration=round(time.monotonic() - t0, 3))

    def _copy(self, command: str, args: dict[str, Any]) -> int:
        """Run a primary command that copies dirty regions; follow its progress; bytes sent."""
        t0 = time.monotonic()
        sent: dict[str, int] = {}

        def on_events(events: list[dict[str, Any]]) -> None:
            for ev in events:
                if ev.get("event") == "RESYNC_PROGRESS":
                    data = ev.get("data", {})
                    sent[data.get("disk", "")] = data.get("done", 0)

        dirty = sum(d.get("dirty_bytes", 0) for d in self.primary.query()["disks"])
        self._event("RESYNC_STARTED", command=command, dirty=dirty)
        self.progress = Progress("copy", dirty)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch_copy, args=(done,), daemon=True)
        watcher.start()
        try:
            result = self.primary.ops.call(command, args, on_events=on_events)
        finally:
            done.set()
            watcher.join()
            self.progress = None
        total = result["bytes"] if isinstance(result, dict) and "bytes" in result else \
            sum(sent.values())
        self.counters["resync_bytes"] += total
        self._event("RESYNC_COMPLETED", command=command, bytes=total,
                    duration=round(time.monotonic() - t0, 3))
        return total

    def _watch_copy(self, done: threading.Event) -> None:
        """While a copy runs: heartbeat both nodes (contact, leases), follow the progress."""
        while not done.wait(self.cfg.heartbeat):
            q = self.primary.beat()
            self.secondary.beat()
            progress = self.progress
            if q is None or progress is None:
                continue
            if progress.phase == "verify":  # the primary's verify says how far it is
                for d in q["disks"]:
                    if d.get("verify_progress"):
                        progress.update(d["verify_progress"]["done"])
                        self._on_progress(progress, d["disk"])
                continue
            dirty = sum(d.get("dirty_bytes", 0) for d in q["disks"])
            progress.update(max(progress.total - dirty, 0))
            self._on_progress(progress)

    def _on_progress(self, progress: Progress, disk: str | None = None) -> None:
        """Record, log and send progress (RESYNC_PROGRESS; VERIFY_PROGRESS of ``disk``
        while verifying); keep both nodes' contact while comparing."""
        self.progress = progress
        now = time.monotonic()
        if progress.phase != "copy" and now - self.primary.last_seen >= self.cfg.heartbeat:
            self.primary.beat()
            self.secondary.beat()
        if now - self._progress_said >= PROGRESS_EVERY or progress.done >= progress.total:
            self._progress_said = now
            if progress.phase == "verify":
                self._event("VERIFY_PROGRESS", disk=disk, **progress.as_dict())
            else:
                self._event("RESYNC_PROGRESS", **progress.as_dict())

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """One pair checkpoint (DESIGN.md's order); returns its record, raises on failure."""
        with self._operation(Operation.CHECKPOINT):
            return self._checkpoint_now()

    def _checkpoint_now(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"seq": self.counters["checkpoints"] + 1, "time": time.time()}
        t0 = time.monotonic()
        try:
            self._check_replicated()     # before the guest's pause: it costs two queries
            rec["pause"] = self.guest.paused(lambda: self._pair_checkpoint(rec))
        except RepdiskError as err:
            self.counters["checkpoint_failures"] += 1
            since, count = self.failing or (rec["time"], 0)
            self.failing = (since, count + 1)
            self._next_checkpoint = time.monotonic() + self.cfg.heartbeat_timeout
            self._event("CHECKPOINT_FAILED", logging.WARNING, error=str(err))
            raise
        rec["duration"] = time.monotonic() - t0
        self.failing = None
        self.counters["checkpoints"] += 1
        self.checkpoints.append(rec)
        # --interval apart, start to start: it bounds what a failover rolls back.
        self._next_checkpoint = t0 + self.cfg.interval
        self._event("CHECKPOINT_COMPLETED", seq=rec["seq"], duration=round(rec["duration"], 6),
                    pause=round(rec["pause"], 6))
        return rec

    def _check_replicated(self) -> None:
        """Refuse, changing nothing, a checkpoint of a secondary into which the primary does
        not replicate now (its --secondary names another node, or its link is down): a
        checkpoint would call that disk a consistent copy, and a failover hand it over."""
        p, s = self.primary.query(), self.secondary.query()
        writers = {d["disk"]: d.get("writer") for d in p["disks"]}
        for d in s["disks"]:
            if d.get("no_primary_since") is None and d.get("writer") == writers.get(d["disk"]):
                continue
            raise ControlError(
                f"cannot checkpoint: the primary {self.primary.socket} does not replicate into "
                f"{self.secondary.socket} now (its disk {d['disk']} has "
                + ("no primary connected" if d.get("no_primary_since") is not None else
                   "another primary disk's session") + "): if it stays so, the primary's "
                "--secondary names another node's replica export; restart the primary with "
                f"{self.secondary.socket}'s, or give this controller that node's control socket")

    def _pair_checkpoint(self, rec: dict[str, Any]) -> None:
        tmp = None
        if self.cfg.vm_state:
            # Before the primary's hold: the migration's end flushes the guest's disks, and a
            # flush held by the checkpoint would wait for the hold to expire.  The guest is
            # stopped, so its disks are the same before and after the barrier.
            tmp = os.path.join(self.cfg.vm_state, "vmstate.tmp")
            rec["vm_state_bytes"] = save_vm_state(self.guest.monitor(), tmp)
        self.primary.ops.call("replication-do-checkpoint")          # barrier + hold
        try:
            self.secondary.ops.call("replication-get-error")
            self.secondary.ops.call("replication-do-checkpoint")
            if tmp:
                os.replace(tmp, os.path.join(self.cfg.vm_state or "", "vmstate"))
        finally:
            self.primary.ops.call("replication-resume")

    # -- failover ------------------------------------------------------------------------

    def failover(self, reason: str = "requested by an operator",
                 manual: bool = True) -> dict[str, Any]:
        """Fail over to the secondary now; a reachable primary is fenced first (manual)."""
        with self._operation(Operation.FAILOVER):
            return self._failover(reason, manual)

    def _failover(self, reason: str, manual: bool) -> dict[str, Any]:
        lost_at = self.primary.last_seen
        began = time.monotonic()
        s = self.secondary.query()
        unready = [d["disk"] for d in s["disks"]
                   if d["stage"] == "running" and not d.get("consistent")]
        if unready:
            self._event("FAILOVER_REFUSED", logging.ERROR, reason=reason, disks=unready)
            raise ControlError(f"cannot fail over to {self.secondary.socket}: disk(s) "
                               f"{', '.join(unready)} hold no complete checkpoint (a sync is "
                               "in progress); the primary's data is the only good copy")
        self._event("FAILOVER_STARTED", logging.WARNING, reason=reason)
        if manual and self.primary.reachable:
            self._fence_old_primary(f"manual failover to {self.secondary.socket} "
                                    f"(epoch {s['epoch'] + 1})")
        self.secondary.ops.call("replication-stop", {"failover": True})
        s = self.secondary.query()
        self.epoch = s["epoch"]
        now = time.monotonic()
        rec = {"time": time.time(), "reason": reason, "epoch": self.epoch,
               "loss_to_serving": round(now - lost_at, 3) if not manual else None,
               "failover": round(now - began, 3)}
        self.last_failover = rec
        self.counters["failovers"] += 1
        self._set_state(ControllerState.FAILED_OVER, reason)
        self._event("FAILOVER_COMPLETED", logging.WARNING, **rec)
        self._run_hook(self.cfg.on_failover)
        return rec

    def _loser(self, p: dict[str, Any]) -> bool:
        """The failover's loser answering as a primary: an older epoch than the pair's, never
        the winner itself (whatever the controller's own bookkeeping says)."""
        winner = self.secondary.last or {}
        return (p.get("role") == "primary" and not p.get("fenced")
                and p.get("epoch", 0) < self.epoch
                and p.get("instance") != winner.get("instance"))

    def _fence(self, reason: str) -> None:
        with self._operation(Operation.FENCE):
            p = self.primary.query()
            if self._loser(p):
                self._fence_old_primary(reason)

    def _fence_old_primary(self, reason: str) -> None:
        try:
            self.primary.ops.call("replication-fence", {"reason": reason})
        except (NodeUnreachable, ControlError) as err:
            log.warning("could not fence the old primary %s yet: %s", self.primary.socket, err)
            return
        self._old_primary_fenced = True
        self._event("OLD_PRIMARY_FENCED", logging.WARNING, node=self.primary.socket,
                    reason=reason)

    def _old_primary_found_fenced(self, reason: str) -> None:
        self._old_primary_fenced = True
        self._event("OLD_PRIMARY_FENCED", logging.WARNING, node=self.primary.socket,
                    reason=reason)

    def _run_hook(self, command: str | None) -> None:
        """Run ``command`` (--on-failover, --on-switchover; None: nothing) with the pair's
        epoch and controls.

        REPDISK_SECONDARY_CONTROL names the failover's winner (after a switchover: the new
        primary, also REPDISK_PRIMARY_CONTROL), REPDISK_VM_STATE the saved VM state."""
        if not command:
            return
        env = dict(os.environ, REPDISK_EPOCH=str(self.epoch),
                   REPDISK_SECONDARY_CONTROL=self.secondary.socket,
                   REPDISK_PRIMARY_CONTROL=self.primary.socket)
        env.pop("REPDISK_VM_STATE", None)
        if self.cfg.vm_state and os.path.exists(os.path.join(self.cfg.vm_state, "vmstate")):
            env["REPDISK_VM_STATE"] = os.path.join(self.cfg.vm_state, "vmstate")
        self._hook = subprocess.Popen(command, shell=True, env=env, stdin=subprocess.DEVNULL)
        self._event("HOOK_STARTED", command=command, pid=self._hook.pid)

    def _poll_hook(self) -> None:
        if self._hook is not None and self._hook.poll() is not None:
            rc, self._hook = self._hook.returncode, None
            self._event("HOOK_COMPLETED", logging.INFO if rc == 0 else logging.ERROR, rc=rc)

    # -- verify and switchover -----------------------------------------------------------

    def verify(self, repair: bool = False) -> dict[str, Any]:
        """Compare the nodes' disks where either holds data while the guest writes (the
        primary's replication-verify, told where the secondary holds data); the exact
        differing ranges per disk; ``repair`` copies just those.  Both nodes are
        heartbeaten meanwhile."""
        with self._operation(Operation.VERIFY):
            began = time.monotonic()
            done = threading.Event()
            watcher = threading.Thread(target=self._watch_copy, args=(done,), daemon=True)
            watcher.start()
            try:
                results = []
                for d in self.secondary.query()["disks"]:
                    runs = self.secondary.ops.call("query-allocation",
                                                   {"disk": d["disk"]})["runs"]
                    self.progress = Progress("verify", sum(n for _, n in runs))
                    results += self.primary.ops.call("replication-verify", {
                        "disk": d["disk"], "runs": runs, "repair": repair})["disks"]
                    self.progress.update(self.progress.total)
                    self._on_progress(self.progress, d["disk"])
            finally:
                done.set()
                watcher.join()
                self.progress = None
            differ = sum(r["bytes"] for r in results)
            self._event("VERIFY_COMPLETED", logging.WARNING if differ else logging.INFO,
                        disks=[{k: r[k] for k in ("disk", "compared", "bytes", "ranges")
                                + (("repaired",) if "repaired" in r else ())}
                               for r in results],
                        duration=round(time.monotonic() - began, 3))
            return {"disks": results}

    def switchover(self, uri: str, back_uri: str, migrate: str | None = None,
                   qmp: str | None = None) -> dict[str, Any]:
        """A planned role swap (switchover.py): the secondary becomes the primary with
        nothing lost or copied, the primary its secondary; --on-switchover runs after it.

        ``uri``/``back_uri``: the primary's/secondary's replica NBD URIs (the new primary
        replicates to ``uri``; a roll-back to ``back_uri``).  With --qmp the guest must
        move: ``migrate`` (QMP migrate's URI of a QEMU paused with -incoming on the
        secondary's host) and ``qmp`` (its monitor: resumed after the switch, paused at
        checkpoints from then on)."""
        if self.guest.managed and not (migrate and qmp):
            raise ControlError("cannot switch over: the guest runs on the primary's host; give "
                               "migrate=URI of a QEMU started paused with -incoming on the "
                               "secondary's host (its disks: the secondary's active exports) "
                               "and qmp=ITS.qmp")
        with self._operation(Operation.SWITCHOVER):
            p = self.primary.query()
            self._check_replica_uri("uri", uri, self.primary, p)
            self._check_replica_uri("back-uri", back_uri, self.secondary,
                                    self.secondary.query())
            a = planned.Node(self._caller(self.primary), uri, self.primary.socket)
            b = planned.Node(self._caller(self.secondary), back_uri, self.secondary.socket)
            self._event("SWITCHOVER_STARTED", primary=a.name, secondary=b.name)
            result = planned.switchover(
                a, b, write_mode=p["disks"][0].get("write_mode", "sync"),
                max_lag=p["disks"][0].get("max_lag"),
                timings=self._primary_timings(),
                catch_up_wait=self.cfg.heartbeat_timeout,
                catch_up_poll="replication-heartbeat",   # the run loop waits meanwhile
                pause=(migration_pause(self.guest.monitor, migrate, qmp) if migrate and qmp
                       else planned.no_pause))
            self._swap()
            self.epoch = result["epoch"]
            self._next_checkpoint = 0.0     # the new pair's first, as this controller's
            if qmp:
                self.guest.moved(qmp)
            self.counters["switchovers"] = self.counters.get("switchovers", 0) + 1
            self._event("SWITCHOVER_COMPLETED", logging.WARNING, primary=self.primary.socket,
                        secondary=self.secondary.socket, **result)
            self._run_hook(self.cfg.on_switchover)
            return result

    @staticmethod
    def _check_replica_uri(what: str, uri: str, peer: Peer, q: dict[str, Any]) -> None:
        """Before a switchover changes anything: ``uri`` names a replica export of the
        node ``peer`` is (its exports' descriptions name its instance), or does not answer
        from here (the nodes then find out, and a failure rolls back)."""
        if not export_name(uri).startswith("replica"):
            raise ControlError(f"cannot switch over: {what}={uri} names export "
                               f"{export_name(uri)!r}, not a replica export (.../replica?...); "
                               "nothing changed")
        listed = nbdclient.list_exports(uri, 2.0)
        if not listed:
            return
        theirs = serving_nodes(listed)
        if theirs != {q.get("instance")}:
            raise ControlError(f"cannot switch over: {what}={uri} is not the {peer.role} "
                               f"{peer.socket}'s (uri= is the primary's replica URI, "
                               "back-uri= the secondary's); nothing changed")

    @staticmethod
    def _caller(peer: Peer) -> planned.Call:
        return lambda command, args: peer.ops.call(command, args)

    # -- promotion -----------------------------------------------------------------------

    def promote(self, secondary_control: str, secondary_uri: str,
                write_mode: str | None = None) -> dict[str, Any]:
        """Make the failover's winner the primary of a new pair with ``secondary_control``
        (its replica export at ``secondary_uri``); a checksum sync makes that node equal.
        ``write_mode``: the new primary's (None: the lost primary's, as last seen).

        Completes or changes nothing: every check (the new secondary answers, is a
        secondary not yet started, is not the winner, has the winner's disk sizes; the
        winner reaches ``secondary_uri``) runs before the winner is promoted, and a refusal
        leaves the controller failed-over with its peers as they were.  Once the winner is
        a primary the promotion is done: if re-protecting the new pair fails, the pair is
        degraded and the heartbeat retries with a back-off.  Returns the state it left."""
        if tcp_address(secondary_control) is None:   # as recorded in the pair file
            secondary_control = os.path.abspath(secondary_control)
        with self._operation(Operation.PROMOTE):
            new = self._promotion_checked(secondary_control)
            instance = (new.last or {}).get("instance")   # the URI must be that node's
            try:
                self.secondary.ops.call("replication-promote", {
                    "secondary": secondary_uri, **self._carried(),
                    **({"write-mode": write_mode} if write_mode else {}), "probe": True,
                    **({"secondary-instance": instance} if instance else {}),
                    **self._primary_timings()})
            except BaseException:
                new.close()
                raise
            old, self.primary, self.secondary = self.primary, self.secondary, new
            self.primary.set_role("primary")
            old.close()
            self._remember_pair()
            self._old_primary_fenced = False
            self._marked_for, self._sync_next = None, "checksum"
            self._next_checkpoint = 0.0
            self._event("NODE_PROMOTED", node=self.primary.socket, secondary=secondary_control,
                        epoch=self.epoch)
            try:
                self._protect("dirty")
            except RepdiskError as err:
                self._set_state(ControllerState.DEGRADED,
                                f"promoted; re-protecting {secondary_control} failed: {err}")
                return {"state": self.state.value, "error": str(err)}
            return {"state": self.state.value}

    def _primary_timings(self) -> dict[str, float]:
        """replication-promote's timings for a node this controller makes the primary:
        below --heartbeat-timeout, as _check_timing requires of every primary it runs."""
        return {"timeout": min(5.0, self.cfg.heartbeat_timeout * 0.8),
                "isolation-timeout": self.cfg.heartbeat_timeout * 0.6}

    def _promotion_checked(self, control: str) -> Peer:
        """The new secondary's peer, once everything a promotion needs is known to hold."""
        winner = self.secondary
        if same_address(control, winner.socket):
            raise ControlError(f"cannot promote: {control} is the failover's winner itself; "
                               "give the control socket of the node to become its secondary")
        try:
            w = winner.query()
        except NodeUnreachable as err:
            raise ControlError(f"cannot promote: the failover's winner {winner.socket} does "
                               f"not answer ({err})") from err
        if w.get("role") == "primary":
            raise ControlError(f"cannot promote: the failover's winner {winner.socket} is a "
                               "primary already (promoted by hand?): this controller adopts "
                               "the pair as the nodes describe it at its next heartbeat "
                               "(repdisk status shows it)")
        new = Peer("secondary", control, self.cfg)
        try:
            try:
                n = new.query()
            except NodeUnreachable as err:
                raise ControlError(f"cannot promote: the new secondary {control} does not "
                                   f"answer ({err}): start it first (repdisk secondary "
                                   f"--disk DISK --control {control} ...)") from err
            if n.get("instance") == w.get("instance"):
                raise ControlError(f"cannot promote: {control} is the failover's winner itself")
            if n.get("role") != "secondary":
                fenced = f" (fenced: {n['fenced']})" if n.get("fenced") else ""
                raise ControlError(f"cannot promote: {control} is a {n.get('role')}{fenced}: "
                                   "restart its disk as a secondary (repdisk secondary --disk "
                                   "DISK ...) and promote again")
            if not not_started(n):
                raise ControlError(f"cannot promote: {control} already replicates (stage "
                                   f"{', '.join(sorted(stages(n)))}): restart it")
            if won_failover(n) and n["epoch"] >= w["epoch"]:
                raise ControlError(f"cannot promote: {control} won the failover into epoch "
                                   f"{n['epoch']}, after {winner.socket}: promote it instead")
            sizes = {d["disk"]: d["size"] for d in w["disks"]}
            theirs = {d["disk"]: d["size"] for d in n["disks"]}
            if sizes != theirs:
                raise ControlError(f"cannot promote: {control} has disks {theirs}, the winner "
                                   f"{sizes}: give the new secondary the same disks")
        except BaseException:
            new.close()
            raise
        return new

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> None:
        """One heartbeat round: look at both nodes, then act (at most one operation).

        The beats run outside the lock; an operation may end meanwhile (a promotion swaps
        the peers, a resync starts a node), and the answers then describe a pair that is
        no more: that round only looks."""
        generation = self._generation
        primary, secondary = self.primary, self.secondary
        contact = self.state not in (ControllerState.FAILED_OVER, ControllerState.PROMOTING)
        p, s = primary.beat(contact=contact), secondary.beat()
        self._poll_hook()
        try:
            with self._lock:
                if generation == self._generation and self.state is not ControllerState.STOPPED \
                        and not (primary.refused or secondary.refused):
                    self._note_primary(p)
                    if primary.came_back() | secondary.came_back():
                        self._backoff, self._retry_at = self.cfg.heartbeat_timeout, 0.0
                    with self._operation(Operation.HEARTBEAT):
                        then = self._decide(p, s)
                    if then is not None:
                        then()
                        self.last_error = None
        except RepdiskError as err:
            log.warning("%s: %s", self.state.value, err)
            self.last_error = str(err)
        self._write_metrics()

    def _decide(self, p: dict[str, Any] | None,
                s: dict[str, Any] | None) -> Callable[[], Any] | None:
        """The heartbeat's decision: the operation to run next (None: nothing)."""
        state, now = self.state, time.monotonic()
        if state in (ControllerState.STARTING, ControllerState.FENCED):
            if (p is None and s is None) or now < self._retry_at:
                return None
            return self._adopt_and_start
        if state is ControllerState.FAILED_OVER:
            if p is not None and self._loser(p):
                return lambda: self._fence(f"the pair failed over to {self.secondary.socket} "
                                           f"in epoch {self.epoch}")
            if p is not None and p.get("fenced") and not self._old_primary_fenced \
                    and p.get("epoch", 0) < self.epoch:
                # It fenced itself at start-up: it saw the winner's newer epoch.
                return lambda: self._old_primary_found_fenced(str(p["fenced"]))
            if s is not None and s.get("role") == "primary" and now >= self._retry_at:
                return self._adopt_and_start      # the winner was promoted by hand
            return None
        if p is None:
            if s is None:
                return None          # both silent: nothing to fail over to (logged once each)
            silent = self.primary.silent_for()
            if silent >= self.cfg.heartbeat_timeout and self.cfg.auto_failover:
                return lambda: self.failover(f"primary lost: no answer for {silent:.1f}s",
                                             manual=False)
            return None
        if s is not None and won_failover(s) and s["epoch"] > p.get("epoch", 0):
            # Failed over without this controller (repdisk ctl SEC failover): the secondary
            # holds the newest data; the next round fences the primary that lost.
            self.epoch = max(self.epoch, s["epoch"])
            self.last_failover = {"time": time.time(), "epoch": s["epoch"],
                                  "reason": "made without this controller (noticed at a "
                                            "heartbeat)",
                                  "loss_to_serving": None, "failover": None}
            self.counters["failovers"] += 1
            self._set_state(ControllerState.FAILED_OVER,
                            f"{self.secondary.socket} won the failover into epoch "
                            f"{s['epoch']} without this controller: promote it "
                            "(controller-promote)")
            return None
        if p.get("fenced"):
            self._set_state(ControllerState.FENCED, f"the primary is fenced: {p['fenced']}")
            return None
        if s is None:
            if state is ControllerState.RUNNING:
                self._set_state(ControllerState.DEGRADED,
                                f"the secondary {self.secondary.socket} does not answer")
            return None
        if (state is ControllerState.DEGRADED or not_started(p) or not_started(s)
                or needs_resync(p)):
            return self.resync if now >= self._retry_at else None
        if not consistent(s) or now >= self._next_checkpoint:
            return self.checkpoint
        return None

    def _adopt_and_start(self) -> None:
        try:
            self.adopt()
        except NodeUnreachable:
            return
        except ControllerRefused:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            raise
        if self.state is ControllerState.STARTING:
            self._start()

    def run(self) -> None:
        """Step every ``heartbeat`` (and when a checkpoint is due) until ``stop()``."""
        while not self._stop.is_set():
            began = time.monotonic()
            self.step()
            now = time.monotonic()
            wait = self.cfg.heartbeat - (now - began)
            if self.state is ControllerState.RUNNING and now < self._next_checkpoint:
                wait = min(wait, self._next_checkpoint - now)  # a checkpoint on time
            self._stop.wait(max(0.0, wait))

    def stop(self) -> None:
        """Stop once the operation under way (if any) has ended; say so, for a resync or
        a verify may take long."""
        op = self.operation
        if op is not None and not self._stop.is_set():
            log.warning("stopping once the %s under way ends", op.value)
        self._stop.set()

    # -- observability ---------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """What query-controller returns (never waits for an operation)."""
        now = time.time()
        # A primary out of contact (lost, failed over from) has no current lag: None.
        disks = (self.primary.last or {}).get("disks", []) if self.primary.reachable else None
        op = self.operation
        return {
            "state": self.state.value, "operation": op.value if op else None,
            "epoch": self.epoch,
            "nodes": {"primary": self.primary.info(), "secondary": self.secondary.info()},
            "last_checkpoints": [{**c, "age": round(now - c["time"], 3)}
                                 for c in list(self.checkpoints)],
            "lag": None if disks is None else sum(d.get("lag_bytes", 0) for d in disks),
            "dirty": None if disks is None else sum(d.get("dirty_bytes", 0) for d in disks),
            "progress": self.progress.as_dict() if self.progress else None,
            # Checkpoints failing in a row: a failover would roll back to the last good one.
            "checkpoints_failing": ({"count": self.failing[1],
                                     "for": round(now - self.failing[0], 3)}
                                    if self.failing else None),
            "failover": self.last_failover,
            # Why the last operation a heartbeat started failed (None once one succeeds).
            "error": self.last_error,
            "old_primary_fenced": self._old_primary_fenced,
            "counters": dict(self.counters),
            "events": list(self.events)[-20:],
        }

    def metrics(self) -> str:
        return metrics.render(self.query(), {"primary": self.primary.last,
                                             "secondary": self.secondary.last})

    def _write_metrics(self) -> None:
        if self.cfg.metrics_file:
            try:
                metrics.write_file(self.cfg.metrics_file, self.metrics())
            except OSError as err:
                log.warning("cannot write metrics to %s: %s", self.cfg.metrics_file, err)

    def close(self) -> None:
        self.stop()
        with self._operation(Operation.STOP):
            if self._server is not None:
                self._server.close()
            for peer in (self.primary, self.secondary):
                try:        # release the lease: another controller may take the pair at once
                    if peer.reachable and peer.refused is None:
                        peer.beat_link.call("query-replication", {"lease": 0.0})
                except (NodeUnreachable, ControlError):
                    pass
                peer.close()
            self.guest.close()
            self._set_state(ControllerState.STOPPED, "closed")


