"""A planned role switch at node level: ``replication-demote`` then ``replication-promote``.

The primary demotes (guest writes refused, final barrier, seal), the secondary is promoted
with nothing rolled back -- not even the writes after the last checkpoint -- and the old
primary becomes the new primary's secondary with nothing copied.  A demote that cannot
keep that promise (the secondary is gone) is refused and changes nothing; a running
secondary without a seal is never promoted.
"""

from __future__ import annotations

import json

import nbd
import pytest

from repdisk.errors import ControlError
from tests.helpers.nodes import (
    SIZE,
    MiB,
    NodeProc,
    Nodes,
    checkpoint,
    random_bytes,
    read_export,
    read_file,
    start_pair,
    write,
)


def switch(pri: NodeProc, sec: NodeProc) -> dict:
    """Demote ``pri``, promote ``sec`` with ``pri`` as its secondary, start both; the new
    primary's query afterwards."""
    pri.ctl("replication-demote")
    sec.ctl("replication-promote", secondary=pri.uri("replica"))
    epoch = sec.ctl("query-replication")["epoch"]
    pri.ctl("replication-start", mode="secondary", epoch=epoch)
    sec.ctl("replication-start", mode="primary", epoch=epoch)
    return sec.ctl("query-replication")


@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_switch_loses_nothing_and_copies_nothing(nodes: Nodes, write_mode: str) -> None:
    pri, sec = start_pair(nodes, write_mode=write_mode)
    image = bytearray(SIZE)
    first = random_bytes(1, 2 * MiB)
    write(pri, first, 0)
    image[0:2 * MiB] = first
    checkpoint(pri, sec)
    late = random_bytes(2, MiB)                      # after the last checkpoint
    write(pri, late, 5 * MiB)
    image[5 * MiB:6 * MiB] = late
    guest = pri.client()                             # a guest connection open across it
    q = switch(pri, sec)
    assert q["role"] == "primary" and q["epoch"] == 1 and q["sealed"] == {}
    assert all(d["stage"] == "running" and d["dirty_bytes"] == 0 for d in q["disks"])
    assert q["disks"][0]["counters"]["forwarded"] == 0          # nothing copied
    old = pri.ctl("query-replication")
    assert old["role"] == "secondary" and old["epoch"] == 1
    assert old["guest-writes-refused"]
    assert read_file(pri.disks[0]) == read_file(sec.disks[0]) == bytes(image)
    # The old primary's guest connection is refused (EROFS: EPERM on the wire), not lost.
    with pytest.raises(nbd.Error):
        guest.pwrite(b"\x55" * 4096, 0)
    guest.shutdown()
    # The new pair replicates: writes on the new primary reach the old one.
    more = random_bytes(3, MiB)
    write(sec, more, 9 * MiB)
    image[9 * MiB:10 * MiB] = more
    checkpoint(sec, pri)
    assert read_export(pri, "active") == bytes(image)
    assert read_file(pri.disks[0]) == read_file(sec.disks[0]) == bytes(image)
    # And back again: the old primary takes over once more, as a role switch.
    q = switch(sec, pri)
    assert q["role"] == "primary" and q["epoch"] == 2
    write(pri, b"\x66" * 4096, 0)
    image[0:4096] = b"\x66" * 4096
    checkpoint(pri, sec)
    assert read_file(pri.disks[0]) == read_file(sec.disks[0]) == bytes(image)


def test_demote_without_the_secondary_is_refused_and_changes_nothing(nodes: Nodes) -> None:
    pri, sec = start_pair(nodes, timeout="1s")
    checkpoint(pri, sec)
    sec.kill()
    write(pri, b"\x11" * 65536, 0)                  # degrades the primary
    with pytest.raises(ControlError, match="cannot demote: replication is degraded"):
        pri.ctl("replication-demote")
    q = pri.ctl("query-replication")
    assert q["role"] == "primary" and not q["guest-writes-refused"]
    write(pri, b"\x22" * 4096, 0)                   # the guest goes on
    assert read_file(pri.disks[0])[:4096] == b"\x22" * 4096


def test_running_secondary_without_a_seal_is_not_promoted(nodes: Nodes) -> None:
    pri, sec = start_pair(nodes)
    checkpoint(pri, sec)
    with pytest.raises(ControlError, match="cannot promote: stage running"):
        sec.ctl("replication-promote", secondary=pri.uri("replica"))
    assert sec.ctl("query-replication")["role"] == "secondary"


def test_seal_is_persisted_and_a_new_writer_session_voids_it(nodes: Nodes) -> None:
    pri, sec = start_pair(nodes)
    checkpoint(pri, sec)
    pri.ctl("replication-demote")
    assert sec.ctl("query-replication")["sealed"] == {"disk0": 0}
    with open(sec.disks[0] + ".state") as f:
        assert json.load(f)["sealed"] == {"disk0": 0}
    # A primary writing again (a new session of the same epoch) voids the seal.
    h = nbd.NBD()
    h.connect_uri(sec.uri("replica@0.99999999999999999999"))
    h.shutdown()
    assert sec.ctl("query-replication")["sealed"] == {}
    with pytest.raises(ControlError, match="cannot promote"):
        sec.ctl("replication-promote", secondary=pri.uri("replica"))
    # The seal export takes no untagged writer.
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(sec.uri("replica+seal"))


def test_force_promotion_takes_a_stopped_secondary_as_it_is(nodes: Nodes) -> None:
    """Pacemaker's agent promotes the pair's last primary after a restart (stage none) with
    force: its disk as it is, the next epoch; a replicating secondary is refused."""
    pri, sec = start_pair(nodes)
    write(pri, b"\x42" * 65536, 0)
    checkpoint(pri, sec)
    with pytest.raises(ControlError, match="cannot promote by force: stage running"):
        sec.ctl("replication-promote", secondary=pri.uri("replica"), force=True)
    pri.kill()
    sec.kill()
    alone = nodes.secondary(pri.disks[0], "again")       # the old primary's disk, unstarted
    alone.ctl("replication-promote", secondary=sec.uri("replica"), force=True)
    q = alone.ctl("query-replication")
    assert q["role"] == "primary" and q["epoch"] == 1
    write(alone, b"\x43" * 4096, 0)                       # it serves, alone for now
    assert read_file(pri.disks[0])[:8192] == b"\x43" * 4096 + b"\x42" * 4096
