"""The secondary's fast path (nbdplugin/repdisk-fast.c's replica slots).

Real secondaries started as ``repdisk`` starts them, written to over tagged ``replica``
connections as a primary's are (and by a real sync primary).  What is checked: which
replica writes the filter serves itself (a ``pwrite`` of the current writer session
whose clusters the hidden overlay already holds) and which the plugin serves (a first
write of a cluster since the checkpoint, zero, trim, another session's), in which stages
it is armed, that a failover still undoes every write since the checkpoint, byte for
byte, that a superseded session's connection cannot write in C, and that a write in C
after a primary's checkpoint mark voids the mark.
"""

from __future__ import annotations

import nbd
import pytest

from repdisk.errors import ControlError
from repdisk.replication.sessions import MARK_SUFFIX
from tests.helpers.nodes import (
    SIZE,
    NodeProc,
    Nodes,
    checkpoint,
    make_disk,
    random_bytes,
    read_export,
    start_pair,
)

BLOCK = 4096
CLUSTER = 64 * 1024  # the node's default cluster-size


def fast(node: NodeProc) -> dict:
    return node.ctl("query-replication")["disks"][0]["fast_path"]  # type: ignore[index]


def connect(node: NodeProc, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(node.listen.socket)
    return h


def test_copied_clusters_are_written_in_c_and_a_failover_still_undoes_them(
        nodes: Nodes) -> None:
    """Per write, whether the filter served it (1) or the plugin (0), and the stages in
    which it is armed; then the failover gives back the checkpoint's bytes exactly."""
    sec = nodes.secondary(make_disk(f"{nodes.folder}/sec.img", SIZE, fill=0x11))
    h = connect(sec, "replica@0.1")
    table = []

    def step(what: str, op: str = "pwrite", offset: int = 0, length: int = BLOCK,
             refused: str | None = None) -> None:
        before = fast(sec)["writes"]
        try:
            if op == "pwrite":
                h.pwrite(bytes([len(table) + 1]) * length, offset)
            elif op == "fua":
                h.pwrite(bytes([len(table) + 1]) * length, offset, nbd.CMD_FLAG_FUA)
            else:
                h.zero(length, offset)
        except nbd.Error as err:
            assert err.errno == refused, (what, err)
        else:
            assert refused is None, what
        state = fast(sec)
        table.append((what, state["armed"], state["writes"] - before))

    try:
        step("not started", refused="ESHUTDOWN")
        sec.ctl("replication-start", mode="secondary")
        step("first write of cluster 0")
        step("cluster 0 again", offset=BLOCK)
        step("cluster 0 and the first of 1", offset=CLUSTER - BLOCK, length=2 * BLOCK)
        step("cluster 1 again", offset=CLUSTER + 2 * BLOCK)
        step("zero in cluster 1", "zero", CLUSTER)
        step("fua in cluster 1", "fua", CLUSTER + BLOCK)
        connect(sec, f"replica{MARK_SUFFIX}@0.1").flush()
        sec.ctl("replication-do-checkpoint")
        at_checkpoint = read_export(sec, "replica")
        step("cluster 0 after the checkpoint", offset=2 * BLOCK)
        step("cluster 0 again after it", offset=3 * BLOCK)
        step("clusters 2 to 4 at once", offset=2 * CLUSTER, length=3 * CLUSTER)
        h.pwrite(random_bytes(3, 3 * CLUSTER), 2 * CLUSTER)   # all copied: in C
        sec.ctl("replication-stop", failover=True)
        step("failed over", offset=CLUSTER + 3 * BLOCK, refused="EPERM")
    finally:
        h.shutdown()
    assert table == [
        ("not started", 0, 0),
        ("first write of cluster 0", 1, 0),
        ("cluster 0 again", 1, 1),
        ("cluster 0 and the first of 1", 1, 0),
        ("cluster 1 again", 1, 1),
        ("zero in cluster 1", 1, 0),
        ("fua in cluster 1", 1, 1),
        ("cluster 0 after the checkpoint", 1, 0),
        ("cluster 0 again after it", 1, 1),
        ("clusters 2 to 4 at once", 1, 0),
        ("failed over", 0, 0),
    ]
    assert fast(sec)["writes"] == 5
    assert read_export(sec, "replica") == at_checkpoint
    expected = bytearray(b"\x11" * SIZE)
    for offset, length, value in [(0, BLOCK, 2), (BLOCK, BLOCK, 3),
                                  (CLUSTER - BLOCK, 2 * BLOCK, 4),
                                  (CLUSTER + 2 * BLOCK, BLOCK, 5),
                                  (CLUSTER, BLOCK, 0), (CLUSTER + BLOCK, BLOCK, 7)]:
        expected[offset:offset + length] = bytes([value]) * length
    assert at_checkpoint == bytes(expected)


def test_a_superseded_sessions_connection_cannot_write_in_c(nodes: Nodes) -> None:
    """A connection bound to the session that wrote in C is refused (EPERM) once a newer
    session is admitted, on a cluster the filter would have served; the new session's
    writes to that cluster are served in C."""
    sec = nodes.secondary(make_disk(f"{nodes.folder}/sec.img", SIZE))
    sec.ctl("replication-start", mode="secondary")
    old = connect(sec, "replica@0.1")
    new = None
    try:
        old.pwrite(b"\x01" * BLOCK, 0)
        old.pwrite(b"\x02" * BLOCK, BLOCK)
        assert fast(sec)["writes"] == 1
        new = connect(sec, "replica@0.2")
        with pytest.raises(nbd.Error) as refused:
            old.pwrite(b"\x03" * BLOCK, 2 * BLOCK)
        assert refused.value.errno == "EPERM"
        new.pwrite(b"\x04" * BLOCK, 3 * BLOCK)
        assert fast(sec)["writes"] == 2
    finally:
        old.shutdown()
        if new is not None:
            new.shutdown()
    assert read_export(sec, "replica")[:4 * BLOCK] == (
        b"\x01" * BLOCK + b"\x02" * BLOCK + bytes(BLOCK) + b"\x04" * BLOCK)


def test_a_write_in_c_after_the_primarys_mark_voids_it(nodes: Nodes) -> None:
    """The secondary checkpoints only with no write of the session since its primary's
    mark: one served by the filter counts."""
    sec = nodes.secondary(make_disk(f"{nodes.folder}/sec.img", SIZE))
    sec.ctl("replication-start", mode="secondary")
    h = connect(sec, "replica@0.1")
    mark = connect(sec, f"replica{MARK_SUFFIX}@0.1")
    try:
        h.pwrite(b"\x01" * BLOCK, 0)
        mark.flush()
        h.pwrite(b"\x02" * BLOCK, BLOCK)   # cluster 0 is copied: in C
        assert fast(sec)["writes"] == 1
        with pytest.raises(ControlError, match="no checkpoint: the primary wrote since"):
            sec.ctl("replication-do-checkpoint")
        mark.flush()
        sec.ctl("replication-do-checkpoint")
    finally:
        h.shutdown()
        mark.shutdown()


def test_a_sync_primarys_writes_reach_the_secondarys_fast_path(nodes: Nodes) -> None:
    """Through a real sync pair: rewrites of a checkpoint interval's clusters are served in
    C on both nodes, both disks end equal, and a failover of the secondary gives back the
    checkpoint's bytes."""
    pri, sec = start_pair(nodes)
    g = pri.client()
    try:
        data = random_bytes(5, 64 * BLOCK)
        g.pwrite(data, 0)
        checkpoint(pri, sec)
        at_checkpoint = read_export(sec, "replica")
        g.pwrite(random_bytes(6, 16 * BLOCK), 0)           # copies clusters 0: plugin
        for i in range(16):                                # cluster 0 again: C
            g.pwrite(bytes([i + 1]) * BLOCK, i * BLOCK)
        assert fast(sec)["writes"] == 16
        assert read_export(sec, "replica") == read_export(pri)
    finally:
        g.shutdown()
    sec.ctl("replication-stop", failover=True)
    assert read_export(sec, "replica") == at_checkpoint


def test_the_secondarys_fast_path_state_names_no_connections(nodes: Nodes) -> None:
    """A replica slot makes no connections: its state says what it does, nothing else."""
    sec = nodes.secondary(make_disk(f"{nodes.folder}/sec.img", SIZE))
    sec.ctl("replication-start", mode="secondary")
    assert fast(sec) == {"armed": 1, "writes": 0, "bytes": 0}
