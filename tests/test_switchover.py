"""Planned switchover (switchover.py) on real nodes: roles swap and swap back, nothing lost
(not even writes after the last checkpoint), nothing copied, the old primary's guest
refused, the new secondary consistent at once; a pair that is not ready is refused with
nothing changed."""

from __future__ import annotations

import os
import signal
import threading
import time

import nbd
import pytest

from repdisk.controller.switchover import CATCH_UP_BYTES, Node, switchover
from repdisk.errors import ControlError
from repdisk.qmp.client import QMPClient
from tests.helpers.controller import Writer, bare_qemu, file_bytes, make_pair, wait_for
from tests.helpers.nodes import (
    SIZE,
    MiB,
    NodeProc,
    Nodes,
    checkpoint,
    random_bytes,
    read_file,
    start_pair,
    write,
)


def side(node: NodeProc, name: str) -> Node:
    return Node(lambda command, args: node.ctl(command, **args), node.uri("replica"), name)


@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_switchover_and_back_loses_nothing_and_copies_nothing(nodes: Nodes,
                                                              write_mode: str) -> None:
    pri, sec = start_pair(nodes, write_mode=write_mode)
    image = bytearray(SIZE)
    for i, (offset, n) in enumerate([(0, 2 * MiB), (7 * MiB, MiB)]):
        data = random_bytes(i, n)
        write(pri, data, offset)
        image[offset:offset + n] = data
        if i == 0:
            checkpoint(pri, sec)             # the second write comes after it
    guest = pri.client()
    a, b = side(pri, "A"), side(sec, "B")
    result = switchover(a, b, write_mode=write_mode)
    assert result["epoch"] == 1 and result["pause"] < 1.0 and result["lag"] == 0, result
    new, old = sec.ctl("query-replication"), pri.ctl("query-replication")
    assert (new["role"], old["role"], new["epoch"], old["epoch"]) == ("primary", "secondary", 1, 1)
    assert new["disks"][0]["counters"]["forwarded"] == 0           # nothing copied
    assert old["disks"][0]["stage"] == "running" and old["disks"][0]["consistent"]
    assert read_file(pri.disks[0]) == read_file(sec.disks[0]) == bytes(image)
    with pytest.raises(nbd.Error):                                 # the old primary refuses
        guest.pwrite(b"\x55" * 4096, 0)
    guest.shutdown()

    data = random_bytes(9, MiB)                                   # the new pair replicates
    write(sec, data, 3 * MiB)
    image[3 * MiB:4 * MiB] = data
    result = switchover(b, a, write_mode=write_mode)               # and back
    assert result["epoch"] == 2
    assert pri.ctl("query-replication")["role"] == "primary"
    write(pri, b"\x66" * 4096, 0)
    image[0:4096] = b"\x66" * 4096
    checkpoint(pri, sec)
    assert read_file(pri.disks[0]) == read_file(sec.disks[0]) == bytes(image)


def test_an_async_switchover_writes_back_before_the_pause(nodes: Nodes) -> None:
    """What an async primary has not written back yet is sent with the guest running: the
    pause begins with its secondary lacking at most CATCH_UP_BYTES, not 48 MiB.  B then
    replicates with A's write mode and max-lag."""
    pri, sec = start_pair(nodes, size=64 * MiB, write_mode="async", max_lag="100M")
    checkpoint(pri, sec)
    data = random_bytes(3, 48 * MiB)
    os.kill(sec.proc.pid, signal.SIGSTOP)            # the write-back waits; the guest not
    try:
        for at in range(0, len(data), 16 * MiB):
            write(pri, data[at:at + 16 * MiB], at)
        behind = pri.ctl("query-replication")["disks"][0]["lag_bytes"]
        assert behind > 32 * MiB, behind
    finally:
        threading.Timer(0.3, os.kill, (sec.proc.pid, signal.SIGCONT)).start()
    result = switchover(side(pri, "A"), side(sec, "B"), write_mode="async",
                        max_lag=100 * MiB)
    assert result["epoch"] == 1 and result["lag"] <= CATCH_UP_BYTES, result
    assert read_file(sec.disks[0])[:len(data)] == data
    disk = sec.ctl("query-replication")["disks"][0]
    assert (disk["write_mode"], disk["max_lag"]) == ("async", 100 * MiB)


def test_switchover_of_a_pair_not_ready_is_refused_and_changes_nothing(nodes: Nodes) -> None:
    pri, sec = start_pair(nodes)
    with pytest.raises(ControlError, match="cannot switch over: B disk disk0 holds no "
                                           "complete checkpoint yet"):
        switchover(side(pri, "A"), side(sec, "B"))
    with pytest.raises(ControlError, match="cannot switch over: A is a secondary and B a "
                                           "primary"):
        switchover(side(sec, "A"), side(pri, "B"))
    assert pri.ctl("query-replication")["role"] == "primary"
    assert sec.ctl("query-replication")["role"] == "secondary"
    write(pri, b"\x11" * 4096, 0)                                  # the guest goes on


# -- through the controller (controller-switchover, controller-verify) ---------------------

@pytest.mark.timeout(120)
def test_controller_switchover_and_back_and_verify(nodes: Nodes, tmp_path) -> None:
    pair = make_pair(nodes)
    try:
        hook = tmp_path / "hook.out"
        ctl = pair.controller(
            on_switchover=f"echo $REPDISK_EPOCH $REPDISK_PRIMARY_CONTROL >> {hook}")
        ctl.start()
        writer = Writer(pair.pri.uri(), pair.size, seed=5).start()
        time.sleep(0.3)
        ctl.checkpoint()
        time.sleep(0.2)                                 # writes after the checkpoint
        writer.stop()                                   # the guest paused (or migrated away)
        model = bytes(writer.model)                     # every acknowledged write
        for uri, back, said in (
                (pair.sec.uri("replica"), pair.pri.uri("replica"), "is not the primary"),
                (pair.pri.uri(), pair.sec.uri("replica"), "not a replica export"),
                (pair.pri.uri("replica"), pair.pri.uri("replica"), "is not the secondary")):
            with pytest.raises(ControlError, match=f"{said}.*nothing changed"):
                ctl.switchover(uri, back)                # a tired operator's URIs
            assert (ctl.state.value, ctl.epoch) == ("running", 1)
            assert pair.pri.ctl("query-replication")["role"] == "primary"
        result = ctl.switchover(pair.pri.uri("replica"), pair.sec.uri("replica"))
        assert result["epoch"] == 2 and ctl.epoch == 2 and ctl.state.value == "running"
        q = ctl.query()
        assert q["nodes"]["primary"]["control"] == pair.sec.control
        assert q["counters"]["switchovers"] == 1
        assert [e["event"] for e in q["events"]].count("SWITCHOVER_COMPLETED") == 1
        assert file_bytes(pair.sec_disk) == file_bytes(pair.pri_disk) == model
        assert pair.sec.ctl("query-replication")["disks"][0]["counters"]["forwarded"] == 0

        write(pair.sec, b"\x77" * MiB, 0)               # the new primary's guest
        took = ctl.counters["checkpoints"]
        ctl.step()                                      # a heartbeat round: all well
        assert ctl.state.value == "running"
        assert ctl.counters["checkpoints"] == took + 1  # the new pair's, though --interval is
        assert ctl.query()["last_checkpoints"][-1]["seq"] == took + 1  # an hour: its age is true
        v = ctl.verify()["disks"][0]
        assert (v["ranges"], v["bytes"]) == ([], 0)
        with open(pair.pri_disk, "r+b") as f:           # the new secondary, behind its back
            f.seek(3 * MiB + 5)
            old = f.read(3)
            f.seek(3 * MiB + 5)
            f.write(bytes(b ^ 0x5A for b in old))
        v = ctl.verify(repair=True)["disks"][0]
        assert v["ranges"] == [[3 * MiB + 5, 3]] and v["repaired"] > 0, v
        assert ctl.verify()["disks"][0]["ranges"] == []

        back = ctl.switchover(pair.sec.uri("replica"), pair.pri.uri("replica"))
        assert back["epoch"] == 3 and ctl.query()["nodes"]["primary"]["control"] == pair.pri.control
        deadline = time.monotonic() + 10
        while hook.read_text().count("\n") < 2 if hook.exists() else True:
            assert time.monotonic() < deadline, "the hook did not run twice"
            time.sleep(0.05)
        assert hook.read_text() == f"2 {pair.sec.control}\n3 {pair.pri.control}\n"
    finally:
        pair.close()


def test_switchover_with_a_wrong_new_guest_monitor_changes_nothing(nodes: Nodes,
                                                                   tmp_path) -> None:
    """qmp= must be a QEMU waiting for the guest (-incoming): a typo, or the guest's own
    monitor, is refused before the guest is migrated or a node changes."""
    pair = make_pair(nodes)
    qmp, other = str(tmp_path / "guest.qmp"), str(tmp_path / "other.qmp")
    qemus = [bare_qemu(qmp), bare_qemu(other)]
    try:
        wait_for(lambda: os.path.exists(qmp) and os.path.exists(other), 10, "QMP sockets")
        ctl = pair.controller(qmp=qmp, control=str(tmp_path / "c.qmp"))
        ctl.start()
        for new, said in ((str(tmp_path / "typo.qmp"), "does not answer"),
                          (qmp, "does not answer"),      # the guest's own: held by us
                          (other, "is a QEMU in state running")):
            with pytest.raises(ControlError, match=f"qmp={new}.*{said}.*nothing changed"):
                ctl.switchover(pair.pri.uri("replica"), pair.sec.uri("replica"),
                               migrate=f"unix:{tmp_path}/mig.sock", qmp=new)
            assert (ctl.state.value, ctl.epoch) == ("running", 1)
            assert pair.pri.ctl("query-replication")["role"] == "primary"
        ctl.close()                                      # QEMU serves one QMP client
        with QMPClient(timeout=5).connect(qmp) as guest:
            assert guest.execute("query-status")["status"] == "running"
    finally:
        for q in qemus:
            q.kill()
            q.wait()
        pair.close()
