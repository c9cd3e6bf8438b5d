"""A node's control commands, in QMP style, each mapped onto one call of its Node.

``replication-start``, ``replication-do-checkpoint``, ``replication-get-error`` and
``replication-stop`` are the framework's ``*_all`` calls over the node's disks;
``replication-resume`` ends a primary's checkpoint hold (see docs/DESIGN.md);
``replication-resync`` re-protects a degraded primary; ``query-replication``
reports everything an operator or the controller watches.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from repdisk.errors import ControlError, RepdiskError
from repdisk.node.config import default
from repdisk.node.lease import controller_socket
from repdisk.node.node import Node
from repdisk.qmp.protocol import ArgSpec, Command
from repdisk.replication.framework import ReplicationMode

log = logging.getLogger(__name__)


def _mode(value: str) -> ReplicationMode:
    try:
        return ReplicationMode(value)
    except ValueError:
        raise ControlError(f"Parameter 'mode' expects 'primary' or 'secondary', "
                           f"got {value!r}") from None


def _refusal_is_the_answer(cmd: Command) -> Command:
    """A command the node refuses (a RepdiskError: wrong role, wrong stage, ...) answers with
    a QMP GenericError and one log line; only a real bug should leave a traceback in the log."""
    def handler(args: dict[str, Any]) -> Any:
        try:
            return cmd.handler(args)
        except ControlError:
            raise
        except RepdiskError as err:
            log.info("control: %s refused: %s", cmd.name, err)
            raise ControlError(str(err)) from err
    return dataclasses.replace(cmd, handler=handler)


def serve(node: Node) -> None:
    """Serve the node's commands on its control socket (call after nbdkit forked)."""
    node.serve_control(node_commands(node))


def node_commands(node: Node) -> list[Command]:
    return [_refusal_is_the_answer(_leased(node, cmd)) for cmd in _node_commands(node)]


#: A pair's checkpoint is its controller's: one node's half of it, sent by hand while a
#: controller holds the node, would make the pair's checkpoint (and a saved VM state)
#: disagree with the disks.
CONTROLLERS_ONLY = ("replication-do-checkpoint", "replication-resume")


def _leased(node: Node, cmd: Command) -> Command:
    """Every command may name the controller sending it (``controller``): the node's lease
    then refuses it while another controller holds this node (see ``ControllerLease``).
    An unnamed sender (``repdisk ctl``) may not take a checkpoint's steps while one does,
    nor stop replication without a failover (that ends the pair's protection until the
    node restarts, and the controller could not mend it)."""
    def handler(args: dict[str, Any]) -> Any:
        args = dict(args)
        who = args.pop("controller", None)
        node.lease.check(who, args.pop("lease", None))
        guarded = cmd.name in CONTROLLERS_ONLY or cmd.name == "replication-stop"
        holder = node.lease.holder_now() if who is None and guarded else None
        where = controller_socket(holder) if holder is not None else None
        if holder is not None and cmd.name in CONTROLLERS_ONLY:
            raise ControlError(f"{cmd.name} refused: controller {holder} takes this pair's "
                               f"checkpoints: ask it (repdisk ctl {where} checkpoint)")
        if holder is not None and cmd.name == "replication-stop" and not args.get("failover"):
            raise ControlError(f"{cmd.name} refused: controller {holder} protects this pair, "
                               "and a stop would end this node's replication until it "
                               f"restarts: stop the controller first (repdisk down {where})")
        return cmd.handler(args)
    leased_args = {**cmd.args,
                   "controller": ArgSpec(str, False, "the controller sending this command: "
                                                     "refused while another holds the lease",
                                         internal=True),
                   "lease": ArgSpec(float, False, "seconds the sender's lease lasts after "
                                                  "each of its commands (0: release it)",
                                    internal=True)}
    return dataclasses.replace(cmd, handler=handler, args=leased_args)


def _node_commands(node: Node) -> list[Command]:
    def start(args: dict[str, Any]) -> dict[str, str] | None:
        return node.start(_mode(args["mode"]), args.get("epoch"),
                          args.get("secondary-instance"))

    def stop(args: dict[str, Any]) -> dict[str, str] | None:
        return node.stop(args["failover"])

    def resync(args: dict[str, Any]) -> dict[str, int]:
        return {"bytes": node.resync()}

    return [
        Command("query-replication", lambda a: node.query(),
                help="role, epoch and, per disk, stage, error, dirty bytes, lag and counters"),
        Command("replication-start", start,
                {"mode": ArgSpec(str, True, "primary or secondary: must match the node's role"),
                 "epoch": ArgSpec(int, False,
                                  "the pair's epoch; older than the node's is refused"),
                 "secondary-instance": ArgSpec(str, False, "primary: refuse unless the node "
                                                           "serving --secondary is this one "
                                                           "(when its exports can be listed)",
                                               internal=True)},
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
        *_controller_commands(node),
    ]


def _runs(value: list[Any]) -> list[list[int]]:
    """A ``runs`` argument, checked: [[offset, length], ...]."""
    if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
               for r in value):
        raise ControlError("Parameter 'runs' expects an array of [offset, length] pairs")
    return value


def _controller_commands(node: Node) -> list[Command]:
    """What the controller needs beyond the framework: contact, fencing, promotion, sync."""
    disk = ArgSpec(str, False, "the disk's name (default: the node's first disk)")

    def promote(args: dict[str, Any]) -> None:
        timeout = args.get("timeout")
        node.promote(args["secondary"], args.get("write-mode"),
                     None if timeout is None else float(timeout), args.get("isolation-timeout"),
                     bool(args.get("force", False)), bool(args.get("probe", True)),
                     args.get("secondary-instance"), args.get("max-lag"))

    def digests(args: dict[str, Any]) -> dict[str, Any]:
        return {"digests": node.digests(args.get("disk"), args["offset"], args["length"],
                                        args["granularity"])}

    def allocation(args: dict[str, Any]) -> dict[str, Any]:
        runs = node.allocation(args.get("disk"), args.get("offset", 0), args.get("length"))
        return {"runs": [list(r) for r in runs]}

    def mark(args: dict[str, Any]) -> dict[str, int]:
        return {"dirty_bytes": node.mark_dirty(args.get("disk"), _runs(args["runs"]))}

    def verify(args: dict[str, Any]) -> dict[str, Any]:
        runs = args.get("runs")
        return {"disks": node.verify(args.get("disk"), None if runs is None else _runs(runs),
                                     bool(args.get("repair", False)))}

    return [
        Command("replication-verify", verify,
                {"disk": ArgSpec(str, False, "the disk's name (default: every disk)"),
                 "runs": ArgSpec(list, False, "[[offset, length], ...] to compare besides "
                                              "where this node holds data (e.g. where the "
                                              "secondary does)"),
                 "repair": ArgSpec(bool, False, "copy the differing ranges (default false)")},
                help="primary: compare the disks with the secondary's while the guest writes; "
                     "the exact differing ranges (repair=true copies them)"),
        Command("replication-heartbeat", lambda a: node.heartbeat(), timely=True,
                help="the controller's heartbeat: counts as contact for a primary's isolation "
                     "guard; returns what query-replication returns"),
        Command("replication-fence", lambda a: node.fence(a["reason"]),
                {"reason": ArgSpec(str, True, "why (shown to every refused guest write)")},
                help="primary: this node lost a failover; guest writes fail for good"),
        Command("replication-demote", lambda a: node.demote(),
                help="primary: refuse guest writes, final barrier, seal the secondary (it "
                     "then holds every acknowledged write), become a secondary (stage none)"),
        Command("replication-promote", promote,
                {"secondary": ArgSpec(str, True, "NBD URI of the new secondary's replica export"),
                 "write-mode": ArgSpec(str, False, f"sync or async (default "
                                                   f"{default('write-mode')})"),
                 "max-lag": ArgSpec(int, False, "async: most bytes unsent before guest "
                                                "writes wait (default: this node's "
                                                "max-lag)", unit="size"),
                 "timeout": ArgSpec(float, False, "how long the secondary may take (default "
                                                  f"{default('timeout')})", unit="duration"),
                 "isolation-timeout": ArgSpec(float, False, "time without contact before guest "
                                                            "writes are held (default: the "
                                                            "node's isolation-timeout)",
                                              unit="duration"),
                 "force": ArgSpec(bool, False, "a node that is not replicating takes its disk "
                                               "as it is (its caller knows no newer one "
                                               "exists: Pacemaker's agent)"),
                 "probe": ArgSpec(bool, False, "first check that the new secondary's replica "
                                               "export answers with the disks' sizes, and "
                                               "refuse (changing nothing) if not (default "
                                               "true; false for a peer that may be down: "
                                               "Pacemaker's agent)"),
                 "secondary-instance": ArgSpec(str, False, "with probe: refuse unless the node "
                                                           "serving that export is this one "
                                                           "(its query-replication instance)",
                                               internal=True)},
                help="a failed-over secondary, or a running one whose primary was demoted "
                     "(a role switch: nothing rolled back or copied), becomes a primary"),
        Command("query-digests", digests,
                {"disk": disk, "offset": ArgSpec(int, True, "first byte", unit="size"),
                 "length": ArgSpec(int, True, "bytes (at most 1 GiB per call)", unit="size"),
                 "granularity": ArgSpec(int, True, "bytes per digest", unit="size")},
                help="BLAKE2b digests of the node's own disk in granules (checksum sync)"),
        Command("query-allocation", allocation,
                {"disk": disk, "offset": ArgSpec(int, False, "first byte (default 0)", unit="size"),
                 "length": ArgSpec(int, False, "bytes (default: to the end)", unit="size")},
                help="[offset, length] runs where the node's disk holds data (full sync)"),
        Command("replication-mark-dirty", mark,
                {"disk": disk, "runs": ArgSpec(list, True, "[[offset, length], ...]")},
                help="primary: these runs are to be copied by the next start or resync"),
    ]
