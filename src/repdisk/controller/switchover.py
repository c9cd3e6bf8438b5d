"""A planned switchover: the primary and its secondary swap roles, nothing lost, nothing copied.

The pair is A (primary) and B (its secondary), both running, B consistent.  First, with
the guest running, an async A is given time to write back what B lacks (``catch_up``), so
that the pause does not send it.  Then, with the guest
paused (the caller's ``pause``, e.g. QMP ``stop`` ... ``cont``, or a migration):

1. A ``replication-demote``: guest writes refused, a final barrier puts every acknowledged
   write on B (those after the last checkpoint too), a seal tells B so; A is now a
   secondary in stage none (node.py).  If it fails, nothing changed.
2. B ``replication-promote {secondary: A's replica URI}``: sealed, so a role switch: B's
   disk is taken as it is, epoch + 1, nothing rolled back.
3. A ``replication-start {mode: secondary, epoch}``, B ``replication-start {mode: primary,
   epoch}``: nothing is dirty, so nothing is copied.  The guest may resume (on B's host).
4. A pair checkpoint (B, then A): the new secondary holds a complete checkpoint at once.

The same node commands serve Pacemaker's demote and promote (ocf/): one mechanism.  If step
2 or 3 fails, the switchover rolls back to A as primary: A is promoted as it is (``force``;
its disk equals B's after the barrier), B is restarted as its secondary in the new epoch;
if that fails too, the error says what state each node is left in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from repdisk.errors import ControlError, RepdiskError

log = logging.getLogger(__name__)

#: ``call(command, args)``: a node's control command (raises RepdiskError on refusal).
Call = Callable[[str, dict[str, Any]], Any]
#: ``pause(body)``: run ``body`` with the guest paused; returns the pause in seconds.
Pause = Callable[[Callable[[], None]], float]

#: Before the pause, an async primary writes back until its secondary lacks at most this.
CATCH_UP_BYTES = 1 << 20


def no_pause(body: Callable[[], None]) -> float:
    began = time.monotonic()
    body()
    return time.monotonic() - began


@dataclass
class Node:
    """One side as the switchover sees it: its control ``call`` and its replica export."""
    call: Call
    replica_uri: str
    name: str


def check_ready(a: Node, b: Node) -> int:
    """The pair's epoch if A is a running, in-sync primary and B a running, consistent
    secondary; else raise saying which is not ready (nothing is changed)."""
    p, s = a.call("query-replication", {}), b.call("query-replication", {})
    if p["role"] != "primary" or s["role"] != "secondary":
        raise ControlError(f"cannot switch over: {a.name} is a {p['role']} and {b.name} a "
                           f"{s['role']}; a switchover needs a primary and its secondary")
    for d in p["disks"]:
        if d["stage"] != "running" or d["degraded"] or d["dirty_bytes"]:
            raise ControlError(f"cannot switch over: {a.name} disk {d['disk']} is "
                               f"{'degraded' if d['degraded'] else d['stage']} with "
                               f"{d['dirty_bytes']} bytes dirty; resync first")
    for d in s["disks"]:
        if d["stage"] != "running" or not d.get("consistent"):
            raise ControlError(f"cannot switch over: {b.name} disk {d['disk']} holds no "
                               "complete checkpoint yet; wait for the next checkpoint")
    if p["epoch"] != s["epoch"]:
        raise ControlError(f"cannot switch over: the nodes are in epochs {p['epoch']} and "
                           f"{s['epoch']}")
    return int(p["epoch"])


def catch_up(a: Node, wait: float, poll: str = "query-replication") -> int:
    """Wait, at most ``wait`` seconds and with the guest running, until the primary A's
    secondary lacks at most CATCH_UP_BYTES (an async primary's write-back; a sync one
    lacks nothing); the bytes it lacked when the wait ended.  ``poll``: the command that
    asks A (a controller's ``replication-heartbeat`` keeps A's contact meanwhile).
    Changes nothing: a guest that writes faster than the link only makes the pause
    longer, for the demote's barrier sends the rest."""
    deadline = time.monotonic() + wait
    while True:
        lag = int(sum(d.get("lag_bytes", 0) for d in a.call(poll, {})["disks"]))
        if lag <= CATCH_UP_BYTES or time.monotonic() >= deadline:
            return lag
        time.sleep(0.02)


def switchover(a: Node, b: Node, *, write_mode: str = "sync", max_lag: int | None = None,
               timings: Mapping[str, float] | None = None,
               pause: Pause = no_pause, catch_up_wait: float = 5.0,
               catch_up_poll: str = "query-replication") -> dict[str, Any]:
    """Make B the primary and A its secondary (module note); returns ``{epoch, pause,
    duration, lag}`` (``lag``: the bytes B lacked when the pause, or the migration, began:
    what the pause had to send).  Raises ControlError with nothing changed if the pair is
    not ready or A cannot demote; after a later failure it rolls back (A primary again)
    and raises.  ``write_mode``, ``max_lag``: A's, for B (None: B's own max-lag).
    ``timings``: replication-promote's ``timeout`` and ``isolation-timeout`` for
    whichever node ends up the primary (a controller's keep them below its heartbeat-timeout;
    None: the nodes' defaults)."""
    began = time.monotonic()
    check_ready(a, b)
    lag = catch_up(a, catch_up_wait, catch_up_poll)
    done: dict[str, Any] = {}
    carried = {"write-mode": write_mode, **({"max-lag": max_lag} if max_lag else {}),
               **(timings or {})}

    def body() -> None:
        a.call("replication-demote", {})
        try:
            b.call("replication-promote", {"secondary": a.replica_uri, **carried})
            epoch = int(b.call("query-replication", {})["epoch"])
            a.call("replication-start", {"mode": "secondary", "epoch": epoch})
            b.call("replication-start", {"mode": "primary", "epoch": epoch})
        except RepdiskError as err:
            _roll_back(a, b, carried, err)
        done["epoch"] = epoch

    paused = pause(body)
    checkpoint(b, a)   # the new secondary holds a complete checkpoint: it may fail over
    result = {"epoch": done["epoch"], "pause": round(paused, 3),
              "duration": round(time.monotonic() - began, 3), "lag": lag}
    log.warning("switchover: %s is the primary now, %s its secondary (epoch %d, guest "
                "paused %.3fs)", b.name, a.name, result["epoch"], paused)
    return result


def checkpoint(primary: Node, secondary: Node) -> None:
    """One pair checkpoint (docs/DESIGN.md): barrier and hold, the secondary's, resume."""
    primary.call("replication-do-checkpoint", {})
    try:
        secondary.call("replication-get-error", {})
        secondary.call("replication-do-checkpoint", {})
    finally:
        primary.call("replication-resume", {})


def _roll_back(a: Node, b: Node, carried: Mapping[str, Any], err: RepdiskError) -> None:
    """After A demoted: A becomes the primary again as it is (``carried``: its write mode,
    max-lag and timings), B its secondary; raises."""
    log.error("switchover failed after %s demoted: %s; rolling back", a.name, err)
    try:
        if b.call("query-replication", {})["role"] == "primary":
            raise ControlError(f"{b.name} was promoted already; not rolled back")
        a.call("replication-promote", {"secondary": b.replica_uri, "force": True, **carried})
        epoch = int(a.call("query-replication", {})["epoch"])
        b.call("replication-stop", {"failover": False})
        b.call("replication-start", {"mode": "secondary", "epoch": epoch})
        a.call("replication-start", {"mode": "primary", "epoch": epoch})
    except RepdiskError as again:
        raise ControlError(f"switchover failed ({err}) and so did its roll-back ({again}): "
                           f"{a.name} demoted and sealed its secondary; look at both nodes' "
                           "query-replication, then promote the one whose disk to keep "
                           "(replication-promote force=true)") from again
    raise ControlError(f"switchover failed ({err}); rolled back: {a.name} is the primary "
                       f"again (epoch {epoch}), {b.name} its secondary") from err
