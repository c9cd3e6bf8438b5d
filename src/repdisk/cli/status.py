"""What a control socket says, for people: ``repdisk status`` lines and ``repdisk ctl``'s units.

The query goes through :mod:`repdisk.qmp.client`; everything here only renders its answer.
"""

from __future__ import annotations

import json
import time
from typing import Any

from repdisk import units
from repdisk.errors import ControlError, RepdiskError
from repdisk.node.lease import controller_socket
from repdisk.qmp.client import connect


def status_query(socket: str, tls: str | None = None,
                 insecure: bool = False) -> tuple[str, dict[str, Any]]:
    """``("controller", query-controller)`` or ``("node", query-replication)`` of ``socket``."""
    client = connect(socket, tls, insecure)
    try:
        try:
            return "controller", client.execute("query-controller")
        except ControlError as err:
            if err.error_class != "CommandNotFound":
                raise
        return "node", client.execute("query-replication")
    finally:
        client.close()


def status_entry(socket: str, tls: str | None = None, insecure: bool = False) -> dict[str, Any]:
    """What ``repdisk status --json`` says of ``socket``: ``kind`` (controller or node) and
    ``query``, or ``kind`` unreachable and the ``error``."""
    try:
        kind, q = status_query(socket, tls, insecure)
    except (RepdiskError, OSError) as err:
        return {"kind": "unreachable", "error": str(err)}
    return {"kind": kind, "query": q}


def entry_lines(name: str, entry: dict[str, Any]) -> list[str]:
    """The human lines of a :func:`status_entry` (``NAME: unreachable: ...`` for one that
    did not answer)."""
    if entry["kind"] == "unreachable":
        return [f"{name}: unreachable: {entry['error']}"]
    return render_status(entry["kind"], entry["query"], entry.get("socket", name))


def status_lines(socket: str, tls: str | None = None, insecure: bool = False) -> list[str]:
    """One human line per disk of the node behind ``socket``, or those of a controller."""
    kind, q = status_query(socket, tls, insecure)
    return render_status(kind, q, socket)


def render_status(kind: str, q: dict[str, Any], socket: str = "CONTROLLER") -> list[str]:
    """The lines of :func:`status_lines` for a query already made (of ``socket``)."""
    if kind == "controller":
        return controller_lines(q, socket)
    return [status_line(q, d) for d in q.get("disks", [])]


def _node_checkpoint(last: dict[str, Any]) -> str:
    """``last checkpoint 12s ago (1.0 ms)``: how old the node's rollback point is first (its
    wall-clock time; a node on another host is as right as the two clocks), then how long
    it took."""
    took = f"{last['duration'] * 1000:.1f} ms"
    if "time" not in last:
        return f"last checkpoint ({took})"
    return f"last checkpoint {max(0.0, time.time() - last['time']):.0f}s ago ({took})"


def controller_lines(q: dict[str, Any], socket: str = "CONTROLLER") -> list[str]:
    """A controller's state, operation, nodes (role, socket, contact), last checkpoint and any
    running sync, for people; ``socket`` is how its commands reach it."""
    state = q["state"] + (f" ({q['operation']})" if q.get("operation") else "")
    failing = q.get("checkpoints_failing")
    if failing:     # what a failover would roll back grows: say so before anything else
        state += (f" CHECKPOINTS FAILING ({failing['count']} in a row, "
                  f"{failing['for']:.0f}s)")
    parts = [f"controller {state:<11} epoch {q['epoch']}", _nodes_text(q.get("nodes", {})),
             f"dirty {_mib(q.get('dirty', 0))} lag {_mib(q.get('lag', 0))}"]
    last = q["last_checkpoints"][-1] if q.get("last_checkpoints") else None
    parts.append(f"last checkpoint {last['duration'] * 1000:.1f} ms (pause "
                 f"{last['pause'] * 1000:.1f} ms) {last['age']:.0f}s ago" if last
                 else "no checkpoint")
    lines = ["  ".join(parts)]
    progress = q.get("progress")
    if progress:
        eta = "?" if progress.get("eta") is None else f"{progress['eta']:.0f}s"
        total = progress["total"] or 1
        lines.append(f"controller {progress['phase']}: {_mib(progress['done'])} of "
                     f"{_mib(progress['total'])} ({100 * progress['done'] / total:.0f}%) "
                     f"{_mib(progress['rate'])}/s ETA {eta}")
    failover = q.get("failover")
    if failover and q["state"] in UNPROTECTED_SINCE_FAILOVER:   # after, it is history
        lines.append(f"controller failed over to epoch {failover['epoch']}: "
                     f"{failover['reason']}"
                     + (f" (loss to serving {failover['loss_to_serving']:.2f}s)"
                        if failover.get("loss_to_serving") is not None else ""))
    if q["state"] == "failed-over":     # what to do next, from any status of it
        winner = q.get("nodes", {}).get("secondary") or {}
        where = winner.get("socket") or winner.get("control")
        if winner.get("answers_as") == "primary":    # promoted by hand meanwhile
            lines.append(f"controller next: the winner {where} is a primary already: the "
                         "controller adopts the pair at a heartbeat (its error line says "
                         "what stops it)")
        else:
            lines.append("controller next: start a new secondary for the winner"
                         + (f" {where}" if where else "") + ", then "
                         f"repdisk ctl {socket} controller-promote secondary=ITS-CONTROL "
                         "uri=nbd+unix:///replica?socket=ITS-NBD-SOCKET")
    if q.get("error"):
        lines.append(f"controller error: {q['error']}")
    return lines


#: The controller states in which its last failover is news: the pair has not been
#: protected since (a degraded or resyncing pair after a promotion lost a node again).
UNPROTECTED_SINCE_FAILOVER = frozenset({"failed-over", "promoting", "fenced"})


def _nodes_text(nodes: dict[str, Any]) -> str:
    """``primary a.qmp ok (0.1s ago)  secondary b.qmp LOST (4.0s ago)``: which socket has
    which role (after a promotion the first one given may be the secondary)."""
    out = []
    for key, n in nodes.items():
        role = n.get("role") or key
        words = [role, n.get("socket") or n.get("control") or "", _node_word(role, n)]
        if not n.get("answered", True):
            words.append("(never answered)")
        elif isinstance(n.get("last_seen"), (int, float)):
            words.append(f"({n['last_seen']:.1f}s ago)")
        out.append(" ".join(w for w in words if w))
    return "  ".join(out)


def _node_word(role: str, n: dict[str, Any]) -> str:
    """What the controller's line says of one node: ok, LOST (or NO ANSWER: it never
    answered), or why a node that answers is not ok."""
    if n.get("ok", n.get("reachable")):
        return "ok"
    if not n.get("reachable"):
        return "LOST" if n.get("answered", True) else "NO ANSWER"
    if n.get("refused"):
        return "LEASE REFUSED"
    if n.get("fenced"):
        return "FENCED"
    answers_as = n.get("answers_as")
    return f"now a {answers_as}" if answers_as and answers_as != role else "LOST"


def status_line(node: dict[str, Any], d: dict[str, Any]) -> str:
    """One disk of a node: role, stage (or FENCED/SUSPENDED with why), epoch, the rest."""
    held = _held(node)
    parts = [f"{node['role']:<9} {d.get('disk', '?'):<8} " + (held + "  " if held else "")
             + f"{d.get('stage', '?'):<15}", f"epoch {node.get('epoch', 0)}"]
    if node["role"] == "primary":
        parts.append(f"{d.get('write_mode', '')} dirty {_mib(d.get('dirty_bytes', 0))}"
                     f" in-flight {d.get('in_flight', 0)}"
                     + (" DEGRADED" if d.get("degraded") else ""))
    else:
        since = d.get("no_primary_since")
        if d.get("stage") == "running" and since is not None:   # nothing replicates into it
            parts.append(f"NO PRIMARY (for {max(0.0, time.time() - since):.0f}s)")
        parts.append(("consistent" if d.get("consistent") else "INCONSISTENT")
                     + f" hidden {_mib(d.get('hidden_bytes', 0))}"
                     f" active {_mib(d.get('active_bytes', 0))}")
    last = d.get("last_checkpoint")
    parts.append(_node_checkpoint(last) if last else "no checkpoint")
    if d.get("error"):
        parts.append(f"error: {d['error']}")
    return "  ".join(parts)


def _held(node: dict[str, Any]) -> str:
    """``FENCED (reason)`` or ``SUSPENDED (since, why)`` for a primary whose guest writes
    fail or wait; empty otherwise."""
    iso = node.get("isolation") or {}
    fenced = node.get("fenced") or iso.get("fenced")
    if fenced:
        return f"FENCED ({fenced})"
    if iso.get("suspended"):
        age = iso.get("last_contact_age")
        since = f"no contact for {units.format_seconds(age)}" if age is not None else "isolated"
        return (f"SUSPENDED ({since} with the secondary or the controller: guest writes held "
                "until one answers)")
    return ""


def protector(q: dict[str, Any]) -> str | None:
    """How to reach the controller that protects the replicating pair of the node whose
    ``query-replication`` is ``q`` (its lease is fresh, the node is not fenced and a disk
    runs), or None."""
    lease = q.get("lease")
    if not (lease and lease.get("fresh")) or q.get("fenced") or \
            not any(d.get("stage") == "running" for d in q.get("disks", [])):
        return None
    return controller_socket(lease["holder"])


def _mib(n: int | None) -> str:
    """A size for people; "?" for None (not known: e.g. the primary is out of contact)."""
    return "?" if n is None else units.format_size(n)


#: Keys of a QMP result that ``repdisk ctl`` shows in human units (by the key's name).
SIZE_KEYS = frozenset({"size", "bytes", "dirty", "lag", "done", "total", "max-lag", "max_lag"})
SECONDS_KEYS = frozenset({"duration", "pause", "age", "last_seen", "last_contact_age", "timeout",
                          "isolation-timeout", "since", "eta", "loss_to_serving", "interval",
                          "heartbeat", "heartbeat-timeout"})
TIME_KEYS = frozenset({"time", "started", "at", "no_primary_since"})


def human(key: str, value: Any) -> str:
    """One scalar of a result for people: sizes in MiB, seconds as ms/s/minutes, wall-clock
    times as local ISO time and age; anything else as itself (``-`` for null)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        name = str(key)
        if name in SIZE_KEYS or name.endswith(("_bytes", "-bytes")):
            return units.format_size(value)
        if name == "rate":
            return units.format_size(value) + "/s"
        if name in SECONDS_KEYS:
            return units.format_seconds(value)
        if name in TIME_KEYS and value > 1e9:
            return units.format_time(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
