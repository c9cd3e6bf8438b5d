"""Item 2 of issue 18: a planned switchover with a real guest writing records.

The guest runs on the primary A's export. It is live-migrated (QEMU ``migrate``) to a QEMU
started paused with ``-incoming`` on the secondary B's ``active`` export; once the
migration has stopped it on A, the pair switches over (switchover.py: A demotes, B is
promoted as a role switch, both start, a pair checkpoint) and the guest continues on B.
Then the same back to A. The records must be gapless across both moves (none lost, not
even those after the last checkpoint), the guest-visible pause (A stopped .. B running)
short, the old primary must refuse guest writes, and the new secondary be consistent.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbd
import pytest

from repdisk.controller.switchover import Node, checkpoint, switchover
from repdisk.qmp.client import execute
from tests.helpers.nodes import NodeProc
from vmtests.guest import GuestVM
from vmtests.harness import Scenario, check_records, console_problems, records_of


def side(node: NodeProc, name: str) -> Node:
    return Node(lambda command, args: node.ctl(command, **args), node.uri("replica"), name)


def move(scenario: Scenario, vm: GuestVM, name: str, drives: list[str], a: Node,
         b: Node) -> tuple[GuestVM, float]:
    """Migrate ``vm`` to a new QEMU on ``drives`` (b's), switch the pair over, run it there;
    returns the new VM and the guest-visible pause (A stopped .. B running)."""
    sock = scenario.folder / f"{name}.migrate.sock"
    new = scenario.vm(name, drives, paused=True, incoming=f"unix:{sock}", workload="records")
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline, "the incoming QEMU does not listen"
        time.sleep(0.01)
    vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0})   # no 128 MiB/s throttle
    vm.qmp("migrate", uri=f"unix:{sock}")
    stopped = None
    while (status := vm.qmp("query-migrate").get("status")) != "completed":
        assert status not in ("failed", "cancelled"), status
        if stopped is None and not vm.qmp("query-status")["running"]:
            stopped = time.monotonic()      # the stop-and-copy phase began
        time.sleep(0.002)
    stopped = stopped or time.monotonic()
    result = switchover(a, b)
    new.qmp("cont")
    pause = time.monotonic() - stopped
    scenario.timeline.mark("switchover", f"{a.name} -> {b.name}: epoch {result['epoch']}, "
                                         f"guest paused {pause:.3f}s (switchover "
                                         f"{result['pause']:.3f}s of it)")
    return new, pause


@pytest.mark.timeout(240)
def test_switchover_and_back_with_a_writing_guest(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root")}, timeout="5s")
    pair.sec.ctl("replication-start", mode="secondary")
    pair.pri.ctl("replication-start", mode="primary")
    a, b = side(pair.pri, "A"), side(pair.sec, "B")
    vm = scenario.vm("guest-a", pair.uris(pair.pri), workload="records")
    scenario.wait_booted(vm, "guest-a")
    vm.wait_for_record(vm.last_record() + 5, 60)
    checkpoint(a, b)                            # B consistent; the guest writes on after it
    vm.wait_for_record(vm.last_record() + 5, 60)

    on_b, pause_1 = move(scenario, vm, "guest-b", pair.uris(pair.sec, "active"), a, b)
    on_b.wait_for_record(vm.last_record() + 5, 60)
    # The old primary refuses guest writes now (EPERM on the wire), in the old epoch's export.
    h = nbd.NBD()
    h.connect_uri(pair.pri.uri("root"))
    with pytest.raises(nbd.Error):
        h.pwrite(b"\x55" * 4096, 1 << 20)
    h.shutdown()
    q = pair.pri.ctl("query-replication")
    assert q["role"] == "secondary" and q["disks"][0]["consistent"], q

    back, pause_2 = move(scenario, on_b, "guest-a2", pair.uris(pair.pri, "active"), b, a)
    back.wait_for_record(on_b.last_record() + 5, 60)
    checkpoint(a, b)
    scenario.kill("guest QEMU", back.kill)

    records = records_of(vm, on_b, back)
    assert records == list(range(records[0], records[-1] + 1)), "a record was lost or repeated"
    for v in (vm, on_b, back):
        assert console_problems(v) == []
    assert pause_1 < 1.5 and pause_2 < 1.5, (pause_1, pause_2)   # < 1 s + the VM state
    # Both disks hold every record the guest announced (sync: the secondary has each).
    for disk in (pair.pri_disks["root"], pair.sec_disks["root"]):
        count, problems = check_records(Path(disk), None)
        assert problems == [] and count >= records[-1], (disk, count, problems)


def controller_move(scenario: Scenario, ctl_socket: str, vm: GuestVM, name: str,
                    drives: list[str], uri: str, back_uri: str) -> tuple[GuestVM, dict]:
    """``repdisk ctl CTRL controller-switchover``: the controller migrates the guest to a
    QEMU paused with -incoming on ``drives`` and resumes it there after the switch."""
    sock = scenario.folder / f"{name}.migrate.sock"
    new = scenario.vm(name, drives, paused=True, incoming=f"unix:{sock}", workload="records")
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline, "the incoming QEMU does not listen"
        time.sleep(0.01)
    result = execute(ctl_socket, "controller-switchover", {
        "uri": uri, "back-uri": back_uri, "migrate": f"unix:{sock}",
        "qmp": str(scenario.vm_control(name))}, timeout=120.0)
    scenario.timeline.mark("switchover", f"controller: epoch {result['epoch']}, guest paused "
                                         f"{result['pause']:.3f}s")
    return new, result


@pytest.mark.timeout(240)
def test_controller_switchover_moves_the_guest_and_back(scenario: Scenario) -> None:
    """The same through ``repdisk controller`` (--qmp: it pauses the guest at each
    checkpoint, the new QEMU's monitor after a switchover)."""
    pair = scenario.pair({"root": scenario.disk("root")}, timeout="1s")
    vm, ctl = scenario.protected_guest(pair, "guest-a")
    vm.wait_for_record(vm.last_record() + 5, 60)
    ctl.next_checkpoint(began_after=time.time())
    pri_uri, sec_uri = pair.pri.uri("replica"), pair.sec.uri("replica")

    on_b, first = controller_move(scenario, ctl.control, vm, "guest-b",
                                  pair.uris(pair.sec, "active"), pri_uri, sec_uri)
    on_b.wait_for_record(vm.last_record() + 5, 60)
    q = ctl.query()
    assert q["state"] == "running" and q["epoch"] == first["epoch"] == 2, q
    assert q["nodes"]["primary"]["control"] == pair.sec.control
    ctl.next_checkpoint(began_after=time.time())    # paused through guest-b's monitor

    back, second = controller_move(scenario, ctl.control, on_b, "guest-a2",
                                   pair.uris(pair.pri, "active"), sec_uri, pri_uri)
    back.wait_for_record(on_b.last_record() + 5, 60)
    ctl.next_checkpoint(began_after=time.time())
    assert ctl.query()["nodes"]["primary"]["control"] == pair.pri.control
    scenario.kill("guest QEMU", back.kill)

    records = records_of(vm, on_b, back)
    assert records == list(range(records[0], records[-1] + 1)), "a record was lost or repeated"
    for v in (vm, on_b, back):
        assert console_problems(v) == []
    assert first["pause"] < 1.5 and second["pause"] < 1.5, (first, second)
    assert not ctl.hook_file.exists(), "a switchover ran the failover hook"
    count, problems = check_records(Path(pair.sec_disks["root"]), None)
    assert problems == [] and count >= records[-1], (count, problems)
