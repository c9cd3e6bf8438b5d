"""QEMU's block-replication scenarios 3-8 (tests/unit/test-replication.c), through nbdkit.

The same behaviour as tests/test_qemu_scenarios.py, but end to end: a secondary node (nbdkit +
the plugin) on a 64 MiB disk pre-filled with 0x11, driven over its control socket; the
primary's writes arrive on its ``replica`` export (from libnbd, as the primary's forwarder
writes, or from a real primary node), the secondary VM uses its ``active`` export.  Every byte
of every range is compared, through the exports and in the disk file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import nbd
import pytest

from repdisk.errors import ControlError
from repdisk.qmp.client import QMPClient
from tests.helpers.nodes import CHUNK, MiB, NodeProc, Nodes, make_disk, read_file

SIZE, HALF = 64 * MiB, 32 * MiB


class Scenario:
    """A secondary node on a 0x11 disk, how the primary's writes reach it, and an event tap."""

    def __init__(self, nodes: Nodes, via_primary: bool) -> None:
        self.nodes = nodes
        self.disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE, 0x11)
        self.sec = nodes.secondary(self.disk)
        self.via_primary = via_primary
        self.pri: NodeProc | None = None
        self.events = QMPClient(timeout=30).connect(self.sec.control)

    def start(self) -> None:
        self.sec.ctl("replication-start", mode="secondary")
        if self.via_primary and self.pri is None:
            pri_disk = make_disk(os.path.join(self.nodes.folder, "pri.img"), SIZE, 0x11)
            self.pri = self.nodes.primary(pri_disk, self.sec)
            self.pri.ctl("replication-start", mode="primary")

    def primary_writes_upper_half(self) -> None:
        """0x22 to [32M, 64M): through the primary's guest export, or straight to replica."""
        node, export = (self.pri, "") if self.via_primary else (self.sec, "replica")
        assert node is not None
        write(node, export, HALF, HALF, 0x22)

    def close(self) -> None:
        self.events.close()


@pytest.fixture(params=[False, True], ids=["replica", "via-primary"])
def sc(request: pytest.FixtureRequest, nodes: Nodes) -> Iterator[Scenario]:
    s = Scenario(nodes, request.param)
    yield s
    s.close()


@pytest.fixture
def direct(nodes: Nodes) -> Iterator[Scenario]:
    s = Scenario(nodes, False)
    yield s
    s.close()


def with_handle(node: NodeProc, export: str, fn: Callable[[nbd.NBD], None]) -> None:
    h = node.client(export)
    try:
        fn(h)
    finally:
        h.shutdown()


def write(node: NodeProc, export: str, offset: int, length: int, byte: int) -> None:
    def go(h: nbd.NBD) -> None:
        for off in range(offset, offset + length, CHUNK):
            h.pwrite(bytes([byte]) * min(CHUNK, offset + length - off), off)
        h.flush()
    with_handle(node, export, go)


def expect(node: NodeProc, export: str, offset: int, length: int, byte: int) -> None:
    """Every byte of [offset, offset+length) of the export is ``byte``."""
    def go(h: nbd.NBD) -> None:
        for off in range(offset, offset + length, CHUNK):
            n = min(CHUNK, offset + length - off)
            assert h.pread(n, off) == bytes([byte]) * n, (export, off, n)
    with_handle(node, export, go)


def refused(node: NodeProc, export: str, errno_value: int = errno.EIO) -> None:
    def go(h: nbd.NBD) -> None:
        for attempt in (lambda: h.pread(4096, 0), lambda: h.pwrite(b"\x22" * 4096, 0)):
            with pytest.raises(nbd.Error) as exc:
                attempt()
            assert exc.value.errno == errno.errorcode[errno_value]
    with_handle(node, export, go)


def disk_q(node: NodeProc) -> dict:
    return node.ctl("query-replication")["disks"][0]


def pair_checkpoint(sc: Scenario) -> None:
    """The secondary's checkpoint, after the primary's if there is one (a secondary takes
    one only after its writer session's primary marked it) and with its resume."""
    if sc.pri is not None:
        sc.pri.ctl("replication-do-checkpoint")
    sc.sec.ctl("replication-do-checkpoint")
    if sc.pri is not None:
        sc.pri.ctl("replication-resume")


def test_3_secondary_not_started_refuses_io(direct: Scenario) -> None:
    refused(direct.sec, "active")
    refused(direct.sec, "replica", errno.ESHUTDOWN)  # "not started yet"
    assert disk_q(direct.sec)["stage"] == "none"
    assert read_file(direct.disk) == b"\x11" * SIZE


def scenario_4(sc: Scenario, checkpoint_first: bool = False) -> None:
    sc.start()
    if checkpoint_first:
        pair_checkpoint(sc)
    expect(sc.sec, "active", 0, SIZE, 0x11)
    sc.primary_writes_upper_half()
    expect(sc.sec, "replica", HALF, HALF, 0x22)
    expect(sc.sec, "active", HALF, HALF, 0x11)        # old data was copied into hidden
    write(sc.sec, "active", 0, HALF, 0x33)
    expect(sc.sec, "active", 0, HALF, 0x33)
    expect(sc.sec, "active", HALF, HALF, 0x11)
    expect(sc.sec, "replica", 0, HALF, 0x11)          # the VM's writes stay off the disk


def test_4_secondary_started(sc: Scenario) -> None:
    scenario_4(sc)
    q = disk_q(sc.sec)
    assert (q["stage"], q["hidden_bytes"], q["active_bytes"]) == ("running", HALF, HALF)
    assert read_file(sc.disk) == b"\x11" * HALF + b"\x22" * HALF


def failover_5(sc: Scenario) -> None:
    """Scenario 5.  repdisk refuses to fail over before the first checkpoint after start, so
    one is taken before the primary's write (QEMU's start checkpoints at once)."""
    scenario_4(sc, checkpoint_first=True)
    sc.sec.ctl("replication-stop", failover=True)
    done = sc.events.wait_event("FAILOVER_COMPLETED")
    assert done["data"]["disk"] == "disk0"
    expect(sc.sec, "active", 0, HALF, 0x33)
    expect(sc.sec, "active", HALF, HALF, 0x11)        # upstream expects 0x22 here (its bug)
    assert read_file(sc.disk) == b"\x33" * HALF + b"\x11" * HALF


def test_5_failover(sc: Scenario) -> None:
    failover_5(sc)
    q = disk_q(sc.sec)
    assert (q["stage"], q["hidden_bytes"], q["active_bytes"]) == ("done", 0, 0)
    sc.sec.ctl("replication-get-error")
    with pytest.raises(nbd.Error):                    # the old primary is shut out
        write(sc.sec, "replica", 0, 4096, 0x44)


def test_6_continuous_replication_after_failover(direct: Scenario) -> None:
    """QEMU ignores start(PRIMARY), checkpoint and stop on a promoted secondary; so does a
    repdisk node that won a failover, and says so in the reply and an event.  Its
    epoch rules still refuse what is unsafe: a start in an older epoch, or as a secondary in
    the epoch it won (never two writers)."""
    failover_5(direct)
    direct.events.events.clear()
    over = ("this node took over in a failover (epoch 1): its replication is over; promote "
            "it (replication-promote) to replicate again")
    requests = [("replication-start", {"mode": "primary"}),
                ("replication-start", {"mode": "primary", "epoch": 1}),
                ("replication-do-checkpoint", {}),
                ("replication-stop", {"failover": True}),
                ("replication-stop", {"failover": False})]
    for command, args in requests:
        assert direct.sec.ctl(command, **args) == {"ignored": over}, command
        event = direct.events.wait_event("REPLICATION_REQUEST_IGNORED")
        assert event["data"] == {"command": command, "reason": over}
    with pytest.raises(ControlError, match="won the failover into epoch 1 .*promote it"):
        direct.sec.ctl("replication-start", mode="secondary")
    with pytest.raises(ControlError, match="start in epoch 0 refused: this node is already in "
                                           "epoch 1"):
        direct.sec.ctl("replication-start", mode="primary", epoch=0)
    q = direct.sec.ctl("query-replication")
    assert (q["epoch"], q["failed-over"], q["disks"][0]["stage"]) == (1, True, "done")
    expect(direct.sec, "active", 0, HALF, 0x33)
    expect(direct.sec, "active", HALF, HALF, 0x11)
    assert read_file(direct.disk) == b"\x33" * HALF + b"\x11" * HALF


def test_7_checkpoint_drops_the_hidden_buffer(sc: Scenario) -> None:
    sc.start()
    sc.primary_writes_upper_half()
    expect(sc.sec, "active", HALF, HALF, 0x11)
    pair_checkpoint(sc)
    assert sc.events.wait_event("CHECKPOINT_COMPLETED")["data"]["disk"] == "disk0"
    expect(sc.sec, "active", HALF, HALF, 0x22)
    expect(sc.sec, "active", 0, HALF, 0x11)
    assert disk_q(sc.sec)["hidden_bytes"] == 0


def test_8_get_error_after_start(direct: Scenario) -> None:
    with pytest.raises(ControlError, match="not running"):
        direct.sec.ctl("replication-get-error")
    direct.start()
    direct.sec.ctl("replication-get-error")


# -- what upstream lacks, through the control socket -------------------------------------------

def test_wrong_starts_and_early_commands_are_refused(direct: Scenario) -> None:
    sec = direct.sec
    with pytest.raises(ControlError, match="not running"):
        sec.ctl("replication-do-checkpoint")
    with pytest.raises(ControlError, match="not running"):
        sec.ctl("replication-stop", failover=False)
    with pytest.raises(ControlError, match="start mode primary does not match"):
        sec.ctl("replication-start", mode="primary")
    assert disk_q(sec)["stage"] == "none"
    direct.start()
    with pytest.raises(ControlError, match="running or done"):
        sec.ctl("replication-start", mode="secondary")
    assert disk_q(sec)["stage"] == "running"


def test_stop_without_failover_keeps_the_primary_writes(direct: Scenario) -> None:
    scenario_4(direct)
    direct.sec.ctl("replication-stop", failover=False)
    assert disk_q(direct.sec)["stage"] == "done"
    expect(direct.sec, "active", 0, HALF, 0x11)       # the VM's writes were dropped
    expect(direct.sec, "active", HALF, HALF, 0x22)
    assert read_file(direct.disk) == b"\x11" * HALF + b"\x22" * HALF
