"""The controller: checkpoints, heartbeat, failover, resync and re-protection of a pair.

    repdisk controller --primary PRI.qmp --secondary SEC.qmp --control CTRL.qmp
    repdisk controller --primary 10.0.0.1:7000 --secondary 10.0.0.2:7000 --tls DIR ...

It talks only to control sockets (the nodes', the guest's QMP and guest agent) and never
touches data itself.  One thread (``run``) heartbeats both nodes every ``heartbeat`` and
acts on what it sees (``step``); operations also come from its own control socket.
Operations (start, checkpoint, failover, resync, promotion) are serialized by one lock.

What ``step`` does, in order (see docs/failure-matrix.md for the whole table):

* primary silent for ``heartbeat_timeout`` -> fail over on the secondary (refused by the
  node while the secondary is inconsistent), run the hook; the old primary is fenced as
  soon as it answers again;
* secondary silent -> the primary runs degraded (it tracks dirty regions by itself);
* primary not started (first start, or it restarted and lost its dirty map) -> start
  the secondary, compare the disks (``--initial-sync``; checksum after a restart), start
  the primary (which copies what was marked), checkpoint;
* secondary restarted, or primary degraded or dirty -> re-protect: start the secondary
  if needed, ``replication-resync`` on the primary, checkpoint;
* otherwise a checkpoint every ``interval``.

Timing rule: the primary's ``isolation-timeout`` < ``heartbeat_timeout``, so a primary
that is cut off from everyone holds its guest writes before the controller fails over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from qemu.qmp import ExecuteError

from . import ctlclient, metrics, resync, tls
from .config import check_folder, parse_address, parse_duration
from .errors import ConfigError, ControlError, RepdiskError
from .guest import DEFAULT_URI as LIBVIRT_URI, Monitor, check as check_guest
from .guest import connect as connect_guest, migrate_to_file
from .qmp import ArgSpec, Command, QMPClient, QMPServer, tcp_address

log = logging.getLogger(__name__)

__all__ = ["Controller", "ControllerConfig", "NodeUnreachable", "add_parsers"]

#: Events kept for query-controller.
EVENT_HISTORY = 50
#: Checkpoint records kept for query-controller.
CHECKPOINT_HISTORY = 10
#: Progress is logged and sent as an event at most this often.
PROGRESS_EVERY = 1.0
#: Longest wait between two failed attempts to re-protect (it doubles from heartbeat-timeout).
MAX_BACKOFF = 30.0
#: Migration bandwidth (bytes/s) for saving a stopped guest's state: as fast as it goes.
VM_STATE_BANDWIDTH = 8 << 30
#: Node commands that may run long (copies, a failover commit, digests of a disk): they get
#: command_timeout.  Any other command must answer within heartbeat-timeout or the node
#: counts as unreachable, so a silent network (a cut that resets nothing) cannot hold the
#: controller, and its failover decision, inside a checkpoint for command_timeout.
LONG_COMMANDS = frozenset({"replication-start", "replication-stop", "replication-resync",
                           "replication-promote", "query-digests", "query-allocation"})


class NodeUnreachable(RepdiskError):
    """A node did not answer (as opposed to answering with an error)."""


@dataclass
class ControllerConfig:
    primary: str                        # control sockets
    secondary: str
    control: Optional[str] = None       # the controller's own control socket
    interval: float = 5.0               # seconds between checkpoints
    heartbeat: float = 1.0
    heartbeat_timeout: float = 3.0
    qmp: Optional[str] = None           # the primary guest's QMP socket
    libvirt_domain: Optional[str] = None   # or its libvirt domain (guest.py)
    libvirt_uri: str = LIBVIRT_URI
    freeze: bool = False                # fsfreeze through the guest agent instead of stop/cont
    qga: Optional[str] = None           # the guest agent's socket (default: QMP path + .qga)
    vm_state: Optional[str] = None      # folder for the guest's state at each checkpoint
    on_failover: Optional[str] = None   # shell command run after a failover
    initial_sync: str = "checksum"
    metrics_file: Optional[str] = None
    granularity: int = resync.GRANULARITY
    command_timeout: float = 3600.0     # long node commands: copies, failover commits
    auto_failover: bool = True
    tls: Optional[str] = None           # certificates for nodes reached at HOST:PORT
    insecure: bool = False              # plain TCP to nodes / on control_tcp
    control_tcp: Optional[tuple[str, int]] = None   # the controller's own TCP control port
    control_tls: Optional[str] = None   # its certificate directory

    def check(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat:
            raise ConfigError("heartbeat-timeout", f"{self.heartbeat_timeout:g}s must exceed "
                                                   f"the heartbeat ({self.heartbeat:g}s)")
        if self.initial_sync not in resync.SYNC_MODES:
            raise ConfigError("initial-sync", f"unknown mode {self.initial_sync!r}: use "
                                              f"{', '.join(resync.SYNC_MODES)}")
        if self.freeze and not (self.qga or self.qmp):
            raise ConfigError("freeze", "needs the guest agent's socket: give --qga (or --qmp, "
                                        "whose path + '.qga' is then used)")
        check_guest(self.qmp, self.libvirt_domain)
        if self.vm_state and (not (self.qmp or self.libvirt_domain) or self.freeze):
            raise ConfigError("vm-state", "needs --qmp (or --libvirt-domain) and no --freeze: "
                                          "the guest must be stopped while its state is saved")
        for role, address in (("primary", self.primary), ("secondary", self.secondary)):
            if tcp_address(address) and not self.tls and not self.insecure:
                raise ConfigError(role, f"{address} is a TCP control port: give --tls DIR "
                                        "(client certificates), or --insecure")
        if self.control_tcp and not self.control_tls:
            tls.check_control_plain("control-tcp", "%s:%d" % self.control_tcp, self.insecure)


class GuestAgent:
    """The QEMU guest agent (JSON lines over its socket), for fsfreeze around checkpoints.

    Each call opens the socket, resynchronizes with ``guest-sync`` (the agent may hold a
    stale reply from an earlier client) and runs one command.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path, self.timeout = path, timeout

    def freeze(self) -> int:
        return int(self.call("guest-fsfreeze-freeze"))

    def thaw(self) -> int:
        return int(self.call("guest-fsfreeze-thaw"))

    def call(self, command: str, args: Optional[dict[str, Any]] = None) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                lines = sock.makefile("rb")
                token = int(time.monotonic_ns() % 2**31)
                self._send(sock, "guest-sync", {"id": token})
                while json.loads(lines.readline() or b"null") != {"return": token}:
                    pass
                self._send(sock, command, args)
                reply = json.loads(lines.readline() or b"null")
        except (OSError, ValueError) as err:
            raise ControlError(f"guest agent {self.path}: {command} failed: {err}; is "
                               "qemu-guest-agent running in the guest?") from err
        if not isinstance(reply, dict) or "return" not in reply:
            desc = (reply or {}).get("error", {}).get("desc", reply)
            raise ControlError(f"guest agent {self.path}: {command} failed: {desc}")
        return reply["return"]

    @staticmethod
    def _send(sock: socket.socket, command: str, args: Optional[dict[str, Any]]) -> None:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        sock.sendall(json.dumps(msg).encode() + b"\n")


def save_vm_state(guest: Monitor, path: str, timeout: float = 300.0) -> int:
    """Save a stopped guest's device and memory state to ``path`` (QMP migrate to a file).

    QEMU throttles a migration to 128 MiB/s by default, which only stretches the pause of
    a guest that is stopped anyway (0.7 s instead of 0.1 s for 90 MiB): lift the limit.
    """
    if os.path.exists(path):
        os.unlink(path)
    guest.execute("migrate-set-parameters", {"max-bandwidth": VM_STATE_BANDWIDTH})
    migrate_to_file(guest, path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = guest.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return os.path.getsize(path)
        if status in ("failed", "cancelled"):
            raise ControlError(f"saving the guest's state to {path} failed: "
                               f"{info.get('error-desc', status)}")
        time.sleep(0.01)
    raise ControlError(f"saving the guest's state to {path} took over {timeout:g}s")


class _Link:
    """One control connection to a node, made on demand and dropped when it fails."""

    def __init__(self, name: str, socket: str, timeout: float, cfg: ControllerConfig) -> None:
        self.name, self.socket, self.timeout = name, socket, timeout
        self.tls, self.insecure = cfg.tls, cfg.insecure
        self.quick = min(timeout, cfg.heartbeat_timeout)   # for commands not in LONG_COMMANDS
        # One call at a time on a QMP connection.
        self._lock = threading.Lock()
        self._client: Optional[QMPClient] = None

    def call(self, command: str, args: Optional[dict[str, Any]] = None,
             on_events: Optional[Callable[[list[dict[str, Any]]], None]] = None) -> Any:
        """Run a command: the node's own error raises ControlError, silence NodeUnreachable.

        A read-only command that fails on a connection made earlier is tried once more on
        a new one (the node may have restarted since); others are never repeated.
        """
        reused = self._client is not None
        try:
            return self._call(command, args, on_events)
        except NodeUnreachable:
            if not reused or not command.startswith(("query-", "replication-heartbeat")):
                raise
            return self._call(command, args, on_events)

    def _call(self, command: str, args: Optional[dict[str, Any]],
              on_events: Optional[Callable[[list[dict[str, Any]]], None]]) -> Any:
        with self._lock:
            try:
                if self._client is None:
                    self._client = ctlclient.connect(
                        self.socket, self.tls, self.insecure, timeout=self.timeout,
                        connect_timeout=min(self.timeout, 5.0))
                self._client.timeout = self.timeout if command in LONG_COMMANDS else self.quick
                result = self._client.execute(command, args or {})
                if on_events is not None:
                    on_events(self._drain())
                return result
            except ControlError as err:
                if isinstance(err.__cause__, ExecuteError):
                    raise
                self._drop()
                raise NodeUnreachable(f"{self.name} node {self.socket}: {err}") from err

    def _drain(self) -> list[dict[str, Any]]:
        assert self._client is not None
        events = list(self._client.events)
        self._client.events.clear()
        return events

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def close(self) -> None:
        with self._lock:
            self._drop()


class _Peer:
    """A node as the controller sees it: two links (heartbeat, operations) and its last answer."""

    def __init__(self, role: str, socket: str, cfg: ControllerConfig) -> None:
        self.role, self.socket = role, socket
        self.beat_link = _Link(role, socket, min(cfg.heartbeat_timeout, max(cfg.heartbeat, 0.5)),
                               cfg)
        self.ops = _Link(role, socket, cfg.command_timeout, cfg)
        self.last_seen = time.monotonic()
        self.reachable = False
        self.last: Optional[dict[str, Any]] = None  # the last query-replication answer

    def beat(self, contact: bool = True) -> Optional[dict[str, Any]]:
        """Heartbeat (counts as contact on a primary); the node's state, or None if silent.

        ``contact=False`` only looks (query-replication): after a failover the old primary
        must not hear a heartbeat, which would release the guest writes its isolation guard
        holds before the controller has fenced it."""
        try:
            q = self.beat_link.call("replication-heartbeat" if contact else "query-replication")
        except (NodeUnreachable, ControlError) as err:
            if self.reachable:
                log.warning("%s node %s stopped answering: %s", self.role, self.socket, err)
            self.reachable = False
            return None
        self.seen(q)
        return q

    def query(self) -> dict[str, Any]:
        q = self.ops.call("query-replication")
        self.seen(q)
        return q

    def seen(self, q: dict[str, Any]) -> None:
        self.last, self.last_seen, self.reachable = q, time.monotonic(), True

    def silent_for(self) -> float:
        return 0.0 if self.reachable else time.monotonic() - self.last_seen

    def info(self) -> dict[str, Any]:
        return {"control": self.socket, "reachable": self.reachable,
                "last_seen": round(time.monotonic() - self.last_seen, 3),
                "instance": (self.last or {}).get("instance")}

    def close(self) -> None:
        self.beat_link.close()
        self.ops.close()


def _stages(q: dict[str, Any]) -> set[str]:
    return {d["stage"] for d in q.get("disks", [])}


def _not_started(q: dict[str, Any]) -> bool:
    return _stages(q) == {"none"}


class Controller:
    """Runs one pair; see the module docstring.  Thread-safe: one operation at a time."""

    def __init__(self, cfg: ControllerConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.primary = _Peer("primary", cfg.primary, cfg)
        self.secondary = _Peer("secondary", cfg.secondary, cfg)
        self.state = "starting"
        self.epoch = 0
        self.progress: Optional[resync.Progress] = None
        self.last_failover: Optional[dict[str, Any]] = None
        self.counters = {"checkpoints": 0, "checkpoint_failures": 0, "resync_bytes": 0,
                         "failovers": 0}
        self.checkpoints: deque[dict[str, Any]] = deque(maxlen=CHECKPOINT_HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)
        # Serializes operations (step's actions, control commands).
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._next_checkpoint = 0.0
        self._retry_at = 0.0                     # no re-protection attempt before this
        self._backoff = cfg.heartbeat_timeout
        self._marked_for: Optional[str] = None   # primary instance whose dirty map we filled
        self._old_primary_fenced = False
        self._hook: Optional[subprocess.Popen] = None
        self._guest: Optional[Monitor] = None
        self._progress_said = 0.0
        self._server: Optional[QMPServer] = None
        if cfg.control or cfg.control_tcp:
            self._server = QMPServer(control_commands(self), name="repdisk-controller")
            if cfg.control:
                self._server.serve_unix(cfg.control)
            if cfg.control_tcp:
                tls.serve_control(self._server, cfg.control_tcp, cfg.control_tls)

    # -- events ------------------------------------------------------------------------

    def _event(self, name: str, level: int = logging.INFO, **data: Any) -> None:
        """Log, remember (query-controller) and send (control socket) one event."""
        self.events.append({"time": time.time(), "event": name, "data": data})
        log.log(level, "%s %s", name, " ".join(f"{k}={v}" for k, v in data.items()))
        if self._server is not None:
            self._server.emit(name, data)

    def _set_state(self, state: str, why: str = "") -> None:
        if state != self.state:
            old, self.state = self.state, state
            self._event("CONTROLLER_STATE_CHANGED", **{"from": old, "to": state, "why": why})

    # -- starting and re-protecting ------------------------------------------------------

    def start(self) -> None:
        """Start the pair in order: secondary, initial sync, primary, first checkpoint."""
        with self._lock:
            p, s = self.primary.query(), self.secondary.query()
            self.epoch = max(p["epoch"], s["epoch"], self.epoch, 1)
            self._bring_up(p, s, self.cfg.initial_sync)

    def _bring_up(self, p: dict[str, Any], s: dict[str, Any], sync: str) -> None:
        """Secondary started, differences marked (once per primary process), primary started."""
        if p.get("fenced"):
            self._set_state("fenced", f"the primary is fenced: {p['fenced']}")
            raise ControlError(f"primary {self.primary.socket} is fenced ({p['fenced']}): "
                               "promote the winner, or restart this node as its secondary")
        if s.get("failed-over") and s.get("role") == "secondary" and s["epoch"] >= self.epoch:
            raise ControlError(f"secondary {self.secondary.socket} won the failover of epoch "
                               f"{s['epoch']} and holds the newest data: promote it "
                               "(controller-promote) instead of overwriting it")
        self._set_state("starting" if self.state == "starting" else "resyncing")
        try:
            self._start_pair(p, s, sync)
        except RepdiskError as err:
            # Back off: a link that hangs would otherwise be retried every heartbeat.
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            if self.state == "resyncing":
                self._set_state("degraded", str(err))
            raise
        self._backoff = self.cfg.heartbeat_timeout
        self._set_state("running")

    def _start_pair(self, p: dict[str, Any], s: dict[str, Any], sync: str) -> None:
        if _not_started(s):
            self.secondary.ops.call("replication-start", {"mode": "secondary",
                                                          "epoch": self.epoch})
        if _not_started(p):
            if sync != "none" and self._marked_for != p["instance"]:
                self._sync(sync, p)
                self._marked_for = p["instance"]
            self._copy("replication-start", {"mode": "primary", "epoch": self.epoch})
        elif self._needs_resync(p):
            self._copy("replication-resync", {})
        self._marked_for = p["instance"]
        self._checkpoint_now()

    def _sync(self, mode: str, p: dict[str, Any]) -> None:
        disks = [(d["disk"], d["size"]) for d in p["disks"]]
        self._event("SYNC_STARTED", mode=mode, bytes=sum(n for _, n in disks))
        t0 = time.monotonic()
        plan = resync.SyncPlan(primary=self.primary.ops.call, secondary=self.secondary.ops.call,
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
        self.progress = resync.Progress("copy", dirty)
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
        """While a copy runs: heartbeat the primary (contact) and follow its progress."""
        while not done.wait(self.cfg.heartbeat):
            q = self.primary.beat()
            if q is None or self.progress is None:
                continue
            dirty = sum(d.get("dirty_bytes", 0) for d in q["disks"])
            progress = self.progress
            progress.update(max(progress.total - dirty, 0))
            self._on_progress(progress)

    def _on_progress(self, progress: resync.Progress) -> None:
        """Record, log and send progress; keep the primary's contact while comparing."""
        self.progress = progress
        now = time.monotonic()
        if progress.phase != "copy" and now - self.primary.last_seen >= self.cfg.heartbeat:
            self.primary.beat()
        if now - self._progress_said >= PROGRESS_EVERY or progress.done >= progress.total:
            self._progress_said = now
            self._event("RESYNC_PROGRESS", **progress.as_dict())

    def _needs_resync(self, p: dict[str, Any]) -> bool:
        return any(d.get("degraded") or d.get("dirty_bytes") for d in p["disks"])

    def resync(self, mode: str = "dirty") -> int:
        """Re-protect now: ``dirty`` copies the primary's dirty map; ``checksum`` or ``full``
        first mark what differs (e.g. after the secondary's host crashed)."""
        with self._lock:
            p, s = self.primary.query(), self.secondary.query()
            self._set_state("resyncing", f"{mode} resync requested")
            if mode != "dirty":
                self._sync(mode, p)
            if _not_started(s):
                self.secondary.ops.call("replication-start", {"mode": "secondary",
                                                              "epoch": self.epoch})
            sent = self._copy("replication-resync", {})
            self._checkpoint_now()
            self._set_state("running")
            return sent

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """One pair checkpoint (DESIGN.md's order); returns its record, raises on failure."""
        with self._lock:
            return self._checkpoint_now()

    def _checkpoint_now(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"seq": self.counters["checkpoints"] + 1, "time": time.time()}
        t0 = time.monotonic()
        try:
            rec["pause"] = self._paused(lambda: self._pair_checkpoint(rec))
        except RepdiskError as err:
            self.counters["checkpoint_failures"] += 1
            self._event("CHECKPOINT_FAILED", logging.WARNING, error=str(err))
            raise
        rec["duration"] = time.monotonic() - t0
        self.counters["checkpoints"] += 1
        self.checkpoints.append(rec)
        self._next_checkpoint = time.monotonic() + self.cfg.interval
        self._event("CHECKPOINT_COMPLETED", seq=rec["seq"], duration=round(rec["duration"], 6),
                    pause=round(rec["pause"], 6))
        return rec

    def _pair_checkpoint(self, rec: dict[str, Any]) -> None:
        tmp = None
        if self.cfg.vm_state:
            # Before the primary's hold: the migration's end flushes the guest's disks, and a
            # flush held by the checkpoint would wait for the hold to expire.  The guest is
            # stopped, so its disks are the same before and after the barrier.
            tmp = os.path.join(self.cfg.vm_state, "vmstate.tmp")
            rec["vm_state_bytes"] = save_vm_state(self._guest_qmp(), tmp)
        self.primary.ops.call("replication-do-checkpoint")          # barrier + hold
        try:
            self.secondary.ops.call("replication-get-error")
            self.secondary.ops.call("replication-do-checkpoint")
            if tmp:
                os.replace(tmp, os.path.join(self.cfg.vm_state or "", "vmstate"))
        finally:
            self.primary.ops.call("replication-resume")

    def _paused(self, body: Callable[[], None]) -> float:
        """Run ``body`` with the guest stopped (or frozen); return how long it was."""
        if not (self.cfg.qmp or self.cfg.libvirt_domain) and not self.cfg.freeze:
            body()
            return 0.0
        if self.cfg.freeze:
            agent = GuestAgent(self.cfg.qga or self.cfg.qmp + ".qga")  # type: ignore[operator]
            t0 = time.monotonic()
            agent.freeze()
            try:
                body()
            finally:
                agent.thaw()
            return time.monotonic() - t0
        guest = self._guest_qmp()
        t0 = time.monotonic()
        guest.execute("stop")
        try:
            body()
        finally:
            guest.execute("cont")
        return time.monotonic() - t0

    def _guest_qmp(self) -> Monitor:
        if self._guest is None:
            self._guest = connect_guest(self.cfg.qmp, self.cfg.libvirt_domain,
                                        self.cfg.libvirt_uri)
        return self._guest

    # -- failover ------------------------------------------------------------------------

    def failover(self, reason: str = "requested by an operator") -> dict[str, Any]:
        """Fail over to the secondary now; a reachable primary is fenced first."""
        with self._lock:
            return self._failover(reason, manual=True)

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
        self._set_state("failed-over", reason)
        self._event("FAILOVER_COMPLETED", logging.WARNING, **rec)
        self._run_hook()
        return rec

    def _fence_old_primary(self, reason: str) -> None:
        try:
            self.primary.ops.call("replication-fence", {"reason": reason})
        except (NodeUnreachable, ControlError) as err:
            log.warning("could not fence the old primary %s yet: %s", self.primary.socket, err)
            return
        self._old_primary_fenced = True
        self._event("OLD_PRIMARY_FENCED", logging.WARNING, node=self.primary.socket,
                    reason=reason)

    def _run_hook(self) -> None:
        if not self.cfg.on_failover:
            return
        env = dict(os.environ, REPDISK_EPOCH=str(self.epoch),
                   REPDISK_SECONDARY_CONTROL=self.secondary.socket)
        env.pop("REPDISK_VM_STATE", None)
        if self.cfg.vm_state and os.path.exists(os.path.join(self.cfg.vm_state, "vmstate")):
            env["REPDISK_VM_STATE"] = os.path.join(self.cfg.vm_state, "vmstate")
        self._hook = subprocess.Popen(self.cfg.on_failover, shell=True, env=env,
                                      stdin=subprocess.DEVNULL)
        self._event("HOOK_STARTED", command=self.cfg.on_failover, pid=self._hook.pid)

    def _poll_hook(self) -> None:
        if self._hook is not None and self._hook.poll() is not None:
            rc, self._hook = self._hook.returncode, None
            self._event("HOOK_COMPLETED", logging.INFO if rc == 0 else logging.ERROR, rc=rc)

    # -- promotion -----------------------------------------------------------------------

    def promote(self, secondary_control: str, secondary_uri: str,
                write_mode: str = "sync") -> None:
        """Make the failover's winner the primary of a new pair with ``secondary_control``
        (its replica export at ``secondary_uri``); a checksum sync makes that node equal."""
        with self._lock:
            if self.state != "failed-over":
                raise ControlError(f"cannot promote: the controller is {self.state}, not "
                                   "failed-over")
            self.secondary.ops.call("replication-promote", {
                "secondary": secondary_uri, "write-mode": write_mode,
                "isolation-timeout": self.cfg.heartbeat_timeout * 0.6})
            old, self.primary = self.primary, self.secondary
            self.primary.role = "primary"
            old.close()
            self.secondary = _Peer("secondary", secondary_control, self.cfg)
            self._old_primary_fenced = False
            self._event("NODE_PROMOTED", node=self.primary.socket, secondary=secondary_control,
                        epoch=self.epoch)
            self._bring_up(self.primary.query(), self.secondary.query(), "checksum")

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> None:
        """One heartbeat round: look at both nodes, then act (at most one operation).

        The beats run outside the lock; a promotion may swap the peers meanwhile, and the
        answers then describe the other roles' nodes (the new secondary's state would be
        read as the primary's): that round only looks."""
        primary, secondary = self.primary, self.secondary
        p, s = primary.beat(contact=self.state != "failed-over"), secondary.beat()
        self._poll_hook()
        try:
            with self._lock:
                if primary is self.primary and secondary is self.secondary:
                    self._act(p, s)
        except RepdiskError as err:
            log.warning("%s: %s", self.state, err)
        self._write_metrics()

    def _act(self, p: Optional[dict[str, Any]], s: Optional[dict[str, Any]]) -> None:
        if self.state in ("stopped", "fenced"):
            return
        if self.state == "failed-over":
            if p is not None and p.get("role") == "primary" and not p.get("fenced"):
                self._fence_old_primary(f"the pair failed over to {self.secondary.socket} "
                                        f"in epoch {self.epoch}")
            return
        if p is None:
            if self.state == "starting":
                return
            if self.primary.silent_for() >= self.cfg.heartbeat_timeout and self.cfg.auto_failover:
                self._failover(f"primary lost: no answer for {self.primary.silent_for():.1f}s",
                               manual=False)
            return
        if s is None:
            if self.state != "starting":
                self._set_state("degraded", "the secondary does not answer")
            return
        if self.state == "starting":
            self.epoch = max(p["epoch"], s["epoch"], self.epoch, 1)
        if (_not_started(p) or _not_started(s) or self._needs_resync(p)) \
                and time.monotonic() < self._retry_at:
            return
        if _not_started(p):
            restarted = self._marked_for is not None and self._marked_for != p["instance"]
            sync = "checksum" if restarted and self.cfg.initial_sync == "none" \
                else self.cfg.initial_sync
            self._bring_up(p, s, sync)
        elif _not_started(s) or self._needs_resync(p):
            self._bring_up(p, s, "none")
        elif not all(d.get("consistent") for d in s["disks"]) \
                or time.monotonic() >= self._next_checkpoint:
            self._checkpoint_now()
            self._set_state("running")

    def run(self) -> None:
        """Step every ``heartbeat`` until ``stop()``."""
        while not self._stop.is_set():
            began = time.monotonic()
            self.step()
            self._stop.wait(max(0.0, self.cfg.heartbeat - (time.monotonic() - began)))

    def stop(self) -> None:
        self._stop.set()

    # -- observability ---------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """What query-controller returns (never waits for an operation)."""
        now = time.time()
        p = self.primary.last or {}
        return {
            "state": self.state, "epoch": self.epoch,
            "nodes": {"primary": self.primary.info(), "secondary": self.secondary.info()},
            "last_checkpoints": [{**c, "age": round(now - c["time"], 3)}
                                 for c in list(self.checkpoints)],
            "lag": sum(d.get("lag_bytes", 0) for d in p.get("disks", [])),
            "dirty": sum(d.get("dirty_bytes", 0) for d in p.get("disks", [])),
            "progress": self.progress.as_dict() if self.progress else None,
            "failover": self.last_failover,
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
        if self._server is not None:
            self._server.close()
        for peer in (self.primary, self.secondary):
            peer.close()
        if self._guest is not None:
            self._guest.close()
        self._set_state("stopped")


def control_commands(ctl: Controller) -> list[Command]:
    return [
        Command("query-controller", lambda a: ctl.query(),
                help="state, epoch, nodes, last checkpoints, lag, progress, recent events"),
        Command("replication-do-checkpoint", lambda a: ctl.checkpoint(),
                help="take a pair checkpoint now"),
        Command("controller-failover", lambda a: ctl.failover(a.get("reason", "manual")),
                {"reason": ArgSpec(str, False, "why (logged)")},
                help="fail over to the secondary now (the primary is fenced if it answers)"),
        Command("controller-resync", lambda a: {"bytes": ctl.resync(a.get("mode", "dirty"))},
                {"mode": ArgSpec(str, False, "dirty (default), checksum or full")},
                help="re-protect now, copying the dirty regions or what differs"),
        Command("controller-promote",
                lambda a: ctl.promote(a["secondary"], a["uri"], a.get("write-mode", "sync")),
                {"secondary": ArgSpec(str, True, "the new secondary's control socket"),
                 "uri": ArgSpec(str, True, "NBD URI of the new secondary's replica export"),
                 "write-mode": ArgSpec(str, False, "sync (default) or async")},
                help="after a failover: the winner becomes primary of a new pair"),
        Command("query-metrics", lambda a: ctl.metrics(),
                help="the numbers in Prometheus' text format"),
    ]


# -- the command line ---------------------------------------------------------------------------

def add_parsers(sub: Any) -> None:
    p = sub.add_parser("controller", help="run the controller of a pair",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--primary", required=True, metavar="PRI.qmp|HOST:PORT",
                   help="primary's control socket or control-tcp port")
    p.add_argument("--secondary", required=True, metavar="SEC.qmp|HOST:PORT",
                   help="secondary's control socket or control-tcp port")
    p.add_argument("--control", required=True, metavar="CTRL.qmp",
                   help="the controller's own control socket")
    p.add_argument("--tls", metavar="DIR", help="certificates (repdisk tls ca) for nodes given "
                                               "as HOST:PORT: a client certificate and the CA")
    p.add_argument("--control-tcp", metavar="HOST:PORT",
                   help="also serve the controller's control on TCP (needs --control-tls)")
    p.add_argument("--control-tls", metavar="x509:DIR",
                   help="certificates for --control-tcp; clients need one from the same CA")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain TCP to nodes and on --control-tcp")
    p.add_argument("--interval", default="5s", help="checkpoint interval (default 5s)")
    p.add_argument("--heartbeat", default="1s", help="heartbeat interval (default 1s)")
    p.add_argument("--heartbeat-timeout", default="3s",
                   help="silence that makes a node lost (default 3s; must exceed the "
                        "primary's isolation-timeout)")
    p.add_argument("--qmp", metavar="GUEST.qmp", help="the primary guest's QMP socket: stop and "
                                                      "cont it around each checkpoint")
    p.add_argument("--libvirt-domain", metavar="NAME",
                   help="instead of --qmp: the guest is libvirt domain NAME, stopped, "
                        "continued (and saved, with --vm-state) through libvirt's QEMU "
                        "monitor passthrough")
    p.add_argument("--libvirt-uri", metavar="URI", default=LIBVIRT_URI,
                   help=f"libvirt connection of --libvirt-domain (default {LIBVIRT_URI})")
    p.add_argument("--freeze", action="store_true",
                   help="fsfreeze the guest's filesystems (guest agent) instead of stopping it")
    p.add_argument("--qga", metavar="QGA.sock", help="guest agent socket (default GUEST.qmp.qga)")
    p.add_argument("--vm-state", metavar="DIR", help="save the stopped guest's state at each "
                                                     "checkpoint as DIR/vmstate")
    p.add_argument("--on-failover", metavar="COMMAND", help="shell command run after a failover")
    p.add_argument("--initial-sync", default="checksum", choices=resync.SYNC_MODES)
    p.add_argument("--checkpoint-only", action="store_true",
                   help="never fail over (a cluster manager such as Pacemaker decides): start, "
                        "resync and checkpoint the pair only")
    p.add_argument("--metrics-file", metavar="PATH", help="write Prometheus metrics here")
    p.add_argument("--log", metavar="FILE", help="log here (default stderr)")
    p.add_argument("--background", action="store_true", help="detach once serving")
    p.add_argument("--pidfile", help="pid file (with --background)")
    p.set_defaults(func=_run)


def _config(args: argparse.Namespace) -> ControllerConfig:
    return ControllerConfig(
        primary=args.primary, secondary=args.secondary, control=args.control,
        interval=parse_duration("interval", args.interval),
        heartbeat=parse_duration("heartbeat", args.heartbeat),
        heartbeat_timeout=parse_duration("heartbeat-timeout", args.heartbeat_timeout),
        qmp=args.qmp, libvirt_domain=args.libvirt_domain, libvirt_uri=args.libvirt_uri,
        freeze=args.freeze, qga=args.qga, vm_state=args.vm_state,
        on_failover=args.on_failover, initial_sync=args.initial_sync,
        metrics_file=args.metrics_file, tls=args.tls, insecure=args.insecure,
        auto_failover=not args.checkpoint_only,
        control_tcp=parse_address("control-tcp", args.control_tcp) if args.control_tcp else None,
        control_tls=tls.control_tls_dir("control-tls", args.control_tls or "off", "server"))


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    cfg.check()
    for flag, path in (("--control", args.control), ("--pidfile", args.pidfile),
                       ("--log", args.log)):
        if path:
            check_folder(flag, path)      # one line now, not a detached child's silence
    if args.background:
        return _detach(args)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    ctl = Controller(cfg)
    signal.signal(signal.SIGTERM, lambda *_: ctl.stop())
    try:
        try:
            ctl.start()
        except RepdiskError as err:
            log.error("start: %s; retrying every heartbeat", err)
        ctl.run()
    finally:
        ctl.close()
        if args.pidfile and os.path.exists(args.pidfile):
            os.unlink(args.pidfile)
    return 0


def _detach(args: argparse.Namespace) -> int:
    """Start this same command detached (setsid), logging to a file; wait for its socket."""
    pidfile = args.pidfile or args.control + ".pid"
    logfile = args.log or pidfile.rsplit(".", 1)[0] + ".log"
    argv = [a for a in sys.argv[1:] if a != "--background"]
    argv += ["--pidfile", pidfile] if not args.pidfile else []
    argv += ["--log", logfile] if not args.log else []
    for stale in (pidfile, args.control):
        if os.path.exists(stale):
            os.unlink(stale)
    subprocess.run(["setsid", "-f", sys.executable, "-m", "repdisk.cli", *argv],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if os.path.exists(args.control) and os.path.exists(pidfile):
            with open(pidfile) as f:
                print(f"repdisk controller: running (pid {f.read().strip()}), control "
                      f"{args.control}, log {logfile}")
            return 0
        time.sleep(0.05)
    raise RepdiskError(f"the controller did not start within 20 s; see {logfile}")

