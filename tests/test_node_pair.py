"""A replicated pair of real nodes (nbdkit + the repdisk plugin), driven as an operator would.

Data goes in through the primary's export with libnbd, ``qemu-io``, ``qemu-img convert`` and
``qemu-img dd``; it must arrive byte for byte on the secondary (its ``replica`` export and its
disk file).  A checkpoint (primary checkpoint, secondary get-error + checkpoint, primary
resume) followed by a failover must leave the secondary's ``active`` export holding exactly
"disk at the last checkpoint + the secondary VM's own writes" (the reference semantics).
"""

from __future__ import annotations

import os
import threading
import time

import nbd
import pytest

from repdisk.errors import ControlError
from tests.helpers.commands import qemu
from tests.helpers.nodes import (
    SIZE,
    MiB,
    NodeProc,
    Nodes,
    checkpoint,
    make_disk,
    random_bytes,
    read_all,
    read_export,
    read_file,
    start_pair,
    write,
)

# -- helpers shared by the node-level tests -------------------------------------------------

# -- data arrives ---------------------------------------------------------------------------

def write_with_every_tool(pri: NodeProc, folder: str) -> bytearray:
    """Write through the primary with qemu-img convert and dd, qemu-io and libnbd; return
    the bytes the disk must now hold."""
    expect = bytearray(SIZE)
    source = os.path.join(folder, "source.img")
    data = random_bytes(1, SIZE)
    with open(source, "wb") as f:
        f.write(data)
    qemu("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, pri.uri())
    expect[:] = data

    # source[15.5M, 16M) -> [0, 512K).  (QEMU 7.2's dd refuses skip= together with count=.)
    qemu("qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=64k", "skip=248",
         f"if={source}", f"of={pri.uri()}")
    expect[0:512 * 1024] = data[248 * 65536:]

    qemu("qemu-io", "-f", "raw", "-c", "write -P 0xa5 6M 1M", "-c", "write -z 6400k 64k",
         "-c", "write -P 0x5a 7340037 3", pri.uri())
    expect[6 * MiB:7 * MiB] = b"\xa5" * MiB
    expect[6400 * 1024:6464 * 1024] = bytes(64 * 1024)
    expect[7340037:7340040] = b"\x5a" * 3

    h = pri.client()
    try:
        blob = random_bytes(2, MiB + 777)
        h.pwrite(blob, 9 * MiB + 5)
        h.pwrite(b"\x01", SIZE - 1)
        h.zero(3 * MiB - 4096, 64 * 1024)     # libnbd: (count, offset)
        h.flush()
    finally:
        h.shutdown()
    expect[9 * MiB + 5:9 * MiB + 5 + len(blob)] = blob
    expect[SIZE - 1] = 1
    expect[64 * 1024:64 * 1024 + 3 * MiB - 4096] = bytes(3 * MiB - 4096)
    return expect


def test_writes_from_libnbd_and_qemu_tools_arrive_on_the_secondary(nodes: Nodes) -> None:
    pri, sec = start_pair(nodes)
    expect = write_with_every_tool(pri, nodes.folder)
    assert len(expect) == SIZE
    assert read_export(pri) == expect
    assert read_export(sec, "replica") == expect
    assert read_file(sec.disks[0]) == expect
    assert read_file(pri.disks[0]) == expect
    # The secondary VM still sees the disk as it was at start (zeros) until a checkpoint...
    assert read_export(sec, "active") == bytes(SIZE)
    checkpoint(pri, sec)
    # ...and the primary's writes after it.
    assert read_export(sec, "active") == expect


# -- checkpoint, then failover ----------------------------------------------------------------

@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_checkpoint_then_failover_gives_checkpoint_plus_secondary_vm_writes(
        nodes: Nodes, write_mode: str) -> None:
    pri, sec = start_pair(nodes, write_mode=write_mode)
    expect = bytearray(SIZE)
    g = pri.client()
    vm = sec.client("active")
    try:
        a = random_bytes(3, 4 * MiB + 3)
        g.pwrite(a, 1)                               # before the checkpoint: kept
        expect[1:1 + len(a)] = a
        checkpoint(pri, sec)
        g.pwrite(random_bytes(4, 4 * MiB), 2 * MiB)  # after it: discarded at failover
        g.zero(MiB, 0)
        c = random_bytes(5, MiB + 1)
        vm.pwrite(c, 7 * MiB - 1)                    # the secondary VM's own write: kept
        expect[7 * MiB - 1:8 * MiB] = c
        vm.pwrite(b"\xee", 3 * MiB + 12345)
        expect[3 * MiB + 12345] = 0xEE
        g.flush()  # async: the secondary gets it from the write-back, soon but not now
        deadline = time.monotonic() + 5
        while (read_export(sec, "replica")[2 * MiB:6 * MiB] != random_bytes(4, 4 * MiB)
               and time.monotonic() < deadline):
            time.sleep(0.02)
        assert read_export(sec, "replica")[2 * MiB:6 * MiB] == random_bytes(4, 4 * MiB)
        sec.ctl("replication-stop", failover=True)
        assert read_all(vm) == expect
    finally:
        vm.shutdown()
        g.shutdown()
    assert read_file(sec.disks[0]) == expect       # the overlays were committed into the disk
    q = sec.ctl("query-replication")
    assert (q["epoch"], q["failed-over"], q["disks"][0]["stage"]) == (1, True, "done")
    assert q["disks"][0]["hidden_bytes"] == q["disks"][0]["active_bytes"] == 0


def test_old_primary_is_refused_after_failover_and_fences_itself(nodes: Nodes) -> None:
    """After a failover the secondary refuses the old primary's writes (never two writers),
    and the old primary, learning that it lost, fences itself: its guest's write fails
    rather than being acknowledged and then lost (the winner holds the pair's data now)."""
    pri, sec = start_pair(nodes, timeout="2s")
    checkpoint(pri, sec)
    sec.ctl("replication-stop", failover=True)
    before = read_export(sec, "replica")
    g = pri.client()
    try:
        with pytest.raises(nbd.Error, match="Operation not permitted"):
            g.pwrite(b"\x77" * 65536, 0)
    finally:
        g.shutdown()
    assert read_export(sec, "replica") == before
    q = pri.ctl("query-replication")
    assert q["fenced"].startswith(f"the node at --secondary {sec.uri('replica')} is in epoch 1"), q
    with pytest.raises(ControlError, match="fenced"):
        pri.ctl("replication-start", mode="primary")


def test_failover_before_the_first_checkpoint_is_refused(nodes: Nodes) -> None:
    pri, sec = start_pair(nodes)
    with pytest.raises(ControlError, match="no complete checkpoint"):
        sec.ctl("replication-stop", failover=True)
    assert sec.ctl("query-replication")["disks"][0]["stage"] == "running"


# -- consistency group ----------------------------------------------------------------------

GROUP = ("root", "data")


def start_group(nodes: Nodes) -> tuple[NodeProc, NodeProc]:
    """A secondary and a primary with two disks each (disk=root:... disk=data:...)."""
    def disks(prefix: str) -> list[tuple[str, str]]:
        return [("disk", f"{name}:" + make_disk(os.path.join(nodes.folder, f"{prefix}-{name}.img"),
                                                SIZE))
                for name in GROUP]
    sec = nodes.start("secondary", "sec", disks("sec"))
    sec.ctl("replication-start", mode="secondary")
    pri = nodes.start("primary", "pri", disks("pri") + [("secondary", sec.uri("replica"))])
    pri.ctl("replication-start", mode="primary")
    return pri, sec


def list_exports(node: NodeProc) -> dict[str, str]:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(node.uri())
    found: dict[str, str] = {}
    try:
        h.opt_list(lambda name, desc: found.__setitem__(name, desc) or 0)
    finally:
        h.opt_abort()
    return found


def test_consistency_group_exports_and_listing(nodes: Nodes) -> None:
    pri, sec = start_group(nodes)
    assert sorted(list_exports(sec)) == ["active", "active/data", "active/root",
                                         "replica", "replica/data", "replica/root"]
    assert sorted(list_exports(pri)) == ["data", "root"]
    assert "the primary writes here" in list_exports(sec)["replica/data"]
    listed = qemu("nbdinfo", "--list", sec.uri())
    for name in ("replica/root", "active/data"):
        assert f'export="{name}"' in listed
    # The default exports: the primary's first disk, the secondary's first disk's active view.
    assert canonical_name(pri) == "root"
    assert canonical_name(sec) == "active"


def canonical_name(node: NodeProc) -> str:
    """The name the node gives its default export (NBD_INFO_NAME)."""
    h = nbd.NBD()
    h.set_full_info(True)
    h.connect_uri(node.uri())
    try:
        return h.get_canonical_export_name()
    finally:
        h.shutdown()


def test_consistency_group_replicates_checkpoints_and_fails_over_together(nodes: Nodes) -> None:
    pri, sec = start_group(nodes)
    kept = {name: random_bytes(10 + i, 2 * MiB) for i, name in enumerate(GROUP)}
    for name in GROUP:
        h = pri.client(name)
        h.pwrite(kept[name], MiB)
        h.shutdown()
    for name in GROUP:
        expect = bytes(MiB) + kept[name] + bytes(SIZE - 3 * MiB)
        assert read_export(sec, f"replica/{name}") == expect
        assert read_file(sec.disks[GROUP.index(name)]) == expect
    assert read_export(sec, "replica") == read_export(sec, "replica/root")
    checkpoint(pri, sec)
    q = sec.ctl("query-replication")
    assert [(d["disk"], d["consistent"]) for d in q["disks"]] == [("root", True), ("data", True)]
    for name in GROUP:                       # after the checkpoint: lost at failover
        h = pri.client(name)
        h.pwrite(b"\x99" * MiB, MiB)
        h.shutdown()
    sec.ctl("replication-stop", failover=True)
    for name in GROUP:
        assert read_export(sec, f"active/{name}") == bytes(MiB) + kept[name] + bytes(SIZE - 3 * MiB)
    q = sec.ctl("query-replication")
    assert [d["stage"] for d in q["disks"]] == ["done", "done"]
    assert [d["stage"] for d in pri.ctl("query-replication")["disks"]] == ["running", "running"]


def test_python_thread_states_stay_bounded_over_many_connections(nodes: Nodes) -> None:
    """Each nbdkit thread keeps one Python thread state (threadstate.py); those of the
    threads of closed connections are deleted, so many connections do not pile them up."""
    pri, sec = start_pair(nodes)
    for i in range(12):
        h = pri.client()
        h.pwrite(bytes([i + 1]) * 4096, i * 4096)
        assert h.pread(4096, i * 4096) == bytes([i + 1]) * 4096
        h.shutdown()
    h = pri.client()
    try:
        h.pread(512, 0)
        states = pri.ctl("query-replication")["python-thread-states"]
    finally:
        h.shutdown()
    # sync primary: 4 workers and the connection thread per connection; the live
    # connection's plus at most one closing connection's, never the 12 closed ones'.
    assert 1 <= states <= 2 * (4 + 1)
    assert read_export(sec, "replica")[:12 * 4096] == b"".join(
        bytes([i + 1]) * 4096 for i in range(12))


def test_a_resync_under_way_shows_no_error_of_the_link_it_mended(nodes: Nodes) -> None:
    """Once a resync has the link up again, the primary's error (why the link broke) is
    cleared: a status line must not say "writes are kept local" while they are forwarded."""
    pri, sec = start_pair(nodes, resync_rate="4M")
    sec.kill()
    write(pri, random_bytes(1, 8 * MiB), 0)                # degraded: dirty, the error set
    disk = pri.ctl("query-replication")["disks"][0]
    assert disk["degraded"] and "writes are kept local" in disk["error"], disk
    nodes.secondary(sec.disks[0]).ctl("replication-start", mode="secondary")
    resync = threading.Thread(target=pri.ctl, args=("replication-resync",))
    resync.start()
    seen = []
    while resync.is_alive():                                  # about 2 s at 4 MiB/s
        disk = pri.ctl("query-replication")["disks"][0]
        if not disk["degraded"] and disk["dirty_bytes"]:
            seen.append(disk["error"])
        time.sleep(0.1)
    resync.join()
    assert seen and set(seen) == {None}, seen
