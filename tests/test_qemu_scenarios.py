"""QEMU's tests/unit/test-replication.c, secondary side, as exact byte checks; plus what it lacks.

64 MiB images, the secondary disk pre-filled with 0x11, 64 KiB clusters, every byte of the
range compared.  The primary-side scenarios (1 and 2) belong to the primary's tests.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from repdisk.block.overlay import Overlay
from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError
from repdisk.replication.framework import ReplicationError, ReplicationMode
from repdisk.replication.secondary import SecondaryReplica
from repdisk.replication.stage import Stage
from tests.helpers.replicas import make_replica, read

MiB = 1 << 20
SIZE, HALF = 64 * MiB, 32 * MiB
SECONDARY, PRIMARY = ReplicationMode.SECONDARY, ReplicationMode.PRIMARY


@pytest.fixture
def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
def sec(tmp_path: Path, events: list) -> SecondaryReplica:
    rep = make_replica(tmp_path, SIZE, 64 * 1024, fill=b"\x11" * SIZE, events=events)
    yield rep
    rep.close()


def expect(dev: Any, offset: int, length: int, byte: bytes) -> None:
    assert read(dev, offset, length) == byte * length


def disk_file(tmp_path: Path) -> bytes:
    """The secondary disk's file itself, read past every repdisk object."""
    return (tmp_path / "disk0.img").read_bytes()


def primary_writes_upper_half(sec: SecondaryReplica) -> None:
    """Scenario 4's primary write of 0x22 to [32M, 64M), as the NBD server hands it over."""
    sec.replica_view.pwrite(b"\x22" * HALF, HALF)


# Scenarios 1 and 2 are the primary's: tests/test_primary.py (repdisk's primary serves the
# guest in every stage, so "not started" means "writes are dirty", not "I/O fails").


def test_3_secondary_not_started_refuses_io(sec: SecondaryReplica) -> None:
    for dev, code in ((sec.active_view, errno.EIO), (sec.replica_view, errno.ESHUTDOWN)):
        with pytest.raises(BlockIOError, match="replication not started") as exc:
            read(dev, 0, 4096)
        assert exc.value.errno == code
        with pytest.raises(BlockIOError, match="replication not started") as exc:
            dev.pwrite(b"\x22" * 4096, 0)
        assert exc.value.errno == code
    assert sec.stage is Stage.NONE


def scenario_4(sec: SecondaryReplica, checkpoint_first: bool = False) -> None:
    sec.start(SECONDARY)
    if checkpoint_first:
        sec.checkpoint()
    expect(sec.active_view, 0, SIZE, b"\x11")
    primary_writes_upper_half(sec)
    expect(sec.replica_view, HALF, HALF, b"\x22")
    expect(sec.active_view, HALF, HALF, b"\x11")   # old data was copied into hidden
    sec.active_view.pwrite(b"\x33" * HALF, 0)
    expect(sec.active_view, 0, HALF, b"\x33")
    expect(sec.active_view, HALF, HALF, b"\x11")
    expect(sec.replica_view, 0, HALF, b"\x11")     # the VM's writes stay off the disk


def test_4_secondary_started(sec: SecondaryReplica) -> None:
    scenario_4(sec)
    assert sec.query()["hidden_bytes"] == HALF and sec.query()["active_bytes"] == HALF


def failover_5(sec: SecondaryReplica, tmp_path: Path) -> None:
    """Scenario 5.  repdisk refuses to fail over before the first checkpoint after start
    (QEMU's start checkpoints at once), so one is taken before the primary's write."""
    scenario_4(sec, checkpoint_first=True)
    sec.stop(True)
    assert sec.stage is Stage.DONE
    expect(sec.active_view, 0, HALF, b"\x33")
    expect(sec.active_view, HALF, HALF, b"\x11")   # upstream expects 0x22 here (its bug)
    on_disk = disk_file(tmp_path)
    assert on_disk == b"\x33" * HALF + b"\x11" * HALF


def test_5_failover(sec: SecondaryReplica, tmp_path: Path) -> None:
    failover_5(sec, tmp_path)
    assert sec.query()["hidden_bytes"] == 0 and sec.query()["active_bytes"] == 0
    sec.get_error()


def test_6_continuous_replication_after_failover(sec: SecondaryReplica, tmp_path: Path) -> None:
    failover_5(sec, tmp_path)
    sec.start(PRIMARY)                         # ignored in DONE
    sec.checkpoint()
    sec.stop(True)
    assert sec.stage is Stage.DONE
    expect(sec.active_view, 0, HALF, b"\x33")
    expect(sec.active_view, HALF, HALF, b"\x11")
    assert disk_file(tmp_path) == b"\x33" * HALF + b"\x11" * HALF


def test_7_checkpoint_drops_the_hidden_buffer(sec: SecondaryReplica) -> None:
    sec.start(SECONDARY)
    primary_writes_upper_half(sec)
    expect(sec.active_view, HALF, HALF, b"\x11")
    sec.checkpoint()
    expect(sec.active_view, HALF, HALF, b"\x22")
    expect(sec.active_view, 0, HALF, b"\x11")


def test_8_get_error_after_start(sec: SecondaryReplica) -> None:
    sec.start(SECONDARY)
    sec.get_error()


# -- what upstream lacks -------------------------------------------------------------------------

def test_mode_mismatch_is_refused(sec: SecondaryReplica) -> None:
    with pytest.raises(ReplicationError, match="start mode primary does not match .* secondary"):
        sec.start(PRIMARY)
    assert sec.stage is Stage.NONE


def test_second_start_is_refused(sec: SecondaryReplica) -> None:
    sec.start(SECONDARY)
    with pytest.raises(ReplicationError, match="running or done .*stage running"):
        sec.start(SECONDARY)
    assert sec.stage is Stage.RUNNING


def test_checkpoint_and_get_error_before_start_are_refused(sec: SecondaryReplica) -> None:
    with pytest.raises(ReplicationError, match="cannot checkpoint: replication is not running"):
        sec.checkpoint()
    with pytest.raises(ReplicationError, match="disk0: replication is not running"):
        sec.get_error()
    with pytest.raises(ReplicationError, match="cannot stop: replication is not running"):
        sec.stop(False)


@pytest.mark.parametrize("short", ["disk", "hidden", "active"])
def test_unequal_lengths_are_refused(tmp_path: Path, short: str) -> None:
    """An overlay made for another (shorter) disk; the message names all three lengths."""
    big = RawImage.create(tmp_path / "big", 2 * MiB)
    small = RawImage.create(tmp_path / "small", MiB)
    disk = small if short == "disk" else big
    hidden = Overlay.create(tmp_path / "h", small if short == "hidden" else big)
    active_backing = {"active": small, "hidden": big}.get(short, hidden)
    active = Overlay.create(tmp_path / "a", active_backing)
    sizes = {"disk": (2 * MiB, 2 * MiB, MiB), "hidden": (2 * MiB, MiB, 2 * MiB),
             "active": (MiB, 2 * MiB, 2 * MiB)}[short]
    rep = SecondaryReplica("d", disk, hidden, active)
    with pytest.raises(ReplicationError) as exc:
        rep.start(SECONDARY)
    assert str(exc.value) == ("d: active disk, hidden disk, secondary disk's length are not the "
                              "same ({}, {}, {} bytes); recreate the overlays for this "
                              "disk".format(*sizes))
    assert rep.stage is Stage.NONE
    for image in (active, hidden, big, small):
        image.close()


def test_broken_chain_is_refused(tmp_path: Path) -> None:
    disk = RawImage.create(tmp_path / "d", MiB)
    hidden = Overlay.create(tmp_path / "h", disk)
    active = Overlay.create(tmp_path / "a", disk)   # skips hidden
    rep = SecondaryReplica("d", disk, hidden, active)
    with pytest.raises(ReplicationError, match="chain must be active -> hidden -> disk"):
        rep.start(SECONDARY)
    assert rep.stage is Stage.NONE
    rep.close()


def test_stop_without_failover_checkpoints_and_ends_done(sec: SecondaryReplica,
                                                         tmp_path: Path) -> None:
    scenario_4(sec)
    sec.stop(False)
    assert sec.stage is Stage.DONE and sec.consistent
    # The checkpoint kept the primary's writes and dropped the VM's; the VM now uses the disk.
    expect(sec.active_view, 0, HALF, b"\x11")
    expect(sec.active_view, HALF, HALF, b"\x22")
    assert disk_file(tmp_path) == b"\x11" * HALF + b"\x22" * HALF
    sec.active_view.pwrite(b"\x44" * 4096, 0)
    assert disk_file(tmp_path)[:8192] == b"\x44" * 4096 + b"\x11" * 4096


def test_failover_of_an_inconsistent_secondary_is_refused(sec: SecondaryReplica) -> None:
    scenario_4(sec)
    with pytest.raises(ReplicationError, match="no complete checkpoint since it started .*"
                                               "inconsistent disk"):
        sec.stop(True)
    assert sec.stage is Stage.RUNNING
    expect(sec.active_view, HALF, HALF, b"\x11")      # nothing was committed
    sec.checkpoint()
    sec.stop(True)
    assert sec.stage is Stage.DONE
    expect(sec.active_view, 0, SIZE // 2, b"\x11")    # the checkpoint had dropped the VM's writes
    expect(sec.active_view, HALF, HALF, b"\x22")


def test_primary_write_after_failover_is_fenced(sec: SecondaryReplica, tmp_path: Path) -> None:
    failover_5(sec, tmp_path)
    with pytest.raises(BlockIOError) as exc:
        sec.replica_view.pwrite(b"\x55" * 512, 0)
    assert exc.value.errno == errno.EROFS
    assert str(exc.value) == ("replication of disk0 is over (stage done): "
                              "refusing the old primary's write")
    with pytest.raises(BlockIOError, match="refusing the old primary's write"):
        sec.replica_view.zero(0, 512)
    expect(sec.replica_view, 0, HALF, b"\x33")         # replica reads still work (compare tools)


def test_failed_commit_splits_writes_by_allocation(tmp_path: Path,
                                                   events: list) -> None:
    """Make the commit into the disk fail for real by flipping the disk's read-only flag
    (RawImage's own EROFS path, the same as opening it read-only), then check the
    FAILOVER_FAILED routing byte for byte, in the views and in the disk file."""
    cs, size = 4096, 16 * 4096
    sec = make_replica(tmp_path, size, cs, fill=b"\x11" * size, events=events)
    try:
        sec.start(SECONDARY)
        sec.checkpoint()
        sec.replica_view.pwrite(b"\xaa" * cs, 2 * cs)     # hidden: cluster 2 (old 0x11)
        sec.active_view.pwrite(b"\xbb" * cs, 5 * cs)      # active: cluster 5
        sec.disk.readonly = True
        with pytest.raises(ReplicationError, match="failover commit failed: .*read-only"):
            sec.stop(True)
        assert sec.stage is Stage.FAILOVER_FAILED
        with pytest.raises(ReplicationError, match="failover commit failed"):
            sec.get_error()
        assert [n for n, _ in events][-3:] == ["REPLICATION_STAGE_CHANGED",
                                               "REPLICATION_STAGE_CHANGED", "REPLICATION_ERROR"]
        assert events[-2][1]["to"] == "failover-failed"
        # active went into hidden; hidden could not go into the disk.
        assert sec.active_overlay.allocated_clusters() == []
        assert sec.hidden_overlay.allocated_clusters() == [2, 5]
        sec.disk.readonly = False                    # the disk is writable again
        lo, hi = cs + 100, 6 * cs + 50
        sec.active_view.pwrite(b"\xcc" * (hi - lo), lo)
        assert sec.active_overlay.allocated_clusters() == [2, 5]
        view = bytearray(b"\x11" * size)
        view[5 * cs:6 * cs] = b"\xbb" * cs
        view[lo:hi] = b"\xcc" * (hi - lo)
        assert read(sec.active_view) == bytes(view)
        disk = bytearray(b"\x11" * size)
        disk[2 * cs:3 * cs] = b"\xaa" * cs
        for first, last in ((lo, 2 * cs), (3 * cs, 5 * cs), (6 * cs, hi)):
            disk[first:last] = b"\xcc" * (last - first)
        assert disk_file(tmp_path) == bytes(disk)
        # Terminal: every transition is refused, the primary is fenced, replica reads refused.
        for call in (sec.checkpoint, lambda: sec.stop(True), lambda: sec.start(SECONDARY)):
            with pytest.raises(ReplicationError, match="failover-failed"):
                call()
        with pytest.raises(BlockIOError, match="stage failover-failed"):
            sec.replica_view.pwrite(b"x", 0)
        with pytest.raises(BlockIOError, match="half committed"):
            read(sec.replica_view, 0, 1)
    finally:
        sec.close()


def test_stage_events_of_start_checkpoint_failover(sec: SecondaryReplica, events: list) -> None:
    sec.start(SECONDARY)
    sec.checkpoint()
    sec.active_view.pwrite(b"\x33" * 100, 10)
    sec.replica_view.pwrite(b"\x22" * 100, HALF)
    sec.stop(True)
    names = [n for n, _ in events]
    assert names == ["REPLICATION_STAGE_CHANGED", "CHECKPOINT_COMPLETED",
                     "REPLICATION_STAGE_CHANGED", "REPLICATION_STAGE_CHANGED",
                     "FAILOVER_COMPLETED"]
    changes = [(d["disk"], d["mode"], d["from"], d["to"]) for n, d in events
               if n == "REPLICATION_STAGE_CHANGED"]
    assert changes == [("disk0", "secondary", "none", "running"),
                       ("disk0", "secondary", "running", "failover"),
                       ("disk0", "secondary", "failover", "done")]
    ck, fo = events[1][1], events[4][1]
    assert set(ck) == {"disk", "mode", "duration"} and ck["disk"] == "disk0" and ck["duration"] >= 0
    assert set(fo) == {"disk", "duration", "bytes"} and fo["disk"] == "disk0"
    assert fo["bytes"] == 2 * 64 * 1024            # one cluster from active, one from hidden
