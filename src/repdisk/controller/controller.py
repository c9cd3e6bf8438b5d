"""The controller: checkpoints, heartbeat, failover, resync and re-protection of a pair.

    repdisk controller --primary PRI.qmp --secondary SEC.qmp --control CTRL.qmp
    repdisk controller --primary 10.0.0.1:7000 --secondary 10.0.0.2:7000 --tls DIR ...

It talks only to control sockets (the nodes', the guest's QMP and guest agent) and never
touches data itself.  One thread (``run``) heartbeats both nodes every ``heartbeat`` and
acts on what it sees (``step``); operations also come from its own control socket.

State machine: the controller's state is a :class:`ControllerState`, written only by
``_set_state`` (which logs and emits ``CONTROLLER_STATE_CHANGED``).  Every operation is
an :class:`Operation` whose row in :data:`TRANSITIONS` says the states it may run in, the
state shown while it runs and the states it may leave; :func:`gate` is the only check,
and ``_operation`` runs one operation at a time under one lock (a second one waits, then
is gated against the state the first left).  A failed operation leaves its ``on_error``
state; ``promote`` changes nothing on either node until its checks pass, and once the
winner is a primary the promotion is complete (what is left is re-protection).

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

import argparse
import enum
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qemu.qmp import ExecuteError

from repdisk import detach, durable, tls
from repdisk.cli import ctlclient
from repdisk.controller import metrics
from repdisk.controller import switchover as planned
from repdisk.controller.guest import DEFAULT_URI as LIBVIRT_URI
from repdisk.controller.guest import Monitor, migrate_to_file
from repdisk.controller.guest import check as check_guest
from repdisk.controller.guest import connect as connect_guest
from repdisk.errors import ConfigError, ControlError, RepdiskError
from repdisk.node.config import check_folder, parse_duration
from repdisk.qmp.protocol import ArgSpec, Command, QMPClient, QMPServer
from repdisk.replication import resync
from repdisk.uri import parse_address, tcp_address

log = logging.getLogger(__name__)

__all__ = ["Controller", "ControllerConfig", "ControllerRefused", "ControllerState",
           "NodeUnreachable", "Operation", "TRANSITIONS", "add_parsers", "gate"]

#: Events kept for query-controller.
EVENT_HISTORY = 50
#: Checkpoint records kept for query-controller.
CHECKPOINT_HISTORY = 10
#: Progress is logged and sent as an event at most this often.
PROGRESS_EVERY = 1.0
#: Longest wait between two failed attempts to re-protect (it doubles from heartbeat-timeout).
MAX_BACKOFF = 30.0
#: A node that stays lost is mentioned again in the log at most this often.
REMIND_EVERY = 60.0
#: Migration bandwidth (bytes/s) for saving a stopped guest's state: as fast as it goes.
VM_STATE_BANDWIDTH = 8 << 30
#: Node commands that may run long (copies, a failover commit, digests of a disk): they get
#: command_timeout.  Any other command must answer within heartbeat-timeout or the node
#: counts as unreachable, so a silent network (a cut that resets nothing) cannot hold the
#: controller, and its failover decision, inside a checkpoint for command_timeout.
LONG_COMMANDS = frozenset({"replication-start", "replication-stop", "replication-resync",
                           "replication-promote", "query-digests", "query-allocation",
                           "replication-verify", "replication-demote"})
#: What a node says when another controller holds its lease (node.ControllerLease).
LEASE_REFUSED = "controller lease refused"


class NodeUnreachable(RepdiskError):
    """A node did not answer (as opposed to answering with an error)."""


class ControllerRefused(RepdiskError):
    """The controller will not run this pair as it is (the same node twice, a timing rule
    broken, roles it cannot adopt, another controller's lease); the message says what to do."""


class ControllerState(str, enum.Enum):
    STARTING = "starting"        # the pair is not adopted yet, or not started: adopt, bring up
    RUNNING = "running"          # protected: a checkpoint every interval
    DEGRADED = "degraded"        # the primary serves alone: re-protection retried with back-off
    RESYNCING = "resyncing"      # re-protection under way: start, sync, copy, checkpoint
    FAILED_OVER = "failed-over"  # the secondary won: waits for controller-promote
    PROMOTING = "promoting"      # controller-promote under way
    FENCED = "fenced"            # the primary is fenced and no winner to promote: an operator
    STOPPED = "stopped"          # the controller closed

    def __str__(self) -> str:
        return self.value


class Operation(enum.Enum):
    ADOPT = "adopt"              # learn roles, epoch and state from the nodes (changes nothing)
    START = "start"              # bring up a pair that is not started: sync, start, checkpoint
    HEARTBEAT = "heartbeat"      # one round: look at both nodes, decide the next operation
    CHECKPOINT = "checkpoint"    # one pair checkpoint
    RESYNC = "resync"            # re-protect: start what is not started, copy, checkpoint
    FAILOVER = "failover"        # the secondary takes over (a reachable primary fenced first)
    FENCE = "fence"              # fence the failover's loser when it answers
    PROMOTE = "promote"          # the winner becomes the primary of a new pair
    VERIFY = "verify"            # compare both disks (repair: copy what differs)
    SWITCHOVER = "switchover"    # a planned role swap: nothing lost, nothing copied
    STOP = "stop"                # close the controller


@dataclass(frozen=True)
class Rule:
    """One operation's row: where it may run and what it may leave behind."""

    runs_in: frozenset[ControllerState]
    #: States it may end in on success; None stands for the state it ran in.
    leaves: frozenset[ControllerState | None]
    #: The state shown while it runs (None: unchanged).
    during: ControllerState | None = None
    #: The state a failure leaves (None: the state it ran in).
    on_error: ControllerState | None = None


_S = ControllerState
#: The controller's transition table.  Adding an operation (switchover, verify) is one row
#: here, one function that runs its body under ``self._operation(op)``, and one row in
#: tests/test_controller_states.py and docs/DESIGN.md.
TRANSITIONS: dict[Operation, Rule] = {
    Operation.ADOPT: Rule(frozenset({_S.STARTING, _S.FENCED}),
                          frozenset({_S.STARTING, _S.RUNNING, _S.DEGRADED, _S.FAILED_OVER,
                                     _S.FENCED})),
    Operation.START: Rule(frozenset({_S.STARTING}), frozenset({_S.RUNNING})),
    Operation.HEARTBEAT: Rule(frozenset({_S.STARTING, _S.RUNNING, _S.DEGRADED, _S.FAILED_OVER,
                                         _S.FENCED}),
                              frozenset({None, _S.DEGRADED, _S.FENCED})),
    Operation.CHECKPOINT: Rule(frozenset({_S.RUNNING}), frozenset({_S.RUNNING})),
    Operation.RESYNC: Rule(frozenset({_S.RUNNING, _S.DEGRADED}), frozenset({_S.RUNNING}),
                           during=_S.RESYNCING, on_error=_S.DEGRADED),
    Operation.FAILOVER: Rule(frozenset({_S.RUNNING, _S.DEGRADED}),
                             frozenset({_S.FAILED_OVER})),
    Operation.FENCE: Rule(frozenset({_S.FAILED_OVER}), frozenset({_S.FAILED_OVER})),
    Operation.PROMOTE: Rule(frozenset({_S.FAILED_OVER}), frozenset({_S.RUNNING, _S.DEGRADED}),
                            during=_S.PROMOTING, on_error=_S.FAILED_OVER),
    Operation.VERIFY: Rule(frozenset({_S.RUNNING}), frozenset({_S.RUNNING})),
    Operation.SWITCHOVER: Rule(frozenset({_S.RUNNING}), frozenset({_S.RUNNING})),
    Operation.STOP: Rule(frozenset(_S), frozenset({_S.STOPPED})),
}

#: What to do instead, when an operator's command arrives in the wrong state.
_HINTS = {
    Operation.PROMOTE: "controller-promote is for a pair that failed over",
    Operation.CHECKPOINT: "a checkpoint needs a protected pair; the controller re-protects "
                          "a degraded pair by itself (or: controller-resync)",
    Operation.FAILOVER: "a failover needs a pair that replicates",
    Operation.VERIFY: "a verify compares a protected pair",
    Operation.SWITCHOVER: "a switchover needs a protected pair (running)",
}


def gate(op: Operation, state: ControllerState) -> Rule:
    """The row of ``op`` if it may run in ``state``; else a ControlError saying why.

    The only check of which operation runs when: every operation calls it first."""
    rule = TRANSITIONS[op]
    if state not in rule.runs_in:
        allowed = ", ".join(sorted(s.value for s in rule.runs_in))
        hint = f"; {_HINTS[op]}" if op in _HINTS else ""
        raise ControlError(f"cannot {op.value}: the controller is {state.value} "
                           f"({op.value} runs in: {allowed}){hint}")
    return rule


@dataclass
class ControllerConfig:
    primary: str                        # control sockets
    secondary: str
    control: str | None = None       # the controller's own control socket
    interval: float = 5.0               # seconds between checkpoints
    heartbeat: float = 1.0
    heartbeat_timeout: float = 6.0     # above the primary's timeout (5s) and isolation (3s)
    qmp: str | None = None           # the primary guest's QMP socket
    libvirt_domain: str | None = None   # or its libvirt domain (guest.py)
    libvirt_uri: str = LIBVIRT_URI
    freeze: bool = False                # fsfreeze through the guest agent instead of stop/cont
    qga: str | None = None           # the guest agent's socket (default: QMP path + .qga)
    vm_state: str | None = None      # folder for the guest's state at each checkpoint
    on_failover: str | None = None   # shell command run after a failover
    on_switchover: str | None = None  # shell command run after a switchover
    initial_sync: str = "checksum"
    metrics_file: str | None = None
    granularity: int = resync.GRANULARITY
    command_timeout: float = 3600.0     # long node commands: copies, failover commits
    auto_failover: bool = True
    tls: str | None = None           # certificates for nodes reached at HOST:PORT
    insecure: bool = False              # plain TCP to nodes / on control_tcp
    control_tcp: tuple[str, int] | None = None   # the controller's own TCP control port
    control_tls: str | None = None   # its certificate directory

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
        if _same_address(self.primary, self.secondary):
            raise ConfigError("secondary", f"{self.secondary} is the same node as --primary: "
                                           "give the other node's control socket")
        for role, address in (("primary", self.primary), ("secondary", self.secondary)):
            if tcp_address(address) and not self.tls and not self.insecure:
                raise ConfigError(role, f"{address} is a TCP control port: give --tls DIR "
                                        "(client certificates), or --insecure")
        if self.control_tcp and not self.control_tls:
            tls.check_control_plain("control-tcp", "%s:%d" % self.control_tcp, self.insecure)

    @property
    def ident(self) -> str:
        """This controller's name in the nodes' leases: stable across its restarts (host and
        control socket), so a restarted controller takes its pair back at once, while
        another controller is refused until the lease lapses."""
        where = (os.path.abspath(self.control) if self.control else
                 "tcp:%s:%d" % self.control_tcp if self.control_tcp else f"pid {os.getpid()}")
        return f"{socket.gethostname()}:{where}"

    @property
    def lease(self) -> float:
        """How long a node refuses other controllers after this one's last command: longer
        than any gap between two of its commands (its copies heartbeat both nodes)."""
        return max(2 * self.heartbeat_timeout, 5.0)


def _same_address(a: str, b: str) -> bool:
    if tcp_address(a) or tcp_address(b):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


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

    def call(self, command: str, args: dict[str, Any] | None = None) -> Any:
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
    def _send(sock: socket.socket, command: str, args: dict[str, Any] | None) -> None:
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
        self.ident, self.lease = cfg.ident, cfg.lease
        # Set (without the lock) when the node restarted: the connection is dropped first.
        self.stale = False
        self.quick = min(timeout, cfg.heartbeat_timeout)   # for commands not in LONG_COMMANDS
        # One call at a time on a QMP connection.
        self._lock = threading.Lock()
        self._client: QMPClient | None = None

    def call(self, command: str, args: dict[str, Any] | None = None,
             on_events: Callable[[list[dict[str, Any]]], None] | None = None) -> Any:
        """Run a command: the node's own error raises ControlError, silence NodeUnreachable.

        A read-only command that fails on a connection made earlier is tried once more on
        a new one (the node may have restarted since); others are never repeated.
        """
        reused = self._client is not None and not self.stale
        try:
            return self._call(command, args, on_events)
        except NodeUnreachable:
            if not reused or not command.startswith(("query-", "replication-heartbeat")):
                raise
            return self._call(command, args, on_events)

    def _call(self, command: str, args: dict[str, Any] | None,
              on_events: Callable[[list[dict[str, Any]]], None] | None) -> Any:
        args = {**(args or {}), "controller": self.ident}
        if command == "replication-heartbeat":
            args["lease"] = self.lease
        with self._lock:
            if self.stale:
                self.stale = False
                self._drop()
            try:
                if self._client is None:
                    self._client = ctlclient.connect(
                        self.socket, self.tls, self.insecure, timeout=self.timeout,
                        connect_timeout=min(self.timeout, 5.0))
                self._client.timeout = self.timeout if command in LONG_COMMANDS else self.quick
                result = self._client.execute(command, args)
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
    """A node as the controller sees it: two links (heartbeat, operations) and its last answer.

    It says in the log, once each, when the node is lost and when it answers again, with a
    reminder at most every REMIND_EVERY while it stays lost."""

    def __init__(self, role: str, socket: str, cfg: ControllerConfig) -> None:
        self.role, self.socket = role, socket
        self.beat_link = _Link(role, socket, min(cfg.heartbeat_timeout, max(cfg.heartbeat, 0.5)),
                               cfg)
        self.ops = _Link(role, socket, cfg.command_timeout, cfg)
        self.last_seen = time.monotonic()
        self.reachable = False
        self.last: dict[str, Any] | None = None  # the last query-replication answer
        self.refused: str | None = None          # another controller holds its lease
        self._lost_said: float | None = None     # when "lost" was last logged

    def set_role(self, role: str) -> None:
        self.role = self.beat_link.name = self.ops.name = role

    def beat(self, contact: bool = True) -> dict[str, Any] | None:
        """Heartbeat (counts as contact on a primary); the node's state, or None if silent
        or refused (``refused`` then says why: it is alive, but not ours).

        ``contact=False`` only looks (query-replication): after a failover the old primary
        must not hear a heartbeat, which would release the guest writes its isolation guard
        holds before the controller has fenced it."""
        try:
            q = self.beat_link.call("replication-heartbeat" if contact else "query-replication")
        except ControlError as err:
            if LEASE_REFUSED in str(err):
                self._refuse(str(err))
            else:
                self.lost(err)
            return None
        except NodeUnreachable as err:
            self.lost(err)
            return None
        self.seen(q)
        return q

    def query(self) -> dict[str, Any]:
        """A fresh look on the operations link (made anew if the node restarted)."""
        try:
            q = self.ops.call("query-replication")
        except ControlError as err:
            if LEASE_REFUSED in str(err):
                self._refuse(str(err))
                raise ControllerRefused(f"{self.role} node {self.socket}: {err}") from err
            raise
        self.seen(q)
        return q

    def seen(self, q: dict[str, Any]) -> None:
        if self._lost_said is not None:
            log.warning("%s node %s answers again after %.1fs", self.role, self.socket,
                        time.monotonic() - self.last_seen)
            self._lost_said = None
        if self.refused is not None:
            log.warning("%s node %s: this controller holds its lease again", self.role,
                        self.socket)
            self.refused = None
        if self.last is not None and q.get("instance") != self.last.get("instance"):
            # The node restarted: connections made to the old process are dead; the next
            # operation must not spend an attempt finding that out.
            self.ops.stale = True
        self.last, self.last_seen, self.reachable = q, time.monotonic(), True

    def lost(self, err: Exception) -> None:
        now = time.monotonic()
        cause = err.__cause__ or err
        if self.reachable or self._lost_said is None:
            log.warning("%s node %s lost: %s", self.role, self.socket, cause)
            self._lost_said = now
        elif now - self._lost_said >= REMIND_EVERY:
            log.warning("%s node %s still lost (for %.0fs): %s", self.role, self.socket,
                        now - self.last_seen, cause)
            self._lost_said = now
        self.reachable = False

    def _refuse(self, why: str) -> None:
        if self.refused is None:
            log.error("%s node %s: %s; this controller does nothing until it gets the lease",
                      self.role, self.socket, why)
        self.refused = why
        self.last_seen = time.monotonic()   # alive: never a reason to fail over

    def silent_for(self) -> float:
        return 0.0 if self.reachable or self.refused else time.monotonic() - self.last_seen

    def info(self) -> dict[str, Any]:
        last = self.last or {}
        return {"socket": self.socket, "role": self.role,
                "ok": (self.reachable and self.refused is None and not last.get("fenced")
                       and last.get("role") == self.role),
                "control": self.socket, "reachable": self.reachable,
                "last_seen": round(time.monotonic() - self.last_seen, 3),
                "instance": last.get("instance"), "refused": self.refused}

    def close(self) -> None:
        self.beat_link.close()
        self.ops.close()


def _stages(q: dict[str, Any]) -> set[str]:
    return {d["stage"] for d in q.get("disks", [])}


def _not_started(q: dict[str, Any]) -> bool:
    return _stages(q) == {"none"}


def _consistent(s: dict[str, Any]) -> bool:
    return all(d.get("consistent") for d in s["disks"])


def _needs_resync(p: dict[str, Any]) -> bool:
    return any(d.get("degraded") or d.get("dirty_bytes") for d in p["disks"])


def _winner(q: dict[str, Any] | None) -> bool:
    """A secondary that won a failover: its disk holds its pair's newest data."""
    return q is not None and q.get("role") == "secondary" and bool(q.get("failed-over"))


class Controller:
    """Runs one pair; see the module docstring.  Thread-safe: one operation at a time."""

    def __init__(self, cfg: ControllerConfig, serve: bool = True) -> None:
        cfg.check()
        self.cfg = cfg
        self.primary = _Peer("primary", cfg.primary, cfg)
        self.secondary = _Peer("secondary", cfg.secondary, cfg)
        self.state = ControllerState.STARTING
        self.operation: Operation | None = None   # the operation under way
        self.epoch = 0
        self.progress: resync.Progress | None = None
        self.last_failover: dict[str, Any] | None = None
        self.counters = {"checkpoints": 0, "checkpoint_failures": 0, "resync_bytes": 0,
                         "failovers": 0}
        self.checkpoints: deque[dict[str, Any]] = deque(maxlen=CHECKPOINT_HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)
        # Serializes operations (_operation: heartbeat rounds and control commands).
        self._lock = threading.RLock()
        self._generation = 0                     # operations ended: a round older is stale
        self._stop = threading.Event()
        self._next_checkpoint = 0.0
        self._retry_at = 0.0                     # no re-protection attempt before this
        self._backoff = cfg.heartbeat_timeout
        self._marked_for: str | None = None   # primary instance whose dirty map we filled
        self._sync_next: str | None = None    # the next bring-up's sync (promotion: checksum)
        self._old_primary_fenced = False
        self._hook: subprocess.Popen | None = None
        self._guest: Monitor | None = None
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
        """Restarted with the options it was first given, run the pair as it is now.

        Promotions and switchovers replace or swap the nodes the options name; the pair
        file remembers where they went.  Options that name other nodes win (the file is
        then about another pair).  The roles in the file are only a start: ``adopt`` still
        asks the nodes."""
        path = self.pair_file
        if path is None:
            return
        try:
            with open(path) as f:
                rec = json.load(f)
            options, now = rec["options"], (rec["primary"], rec["secondary"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring the pair file %s (%s): running the pair the options name",
                        path, err)
            return
        if sorted(options) != sorted((self.cfg.primary, self.cfg.secondary)) \
                or now == (self.primary.socket, self.secondary.socket):
            return
        log.warning("the pair changed since these options were first given: %s is its "
                    "primary node now, %s its secondary (from %s)", now[0], now[1], path)
        self.primary.close()
        self.secondary.close()
        self.primary = _Peer("primary", now[0], self.cfg)
        self.secondary = _Peer("secondary", now[1], self.cfg)

    def _remember_pair(self) -> None:
        """Write the pair file (durably): after every change of the peers."""
        path = self.pair_file
        if path is None:
            return
        try:
            with open(path) as f:
                options = json.load(f)["options"]
        except (OSError, ValueError, KeyError, TypeError):
            options = None
        if options is None or sorted(options) != sorted((self.cfg.primary,
                                                         self.cfg.secondary)):
            options = [self.cfg.primary, self.cfg.secondary]
        try:
            durable.replace_file(path, json.dumps({
                "options": options, "primary": self.primary.socket,
                "secondary": self.secondary.socket}) + "\n")
        except OSError as err:
            log.warning("cannot write the pair file %s: %s (a restart with the first "
                        "options will not find the nodes that replaced them)", path, err)

    def serve(self) -> None:
        """Serve the controller's control socket (and TCP port, if configured)."""
        cfg = self.cfg
        if self._server is None and (cfg.control or cfg.control_tcp):
            self._server = QMPServer(control_commands(self), name="repdisk-controller")
            if cfg.control:
                self._server.serve_unix(cfg.control)
            if cfg.control_tcp:
                tls.serve_control(self._server, cfg.control_tcp, cfg.control_tls)

    # -- events and the state machine ----------------------------------------------------

    def _event(self, name: str, level: int = logging.INFO, **data: Any) -> None:
        """Log, remember (query-controller) and send (control socket) one event."""
        self.events.append({"time": time.time(), "event": name, "data": data})
        log.log(level, "%s %s", name, " ".join(f"{k}={v}" for k, v in data.items()))
        if self._server is not None:
            self._server.emit(name, data)

    def _set_state(self, state: ControllerState, why: str = "") -> None:
        """The only writer of ``state``: logs and emits CONTROLLER_STATE_CHANGED."""
        if state is not self.state:
            old, self.state = self.state, state
            self._event("CONTROLLER_STATE_CHANGED", **{"from": old.value, "to": state.value,
                                                       "why": why})

    @contextmanager
    def _operation(self, op: Operation) -> Iterator[None]:
        """Run one operation: wait for the one under way, gate, run, check where it ended.

        Raises the gate's ControlError in a wrong state; a failure of the body leaves the
        row's ``on_error`` state (the state it began in, if none) and is raised."""
        with self._lock:
            if self.operation is not None:
                raise AssertionError(f"{op.value} inside {self.operation.value}: operations "
                                     "do not nest")
            rule = gate(op, self.state)
            began = self.state
            self.operation = op
            try:
                if rule.during is not None:
                    self._set_state(rule.during, op.value)
                yield
            except BaseException as err:
                self._set_state(rule.on_error or began, f"{op.value} failed: {err}")
                raise
            finally:
                self.operation = None
                self._generation += 1
            allowed = {began if s is None else s for s in rule.leaves}
            if self.state not in allowed:
                raise AssertionError(f"{op.value} left {self.state.value}, outside its row")

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
            self._adopt()

    def _peek(self, peer: _Peer) -> dict[str, Any] | None:
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
                or (roles == ("secondary", "secondary") and _winner(a)
                    and (not _winner(b) or a["epoch"] > b["epoch"])):
            self._swap()
            a, b = b, a
            log.warning("adopting the pair as it is now: %s is the primary, %s the secondary "
                        "(their roles changed since this controller's options were written)",
                        self.primary.socket, self.secondary.socket)
        p, s = a, b
        self.epoch = max(self.epoch, (p or {}).get("epoch", 0), (s or {}).get("epoch", 0), 1)
        if _winner(s) and (p is None or p.get("role") != "primary" or p.get("fenced")
                           or p["epoch"] < s["epoch"]):
            self._set_state(ControllerState.FAILED_OVER,
                            f"{self.secondary.socket} won the failover of epoch "
                            f"{s['epoch'] - 1}: promote it (controller-promote)")
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
            if not _not_started(s) and _consistent(s):
                self._set_state(ControllerState.RUNNING, "adopted; the primary does not answer")
            return
        self._check_timing(p)
        if p.get("fenced"):
            self._set_state(ControllerState.FENCED, f"the primary is fenced: {p['fenced']}")
        elif s is not None and _winner(s) and s["epoch"] >= p["epoch"]:
            raise ControllerRefused(f"secondary {self.secondary.socket} won the failover of "
                                    f"epoch {s['epoch'] - 1} and holds the newest data: "
                                    "promote it (controller-promote) instead of overwriting it")
        elif _not_started(p) or s is None or _not_started(s):
            self._set_state(ControllerState.STARTING if _not_started(p) else
                            ControllerState.DEGRADED, "adopted; the pair is not started")
        else:
            clean = _consistent(s) and not _needs_resync(p)
            self._set_state(ControllerState.RUNNING if clean else ControllerState.DEGRADED,
                            "adopted the running pair")
            self._next_checkpoint = 0.0          # a checkpoint at once

    def _swap(self) -> None:
        self.primary, self.secondary = self.secondary, self.primary
        self.primary.set_role("primary")
        self.secondary.set_role("secondary")
        self._remember_pair()

    def _check_timing(self, p: dict[str, Any]) -> None:
        """docs/failure-matrix.md's timing rules against the primary's own settings."""
        limit = self.cfg.heartbeat_timeout
        for key, value in (("isolation-timeout", (p.get("isolation") or {}).get("timeout")),
                           ("timeout", p.get("timeout"))):
            if value is not None and value >= limit:
                raise ControllerRefused(
                    f"the primary {self.primary.socket} has {key}={value:g}s, which must be "
                    f"below --heartbeat-timeout ({limit:g}s) or an isolated primary could "
                    f"still acknowledge writes after a failover: give --heartbeat-timeout "
                    f"{value + 1:g}s (or start the primary with a shorter {key})")

    # -- bringing up and re-protecting ---------------------------------------------------

    def _start(self) -> None:
        with self._operation(Operation.START):
            self._protect("dirty")

    def resync(self, mode: str = "dirty") -> int:
        """Re-protect now: ``dirty`` copies the primary's dirty map; ``checksum`` or ``full``
        first mark what differs (e.g. after the secondary's host crashed)."""
        if mode not in ("dirty", *resync.SYNC_MODES):
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
            if _winner(s) and s["epoch"] >= p["epoch"]:
                raise ControlError(f"secondary {self.secondary.socket} won the failover of "
                                   f"epoch {s['epoch'] - 1} and holds the newest data: promote "
                                   "it (controller-promote) instead of overwriting it")
            self.epoch = max(self.epoch, p["epoch"], s["epoch"], 1)
            sent = self._start_pair(p, s, mode)
        except RepdiskError:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            raise
        self._backoff, self._retry_at = self.cfg.heartbeat_timeout, 0.0
        self._set_state(ControllerState.RUNNING)
        return sent

    def _start_pair(self, p: dict[str, Any], s: dict[str, Any], mode: str) -> int:
        if _not_started(s):
            self.secondary.ops.call("replication-start", {"mode": "secondary",
                                                          "epoch": self.epoch})
        sent = 0
        if _not_started(p):
            sync = self._sync_mode(p)
            if sync != "none":
                self._sync(sync, p)
            self._marked_for, self._sync_next = p["instance"], None
            sent = self._copy("replication-start", {"mode": "primary", "epoch": self.epoch})
        else:
            if mode != "dirty":
                self._sync(mode, p)
            if mode != "dirty" or _needs_resync(p) or _not_started(s):
                sent = self._copy("replication-resync", {})
        self._marked_for = p["instance"]
        self._checkpoint_now()
        return sent

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

    def _on_progress(self, progress: resync.Progress, disk: str | None = None) -> None:
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
            rec["pause"] = self._paused(lambda: self._pair_checkpoint(rec))
        except RepdiskError as err:
            self.counters["checkpoint_failures"] += 1
            self._next_checkpoint = time.monotonic() + self.cfg.heartbeat_timeout
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
                    self.progress = resync.Progress("verify", sum(n for _, n in runs))
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
        if (self.cfg.qmp or self.cfg.libvirt_domain or self.cfg.freeze) and not (migrate
                                                                                 and qmp):
            raise ControlError("cannot switch over: the guest runs on the primary's host; give "
                               "migrate=URI of a QEMU started paused with -incoming on the "
                               "secondary's host (its disks: the secondary's active exports) "
                               "and qmp=ITS.qmp")
        with self._operation(Operation.SWITCHOVER):
            p = self.primary.query()
            a = planned.Node(self._caller(self.primary), uri, self.primary.socket)
            b = planned.Node(self._caller(self.secondary), back_uri, self.secondary.socket)
            self._event("SWITCHOVER_STARTED", primary=a.name, secondary=b.name)
            result = planned.switchover(
                a, b, write_mode=p["disks"][0].get("write_mode", "sync"),
                isolation_timeout=self.cfg.heartbeat_timeout * 0.6,
                pause=self._moving(migrate, qmp) if migrate and qmp else planned.no_pause)
            self._swap()
            self.epoch = result["epoch"]
            if qmp:
                self.cfg.qmp, self.cfg.libvirt_domain = qmp, None
                if self._guest is not None:
                    self._guest.close()
                    self._guest = None
            self.counters["switchovers"] = self.counters.get("switchovers", 0) + 1
            self._event("SWITCHOVER_COMPLETED", logging.WARNING, primary=self.primary.socket,
                        secondary=self.secondary.socket, **result)
            self._run_hook(self.cfg.on_switchover)
            return result

    @staticmethod
    def _caller(peer: _Peer) -> planned.Call:
        return lambda command, args: peer.ops.call(command, args)

    def _moving(self, migrate: str, qmp: str) -> planned.Pause:
        """``pause``: live-migrate the guest to ``migrate``, run the body once QEMU stopped
        it, resume the new QEMU at ``qmp``; the guest-visible pause."""
        def pause(body: Callable[[], None]) -> float:
            guest = self._guest_qmp()
            guest.execute("migrate-set-parameters", {"max-bandwidth": VM_STATE_BANDWIDTH})
            guest.execute("migrate", {"uri": migrate})
            stopped = None
            while (status := guest.execute("query-migrate").get("status")) != "completed":
                if status in ("failed", "cancelled"):
                    raise ControlError(f"cannot switch over: the guest's migration to "
                                       f"{migrate} {status}; nothing changed")
                if stopped is None and not guest.execute("query-status")["running"]:
                    stopped = time.monotonic()
                time.sleep(0.002)
            stopped = stopped or time.monotonic()
            body()
            new = QMPClient(timeout=30).connect(qmp)
            try:
                new.execute("cont")
            finally:
                new.close()
            return time.monotonic() - stopped
        return pause

    # -- promotion -----------------------------------------------------------------------

    def promote(self, secondary_control: str, secondary_uri: str,
                write_mode: str = "sync") -> dict[str, Any]:
        """Make the failover's winner the primary of a new pair with ``secondary_control``
        (its replica export at ``secondary_uri``); a checksum sync makes that node equal.

        Completes or changes nothing: every check (the new secondary answers, is a
        secondary not yet started, is not the winner, has the winner's disk sizes; the
        winner reaches ``secondary_uri``) runs before the winner is promoted, and a refusal
        leaves the controller failed-over with its peers as they were.  Once the winner is
        a primary the promotion is done: if re-protecting the new pair fails, the pair is
        degraded and the heartbeat retries with a back-off.  Returns the state it left."""
        with self._operation(Operation.PROMOTE):
            new = self._promotion_checked(secondary_control)
            try:
                self.secondary.ops.call("replication-promote", {
                    "secondary": secondary_uri, "write-mode": write_mode,
                    "timeout": min(5.0, self.cfg.heartbeat_timeout * 0.8),
                    "isolation-timeout": self.cfg.heartbeat_timeout * 0.6, "probe": True})
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

    def _promotion_checked(self, control: str) -> _Peer:
        """The new secondary's peer, once everything a promotion needs is known to hold."""
        winner = self.secondary
        if _same_address(control, winner.socket):
            raise ControlError(f"cannot promote: {control} is the failover's winner itself; "
                               "give the control socket of the node to become its secondary")
        try:
            w = winner.query()
        except NodeUnreachable as err:
            raise ControlError(f"cannot promote: the failover's winner {winner.socket} does "
                               f"not answer ({err})") from err
        new = _Peer("secondary", control, self.cfg)
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
            if not _not_started(n):
                raise ControlError(f"cannot promote: {control} already replicates (stage "
                                   f"{', '.join(sorted(_stages(n)))}): restart it")
            if _winner(n) and n["epoch"] >= w["epoch"]:
                raise ControlError(f"cannot promote: {control} won the failover of epoch "
                                   f"{n['epoch'] - 1}, after {winner.socket}: promote it instead")
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
                    with self._operation(Operation.HEARTBEAT):
                        then = self._decide(p, s)
                    if then is not None:
                        then()
        except RepdiskError as err:
            log.warning("%s: %s", self.state.value, err)
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
            return None
        if p is None:
            if s is None:
                return None          # both silent: nothing to fail over to (logged once each)
            silent = self.primary.silent_for()
            if silent >= self.cfg.heartbeat_timeout and self.cfg.auto_failover:
                return lambda: self.failover(f"primary lost: no answer for {silent:.1f}s",
                                             manual=False)
            return None
        if p.get("fenced"):
            self._set_state(ControllerState.FENCED, f"the primary is fenced: {p['fenced']}")
            return None
        if s is None:
            if state is ControllerState.RUNNING:
                self._set_state(ControllerState.DEGRADED,
                                f"the secondary {self.secondary.socket} does not answer")
            return None
        if (state is ControllerState.DEGRADED or _not_started(p) or _not_started(s)
                or _needs_resync(p)):
            return self.resync if now >= self._retry_at else None
        if not _consistent(s) or now >= self._next_checkpoint:
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
        op = self.operation
        return {
            "state": self.state.value, "operation": op.value if op else None,
            "epoch": self.epoch,
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
            if self._guest is not None:
                self._guest.close()
            self._set_state(ControllerState.STOPPED, "closed")


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
        Command("controller-verify", lambda a: ctl.verify(bool(a.get("repair", False))),
                {"repair": ArgSpec(bool, False, "copy the differing ranges (default false)")},
                help="compare both nodes' disks while the guest writes: the exact differing "
                     "ranges"),
        Command("controller-switchover",
                lambda a: ctl.switchover(a["uri"], a["back-uri"], a.get("migrate"),
                                         a.get("qmp")),
                {"uri": ArgSpec(str, True, "NBD URI of the primary's replica export (the new "
                                           "primary replicates to it)"),
                 "back-uri": ArgSpec(str, True, "NBD URI of the secondary's replica export "
                                                "(for a roll-back)"),
                 "migrate": ArgSpec(str, False, "with --qmp: migrate URI of a QEMU paused "
                                                "with -incoming on the secondary's host"),
                 "qmp": ArgSpec(str, False, "with --qmp: that QEMU's monitor")},
                help="planned switchover: the roles swap, nothing lost, nothing copied"),
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
    p.add_argument("--heartbeat-timeout", default="6s",
                   help="silence that makes a node lost (default 6s; must exceed the "
                        "primary's isolation-timeout and timeout: checked at start-up)")
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
    p.add_argument("--on-switchover", metavar="COMMAND",
                   help="shell command run after a switchover (REPDISK_PRIMARY_CONTROL: the "
                        "new primary)")
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
        on_failover=args.on_failover, on_switchover=args.on_switchover,
        initial_sync=args.initial_sync,
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
    # The QMP library logs every failed connection at ERROR: a node that is down would fill
    # the log every heartbeat; the controller says once that it is lost (and reminds).
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    ctl = Controller(cfg, serve=False)
    signal.signal(signal.SIGTERM, lambda *_: ctl.stop())
    try:
        try:
            ctl.adopt()
        except ControllerRefused as err:
            if cfg.auto_failover or LEASE_REFUSED not in str(err):
                log.error("%s", err)
                raise
            # --checkpoint-only (Pacemaker decides the roles): the previous checkpointer's
            # lease lapses soon; wait for it instead of failing the resource.
            log.warning("%s; waiting for its lease to lapse", err)
        except RepdiskError as err:
            log.warning("start: %s; trying again every heartbeat", err)
        ctl.serve()
        ctl.run()
    finally:
        ctl.close()
        if args.pidfile and os.path.exists(args.pidfile):
            os.unlink(args.pidfile)
    return 0


def _detach(args: argparse.Namespace) -> int:
    """Start this same command detached (:func:`repdisk.detach.launch`), logging to a file;
    wait for its socket."""
    pidfile = args.pidfile or args.control + ".pid"
    logfile = args.log or pidfile.rsplit(".", 1)[0] + ".log"
    argv = [a for a in sys.argv[1:] if a != "--background"]
    argv += ["--pidfile", pidfile] if not args.pidfile else []
    argv += ["--log", logfile] if not args.log else []
    if _answers(args.control):
        raise ControllerRefused(f"a controller already serves {args.control}: stop it first")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    log_size = os.path.getsize(logfile) if os.path.exists(logfile) else 0
    # The pid file is written before the controller runs, and by it again once it serves.
    detach.launch([sys.executable, "-m", "repdisk.cli.main", *argv], pidfile, os.devnull)
    try:
        detach.wait(detach.watch(pidfile), lambda: _answers(args.control), 20)
    except detach.StartFailed as err:
        if err.exited:
            raise ControllerRefused(_last_error(logfile, log_size) or
                                    f"the controller ended at start-up; see {logfile}") from None
        raise RepdiskError(f"the controller did not start within 20 s; see {logfile}") from None
    with open(pidfile) as f:
        print(f"repdisk controller: running (pid {f.read().strip()}), control "
              f"{args.control}, log {logfile}")
    return 0


def _answers(path: str) -> bool:
    """True if something listens on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def _last_error(logfile: str, since: int) -> str | None:
    """The last ERROR line the log gained after ``since`` bytes, without its prefix."""
    try:
        with open(logfile, encoding="utf-8", errors="replace") as f:
            f.seek(since)
            lines = [ln for ln in f.read().splitlines() if " ERROR " in ln]
    except OSError:
        return None
    return lines[-1].split(": ", 1)[-1] if lines else None

