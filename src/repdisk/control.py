"""A node's control commands, in QMP style, each mapped onto one call of its Node.

``replication-start``, ``replication-do-checkpoint``, ``replication-get-error`` and
``replication-stop`` are the framework's ``*_all`` calls over the node's disks;
``replication-resume`` ends a primary's checkpoint hold (see docs/DESIGN.md);
``replication-resync`` re-protects a degraded primary; ``query-replication``
reports everything an operator or the controller watches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ControlError
from .qmp import ArgSpec, Command
from .replication import ReplicationMode

if TYPE_CHECKING:
    from .node import Node


def _mode(value: str) -> ReplicationMode:
    try:
        return ReplicationMode(value)
    except ValueError:
        raise ControlError(f"Parameter 'mode' expects 'primary' or 'secondary', got {value!r}") from None


def node_commands(node: "Node") -> list[Command]:
    def start(args: dict[str, Any]) -> None:
        node.start(_mode(args["mode"]), args.get("epoch"))

    def stop(args: dict[str, Any]) -> None:
        node.stop(args["failover"])

    def resync(args: dict[str, Any]) -> dict[str, int]:
        return {"bytes": node.resync()}

    return [
        Command("query-replication", lambda a: node.query(),
                help="role, epoch and, per disk, stage, error, dirty bytes, lag and counters"),
        Command("replication-start", start,
                {"mode": ArgSpec(str, True, "primary or secondary: must match the node's role"),
                 "epoch": ArgSpec(int, False, "the pair's epoch; older than the node's is refused")},
                help="start replication on every disk (secondary first, then primary)"),
        Command("replication-do-checkpoint", lambda a: node.checkpoint(),
                help="take a checkpoint on every disk (primary: barrier and hold)"),
        Command("replication-resume", lambda a: node.resume(),
                help="primary: end the hold that a checkpoint began"),
        Command("replication-get-error", lambda a: node.get_error(),
                help="fail with the first recorded replication error"),
        Command("replication-stop", stop,
                {"failover": ArgSpec(bool, True, "true: the peer is lost (secondary: fail over)")},
                help="stop replication on every disk"),
        Command("replication-resync", resync,
                help="primary: reconnect to the secondary and copy every dirty region"),
    ]
