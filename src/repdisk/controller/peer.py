"""A node as the controller sees it: its control links, its last answer, what answers say.

A :class:`Peer` has two links (:class:`Link`) to the node's control socket: heartbeats,
and operations that may run long; a node's own error raises ControlError, its silence
:class:`NodeUnreachable`.  The functions at the end read a ``query-replication`` answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from qemu.qmp import ExecuteError

from repdisk.controller.config import ControllerConfig
from repdisk.errors import ControlError, RepdiskError
from repdisk.qmp.client import QMPClient
from repdisk.qmp.client import connect as connect_control

log = logging.getLogger(__name__)

#: A node that stays lost is mentioned again in the log at most this often.
REMIND_EVERY = 60.0


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


class Link:
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
                    self._client = connect_control(
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


class Peer:
    """A node as the controller sees it: two links (heartbeat, operations) and its last answer.

    It says in the log, once each, when the node is lost and when it answers again, with a
    reminder at most every REMIND_EVERY while it stays lost."""

    def __init__(self, role: str, socket: str, cfg: ControllerConfig) -> None:
        self.role, self.socket = role, socket
        self.beat_link = Link(role, socket, min(cfg.heartbeat_timeout, max(cfg.heartbeat, 0.5)),
                               cfg)
        self.ops = Link(role, socket, cfg.command_timeout, cfg)
        self.last_seen = time.monotonic()
        self.reachable = False
        self.last: dict[str, Any] | None = None  # the last query-replication answer
        self.refused: str | None = None          # another controller holds its lease
        self._lost_said: float | None = None     # when "lost" was last logged
        #: It answered again after it was lost, restarted, or changed its role, epoch or
        #: stages (someone started it) since the controller last asked (came_back): a
        #: re-protection waits for no back-off then.
        self._back = False

    def set_role(self, role: str) -> None:
        self.role = self.beat_link.name = self.ops.name = role

    def beat(self, contact: bool = True) -> dict[str, Any] | None:
        """Heartbeat (counts as contact on a primary); the node's state, or None if silent
        or refused (``refused`` then says why: it is alive, but not ours).

        ``contact=False`` only looks (query-replication): after a failover the old primary
        must not hear a heartbeat, which would release the guest writes its isolation guard
        holds before the controller has fenced it."""
        try:
            q: dict[str, Any] = self.beat_link.call(
                "replication-heartbeat" if contact else "query-replication")
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
            q: dict[str, Any] = self.ops.call("query-replication")
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
            self._back = True
        if self.refused is not None:
            log.warning("%s node %s: this controller holds its lease again", self.role,
                        self.socket)
            self.refused = None
        if self.last is not None and q.get("instance") != self.last.get("instance"):
            # The node restarted: connections made to the old process are dead; the next
            # operation must not spend an attempt finding that out.
            self.ops.stale = True
            self._back = True
        if self.last is not None and _shape(q) != _shape(self.last):
            self._back = True
        self.last, self.last_seen, self.reachable = q, time.monotonic(), True

    def came_back(self) -> bool:
        """Whether the node answered again, restarted or changed since the last call."""
        back, self._back = self._back, False
        return back

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
                "instance": last.get("instance"), "refused": self.refused,
                # Why a node that answers is not "ok" (repdisk status says which).
                "answered": self.last is not None, "fenced": last.get("fenced"),
                "answers_as": last.get("role")}

    def close(self) -> None:
        self.beat_link.close()
        self.ops.close()


def stages(q: dict[str, Any]) -> set[str]:
    """The stages of a node's disks."""
    return {d["stage"] for d in q.get("disks", [])}


def not_started(q: dict[str, Any]) -> bool:
    """The node has disks and all are in stage none."""
    return stages(q) == {"none"}


def start_under_way(p: dict[str, Any]) -> bool:
    """A disk of a primary is starting (connecting and copying, stage still none): a start
    asked for by someone else, e.g. a controller before this one."""
    return any(d.get("starting") for d in p["disks"])


def consistent(s: dict[str, Any]) -> bool:
    """Every disk of a secondary holds a complete checkpoint."""
    return all(d.get("consistent") for d in s["disks"])


def needs_resync(p: dict[str, Any]) -> bool:
    """A disk of a primary is degraded or has regions its secondary lacks."""
    return any(d.get("degraded") or d.get("dirty_bytes") for d in p["disks"])


def won_failover(q: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """A secondary that won a failover: its disk holds its pair's newest data."""
    return q is not None and q.get("role") == "secondary" and bool(q.get("failed-over"))


def _shape(q: dict[str, Any]) -> tuple[Any, ...]:
    """What of a node's answer says it was changed (not just that time passed)."""
    return (q.get("role"), q.get("epoch"), q.get("fenced"),
            tuple(d.get("stage") for d in q.get("disks", ())))
