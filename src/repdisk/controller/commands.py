"""The controller's control socket: its QMP commands, each one operation of the controller."""

from __future__ import annotations

from typing import Any, Protocol

from repdisk.qmp.protocol import ArgSpec, Command


class Operations(Protocol):
    """What the commands call (``Controller``'s operations and views)."""

    def query(self) -> dict[str, Any]: ...

    def metrics(self) -> str: ...

    def checkpoint(self) -> dict[str, Any]: ...

    def failover(self, reason: str = ..., manual: bool = ...) -> dict[str, Any]: ...

    def resync(self, mode: str = ...) -> int: ...

    def promote(self, secondary_control: str, secondary_uri: str,
                write_mode: str | None = ...) -> dict[str, Any]: ...

    def verify(self, repair: bool = ...) -> dict[str, Any]: ...

    def switchover(self, uri: str, back_uri: str, migrate: str | None = ...,
                   qmp: str | None = ...) -> dict[str, Any]: ...


def control_commands(ctl: Operations) -> list[Command]:
    """The controller's control socket: one command per operation an operator may run."""
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
                lambda a: ctl.promote(a["secondary"], a["uri"], a.get("write-mode")),
                {"secondary": ArgSpec(str, True, "the new secondary's control socket"),
                 "uri": ArgSpec(str, True, "NBD URI of the new secondary's replica export"),
                 "write-mode": ArgSpec(str, False, "sync or async (default: the lost "
                                                   "primary's, as the controller last saw it)")},
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
