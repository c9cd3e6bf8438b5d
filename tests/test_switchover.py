"""Planned switchover (switchover.py) on real nodes: roles swap and swap back, nothing lost
(not even writes after the last checkpoint), nothing copied, the old primary's guest
refused, the new secondary consistent at once; a pair that is not ready is refused with
nothing changed."""

from __future__ import annotations

import nbd
import pytest

from repdisk.errors import ControlError
from repdisk.switchover import Node, switchover
from tests.conftest import MiB, NodeProc, Nodes
from tests.test_demote import write
from tests.test_node_pair import SIZE, checkpoint, random_bytes, read_file, start_pair


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
    assert result["epoch"] == 1 and result["pause"] < 1.0, result
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
