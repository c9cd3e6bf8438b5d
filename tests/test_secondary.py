"""SecondaryReplica: the gate, copy-before-write, requests, opening, query, and a model check."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repdisk.block.device import EXTENT_HOLE
from repdisk.block.overlay import Overlay
from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError
from repdisk.replication.framework import Registry, ReplicationError, ReplicationMode
from repdisk.replication.secondary import Op, Route, SecondaryReplica, View, gate
from repdisk.replication.stage import Stage
from tests.helpers.replicas import make_replica, pattern, read

SECONDARY = ReplicationMode.SECONDARY
KiB = 1024


@pytest.fixture
def sec(tmp_path: Path):
    rep = make_replica(tmp_path, 64 * KiB, fill=pattern(64 * KiB))
    yield rep
    rep.close()


# -- the gate ------------------------------------------------------------------------------

REFUSED_EIO, REFUSED_EROFS = errno.EIO, errno.EROFS
NOT_STARTED = errno.ESHUTDOWN  # the replica view: the primary says "not started yet"
R, A = View.REPLICA, View.ACTIVE
GATE_TABLE = {
    # (view, op): {stage: route or errno}
    (R, Op.READ): {Stage.NONE: NOT_STARTED, Stage.RUNNING: Route.DISK, Stage.FAILOVER: Route.DISK,
                   Stage.FAILOVER_FAILED: REFUSED_EIO, Stage.DONE: Route.DISK},
    (R, Op.WRITE): {Stage.NONE: NOT_STARTED, Stage.RUNNING: Route.COPY_BEFORE_WRITE,
                    Stage.FAILOVER: REFUSED_EROFS, Stage.FAILOVER_FAILED: REFUSED_EROFS,
                    Stage.DONE: REFUSED_EROFS},
    (R, Op.FLUSH): {Stage.NONE: NOT_STARTED, Stage.RUNNING: Route.DISK,
                    Stage.FAILOVER: REFUSED_EROFS, Stage.FAILOVER_FAILED: REFUSED_EROFS,
                    Stage.DONE: REFUSED_EROFS},
    (A, Op.READ): {Stage.NONE: REFUSED_EIO, Stage.RUNNING: Route.ACTIVE,
                   Stage.FAILOVER: Route.ACTIVE, Stage.FAILOVER_FAILED: Route.ACTIVE,
                   Stage.DONE: Route.DISK},
    (A, Op.WRITE): {Stage.NONE: REFUSED_EIO, Stage.RUNNING: Route.ACTIVE,
                    Stage.FAILOVER: Route.ACTIVE, Stage.FAILOVER_FAILED: Route.SPLIT,
                    Stage.DONE: Route.DISK},
    (A, Op.FLUSH): {Stage.NONE: REFUSED_EIO, Stage.RUNNING: Route.ACTIVE,
                    Stage.FAILOVER: Route.ACTIVE, Stage.FAILOVER_FAILED: Route.SPLIT,
                    Stage.DONE: Route.DISK},
}


@pytest.mark.parametrize("view,op,stage", [(v, o, s) for (v, o) in GATE_TABLE for s in Stage])
def test_gate_table(view: View, op: Op, stage: Stage) -> None:
    want = GATE_TABLE[(view, op)][stage]
    if isinstance(want, Route):
        assert gate("d0", view, op, stage) is want
        return
    with pytest.raises(BlockIOError) as exc:
        gate("d0", view, op, stage)
    assert exc.value.errno == want
    if stage is Stage.NONE:
        assert "replication not started" in str(exc.value)
    if want == errno.EROFS:
        assert str(exc.value) == (f"replication of d0 is over (stage {stage.value}): "
                                  "refusing the old primary's write")


# -- requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("view", ["replica", "active"])
def test_empty_and_past_end_requests_are_refused(sec: SecondaryReplica, view: str) -> None:
    sec.start(SECONDARY)
    dev = getattr(sec, view + "_view")
    with pytest.raises(BlockIOError, match="invalid request length 0") as exc:
        dev.pwrite(b"", 0)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(BlockIOError, match="past the end of the 65536-byte disk") as exc:
        dev.pwrite(b"x" * 2, sec.size - 1)
    assert exc.value.errno == errno.ENOSPC
    with pytest.raises(BlockIOError, match="past the end") as exc:
        read(dev, sec.size - 10, 11)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(BlockIOError, match="invalid request length 0"):
        dev.zero(5, 0)
    assert read(sec.active_view) == pattern(sec.size)  # nothing was written


def test_copy_before_write_copies_each_cluster_once_per_interval(sec: SecondaryReplica) -> None:
    sec.start(SECONDARY)
    sec.checkpoint()
    cs, old = sec.cluster_size, pattern(sec.size)
    sec.replica_view.pwrite(b"\xaa" * 10, cs + 5)          # cluster 1
    sec.replica_view.pwrite(b"\xbb" * 10, cs + 100)        # cluster 1 again: no copy
    sec.replica_view.pwrite(b"\xcc" * (cs + 2), 3 * cs - 1)  # clusters 2, 3, 4
    q = sec.query()
    assert q["counters"]["cbw_bytes"] == 4 * cs
    assert q["counters"]["replica_writes"] == 3
    assert q["counters"]["replica_bytes"] == 10 + 10 + cs + 2
    assert q["hidden_bytes"] == 4 * cs and q["active_bytes"] == 0
    assert sec.hidden_overlay.allocated_clusters() == [1, 2, 3, 4]
    assert read(sec.active_view) == old                    # the VM still sees the checkpoint
    new = bytearray(old)
    new[cs + 5:cs + 15] = b"\xaa" * 10
    new[cs + 100:cs + 110] = b"\xbb" * 10
    new[3 * cs - 1:4 * cs + 1] = b"\xcc" * (cs + 2)
    assert read(sec.replica_view) == bytes(new)
    sec.checkpoint()                                  # new interval: copy again
    assert sec.query()["hidden_bytes"] == 0
    assert read(sec.active_view) == bytes(new)
    sec.replica_view.pwrite(b"\xdd", cs)
    assert sec.query()["counters"]["cbw_bytes"] == 5 * cs


def _resident_clusters(path: str, size: int, cluster_size: int) -> list[int]:
    """The clusters of the file with a page in the page cache (mincore of a mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    vec = ctypes.create_string_buffer(size // page)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        first = ctypes.c_char.from_buffer(m)  # a private mapping: the address of its start
        try:
            assert libc.mincore(ctypes.addressof(first), size, vec) == 0, \
                os.strerror(ctypes.get_errno())
        finally:
            del first  # the mapping cannot close while a ctypes object points into it
    return sorted({i * page // cluster_size for i, b in enumerate(vec.raw) if b & 1})


def test_a_record_written_whole_equals_its_pieces_written_one_by_one(tmp_path: Path) -> None:
    """write_record gives the disk, the hidden overlay and the counters exactly what
    replica_view.pwrite of each piece in turn gives: pieces that overlap (the later wins),
    two in one cluster (hidden keeps the checkpoint's bytes, not the first piece's), one
    across two clusters, one in a cluster hidden already holds, one in the short last
    cluster; and it is refused, changing nothing, outside RUNNING."""
    cs, size = 4 * KiB, 40 * KiB + 100
    pieces = [(5 * KiB, b"a" * 3000), (6 * KiB, b"b" * 10), (cs - 5, b"c" * 10),
              (20 * KiB + 7, b"d" * 50), (20 * KiB + 3000, b"e" * 600), (size - 60, b"f" * 60),
              (12 * KiB, b"g" * 4)]
    whole = make_replica(tmp_path, size, cs, fill=pattern(size), name="whole")
    one_by_one = make_replica(tmp_path, size, cs, fill=pattern(size), name="one")
    try:
        with pytest.raises(BlockIOError) as info:
            whole.write_record([(0, b"x")])
        assert info.value.errno == NOT_STARTED
        for rep in (whole, one_by_one):
            rep.start(SECONDARY)
            rep.checkpoint()
            rep.replica_view.pwrite(b"h" * 100, 12 * KiB + 10)  # cluster 3 is in hidden now
        whole.write_record([(o, memoryview(b)) for o, b in pieces])
        for offset, buf in pieces:
            one_by_one.replica_view.pwrite(buf, offset)
        assert read(whole.disk) == read(one_by_one.disk) != pattern(size)
        assert whole.hidden_overlay.allocated_clusters() == \
            one_by_one.hidden_overlay.allocated_clusters() == [0, 1, 3, 5, 10]
        assert read(whole.hidden_overlay) == read(one_by_one.hidden_overlay)
        assert read(whole.hidden_overlay, 5 * KiB, 10) == pattern(size)[5 * KiB:5 * KiB + 10]
        assert whole.query()["counters"] == one_by_one.query()["counters"]
        whole.stop(failover=True)
        before = read(whole.disk)
        with pytest.raises(BlockIOError) as info:
            whole.write_record([(0, b"x")])
        assert info.value.errno == errno.EROFS and read(whole.disk) == before
    finally:
        whole.close()
        one_by_one.close()


def test_prefetch_starts_reading_exactly_the_clusters_to_copy(tmp_path: Path) -> None:
    """prefetch() reads into the page cache the disk clusters the given writes will copy
    before writing (not those already in hidden), changes nothing, and does nothing
    before start."""
    cs, size = 64 * KiB, 1024 * KiB
    sec = make_replica(tmp_path, size, cluster_size=cs, fill=pattern(size))
    try:
        path = str(tmp_path / "disk0.img")

        def evict() -> None:
            os.fsync(sec.disk.fd)
            os.posix_fadvise(sec.disk.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert _resident_clusters(path, size, cs) == []

        wanted = [(cs + 5, 10), (2 * cs, 100), (5 * cs - 1, 2), (9 * cs, cs)]
        evict()
        assert sec.prefetch(wanted) == []        # not started: no hint
        assert _resident_clusters(path, size, cs) == []
        sec.start(SECONDARY)
        sec.checkpoint()
        sec.replica_view.pwrite(b"\xaa", 2 * cs)      # cluster 2 is in hidden now
        evict()
        assert sec.prefetch(wanted) == [(1, 1), (4, 2), (9, 1)]     # the runs to copy
        deadline = time.monotonic() + 10
        while _resident_clusters(path, size, cs) != [1, 4, 5, 9]:
            assert time.monotonic() < deadline, _resident_clusters(path, size, cs)
            time.sleep(0.01)
        assert sec.hidden_overlay.allocated_clusters() == [2]
        expected = bytearray(pattern(size))
        expected[2 * cs] = 0xAA
        assert read(sec.replica_view) == bytes(expected)
    finally:
        sec.close()


def test_replica_zero_and_trim_keep_the_checkpoint_for_the_vm(sec: SecondaryReplica) -> None:
    sec.start(SECONDARY)
    cs, old = sec.cluster_size, pattern(sec.size)
    sec.replica_view.zero(cs - 7, 2 * cs)
    sec.replica_view.trim(5 * cs, 3 * cs)
    assert read(sec.active_view) == old
    got = read(sec.replica_view)
    assert got[cs - 7:3 * cs - 7] == bytes(2 * cs)
    assert got[:cs - 7] == old[:cs - 7]
    assert got[3 * cs - 7:5 * cs] == old[3 * cs - 7:5 * cs]
    assert got[8 * cs:] == old[8 * cs:]  # trimmed bytes are unspecified, the rest is not
    assert sec.hidden_overlay.allocated_clusters() == [0, 1, 2, 5, 6, 7]


def test_unaligned_vm_writes_and_zeroes_read_back(sec: SecondaryReplica) -> None:
    sec.start(SECONDARY)
    cs = sec.cluster_size
    want = bytearray(pattern(sec.size))
    sec.active_view.pwrite(b"\x33" * 3000, cs - 1000)
    want[cs - 1000:cs + 2000] = b"\x33" * 3000
    sec.active_view.zero(6 * cs + 1, cs)
    want[6 * cs + 1:7 * cs + 1] = bytes(cs)
    assert read(sec.active_view) == bytes(want)
    assert read(sec.replica_view) == pattern(sec.size)     # the VM's writes stay in active
    assert sec.active_overlay.allocated_clusters() == [0, 1, 6, 7]
    assert sec.query()["counters"]["active_writes"] == 2


def test_image_error_during_replica_write_is_recorded(sec: SecondaryReplica) -> None:
    """A read-only disk makes RawImage.pwrite fail for real (EROFS); the primary sees EIO."""
    sec.start(SECONDARY)
    sec.get_error()
    sec.disk.readonly = True
    with pytest.raises(BlockIOError) as exc:
        sec.replica_view.pwrite(b"x", 0)
    assert exc.value.errno == errno.EIO
    assert "disk0: replica pwrite of 1 bytes at 0 failed" in str(exc.value)
    with pytest.raises(ReplicationError, match="replica pwrite of 1 bytes at 0 failed.*read-only"):
        sec.get_error()
    assert sec.query()["error"] == sec.error
    sec.disk.readonly = False
    sec.checkpoint()
    with pytest.raises(ReplicationError):
        sec.get_error()                                # an error stays until start/failover


def test_image_error_during_a_record_is_recorded(sec: SecondaryReplica) -> None:
    """The same for a batch record written whole: EIO naming the record, the error kept."""
    sec.start(SECONDARY)
    sec.disk.readonly = True
    with pytest.raises(BlockIOError) as exc:
        sec.write_record([(4096, b"x"), (0, b"y")])
    assert exc.value.errno == errno.EIO
    assert "disk0: replica record of 2 pieces at 4096 failed" in str(exc.value)
    with pytest.raises(ReplicationError, match="replica record of 2 pieces at 4096 failed.*"
                                               "read-only"):
        sec.get_error()


def test_flush_follows_the_gate(sec: SecondaryReplica) -> None:
    with pytest.raises(BlockIOError, match="replication not started"):
        sec.replica_view.flush()
    sec.start(SECONDARY)
    sec.replica_view.flush()
    sec.active_view.flush()
    sec.stop(False)
    sec.active_view.flush()
    with pytest.raises(BlockIOError, match="refusing the old primary's write") as exc:
        sec.replica_view.flush()
    assert exc.value.errno == errno.EROFS


def test_extents_of_the_views(sec: SecondaryReplica) -> None:
    sec.start(SECONDARY)
    cs = sec.cluster_size
    sec.active_view.pwrite(b"x", 2 * cs)
    ext = sec.active_view.extents(0, sec.size)
    assert ext[0][0] == 0 and sum(length for _, length, _ in ext) == sec.size
    assert all(flags == 0 for off, length, flags in ext if off <= 2 * cs < off + length)
    assert sum(length for _, length, _ in sec.replica_view.extents(cs, cs)) == cs


def test_failover_reports_progress_and_bytes(sec: SecondaryReplica) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    sec.sm.events = lambda name, data: events.append((name, data))
    sec.start(SECONDARY)
    sec.checkpoint()
    cs = sec.cluster_size
    sec.replica_view.pwrite(b"\x22" * (3 * cs), 0)        # hidden: clusters 0-2
    sec.active_view.pwrite(b"\x33" * 10, 2 * cs + 1)      # active: cluster 2
    sec.active_view.pwrite(b"\x33" * 10, 9 * cs)          # active: cluster 9
    calls: list[tuple[int, int]] = []
    sec.stop(True, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (4 * cs, 4 * cs)   # the last run: hidden's 0-2 and 9
    assert all(done <= total for done, total in calls)
    assert events[-1][0] == "FAILOVER_COMPLETED" and events[-1][1]["bytes"] == 4 * cs
    want = bytearray(pattern(sec.size))
    want[2 * cs + 1:2 * cs + 11] = b"\x33" * 10
    want[9 * cs:9 * cs + 10] = b"\x33" * 10
    assert read(sec.active_view) == bytes(want) == read(sec.replica_view)


def test_reopened_as_done_with_buffered_overlays_commits_them_as_a_failover_does(
        tmp_path: Path) -> None:
    """A failover's winner reopened as done whose overlays still hold clusters (its node
    crashed after the state said the failover was over, before the overlays' emptying was
    durable): reopen_done commits them first, giving the disk a failover gives, not the
    disk with the primary's writes after the checkpoint still in it."""
    rep = make_replica(tmp_path, 64 * KiB, fill=pattern(64 * KiB))
    cs = rep.cluster_size
    rep.start(SECONDARY)
    rep.checkpoint()
    rep.replica_view.pwrite(b"\x22" * (3 * cs), 0)       # after the checkpoint: rolled back
    rep.active_view.pwrite(b"\x33" * 10, 9 * cs)         # the secondary VM's: kept
    assert rep.begin_failover()                         # overlays durable, not committed
    rep.close()
    again = SecondaryReplica.open("disk0", str(tmp_path / "disk0.img"), cluster_size=cs)
    again.reopen_done()
    want = bytearray(pattern(64 * KiB))
    want[9 * cs:9 * cs + 10] = b"\x33" * 10
    assert (again.stage, again.consistent) == (Stage.DONE, True)
    assert (again.active_overlay.allocated_bytes, again.hidden_overlay.allocated_bytes) == (0, 0)
    assert read(again.active_view) == bytes(want)
    again.close()


# -- opening, query, framework ---------------------------------------------------------------

def test_open_creates_overlays_then_validates_them(tmp_path: Path) -> None:
    rep = make_replica(tmp_path, 64 * KiB, fill=pattern(64 * KiB))
    disk = str(tmp_path / "disk0.img")
    for suffix in (".hidden", ".hidden.bitmap", ".active", ".active.bitmap"):
        assert os.path.exists(disk + suffix)
    rep.start(SECONDARY)
    rep.active_view.pwrite(b"\x44" * 100, 50)
    rep.close()
    again = SecondaryReplica.open("disk0", disk, cluster_size=4 * KiB)
    assert again.active_overlay.allocated_clusters() == [0]  # present overlays are reused
    assert again.stage is Stage.NONE                         # the stage is not persisted
    again.close()
    with pytest.raises(BlockIOError, match="cluster size is 4096 but 8192 was asked for"):
        SecondaryReplica.open("disk0", disk, cluster_size=8 * KiB)
    other = str(tmp_path / "other.img")
    RawImage.create(other, 32 * KiB).close()
    with pytest.raises(BlockIOError, match="made for a 65536-byte disk"):
        SecondaryReplica.open("disk0", other, hidden_path=disk + ".hidden", cluster_size=4 * KiB)


def test_overlays_with_different_cluster_sizes_are_refused(tmp_path: Path) -> None:
    disk = RawImage.create(tmp_path / "d", 64 * KiB)
    hidden = Overlay.create(tmp_path / "h", disk, cluster_size=4 * KiB)
    active = Overlay.create(tmp_path / "a", hidden, cluster_size=8 * KiB)
    with pytest.raises(ReplicationError, match="cluster size 8192 differs .* 4096"):
        SecondaryReplica("d", disk, hidden, active)
    for image in (active, hidden, disk):
        image.close()


def test_query_is_json_and_tracks_checkpoints(sec: SecondaryReplica) -> None:
    q = sec.query()
    assert q == {"disk": "disk0", "mode": "secondary", "stage": "none", "error": None,
                 "consistent": False, "hidden_bytes": 0, "active_bytes": 0,
                 "counters": {"replica_writes": 0, "replica_bytes": 0, "cbw_bytes": 0,
                              "active_writes": 0, "checkpoints": 0},
                 "last_checkpoint": None, "fast_path": None}  # no filter in this process
    sec.start(SECONDARY)
    sec.checkpoint()
    q = json.loads(json.dumps(sec.query()))
    assert q["stage"] == "running" and q["consistent"] is True
    assert q["counters"]["checkpoints"] == 1
    assert set(q["last_checkpoint"]) == {"time", "duration"}
    assert q["last_checkpoint"]["duration"] >= 0 and q["last_checkpoint"]["time"] > 1e9


def test_registered_replica_follows_the_all_calls(tmp_path: Path) -> None:
    reg = Registry()
    a = make_replica(tmp_path, 16 * KiB, name="a")
    b = make_replica(tmp_path, 16 * KiB, name="b")
    rs_a, rs_b = a.register(reg), b.register(reg)
    assert reg.states() == [rs_b, rs_a] and rs_a.opaque is a
    with pytest.raises(ReplicationError,
                       match="^b: replication is not running"):
        reg.get_error_all()
    reg.start_all(SECONDARY)
    reg.do_checkpoint_all()
    reg.get_error_all()
    assert a.consistent and b.consistent
    reg.stop_all(True)
    assert a.stage is Stage.DONE and b.stage is Stage.DONE
    other = Registry()
    c = make_replica(tmp_path, 16 * KiB, name="c")
    c.register(other)
    with pytest.raises(ReplicationError, match="^c: start failed: the start mode primary"):
        other.start_all(ReplicationMode.PRIMARY)
    c.close()
    a.close()
    b.close()


# -- model check -----------------------------------------------------------------------------

SMALL, SMALL_CS = 256 * KiB, 4 * KiB


@st.composite
def requests(draw: st.DrawFn, kind: str) -> tuple[Any, ...]:
    offset = draw(st.integers(0, SMALL - 1))
    length = draw(st.integers(1, min(3 * SMALL_CS, SMALL - offset)))
    return (kind, offset, length, draw(st.integers(1, 255)))


OPS = st.lists(st.one_of(requests("primary-write"), requests("primary-zero"),
                         requests("primary-trim"), requests("vm-write"), requests("vm-zero"),
                         st.just(("checkpoint",)), st.just(("failover",)), st.just(("stop",))),
               max_size=30)


class Model:
    """What the two views must show: ``disk`` (the replica view) and ``vm`` (the active view).

    ``vm`` is the disk at the last checkpoint plus the VM's writes, which is exactly what a
    failover makes the disk; a checkpoint makes it the disk again.
    """

    def __init__(self, initial: bytes) -> None:
        self.disk = bytearray(initial)
        self.vm = bytearray(initial)
        self.stage = Stage.RUNNING
        self.consistent = False

    def apply(self, sec: SecondaryReplica, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind in ("primary-write", "primary-zero", "primary-trim", "vm-write", "vm-zero"):
            self._request(sec, *op)
        elif kind == "checkpoint":
            sec.checkpoint()
            if self.stage is Stage.RUNNING:
                self.vm[:] = self.disk
                self.consistent = True
        elif kind == "stop":
            sec.stop(False)
            if self.stage is Stage.RUNNING:
                self.vm[:] = self.disk
                self.stage, self.consistent = Stage.DONE, True
        elif self.stage is Stage.RUNNING and not self.consistent:
            with pytest.raises(ReplicationError, match="no complete checkpoint"):
                sec.stop(True)
        else:
            sec.stop(True)
            if self.stage is Stage.RUNNING:
                self.disk[:] = self.vm
                self.stage = Stage.DONE

    def _request(self, sec: SecondaryReplica, kind: str, offset: int, length: int,
                 byte: int) -> None:
        data = bytes([byte]) * length if kind.endswith("write") else bytes(length)
        if kind.startswith("primary"):
            dev, targets = sec.replica_view, [self.disk]
            if self.stage is Stage.DONE:
                with pytest.raises(BlockIOError, match="refusing the old primary's write"):
                    dev.pwrite(data, offset)
                return
        else:
            dev = sec.active_view
            targets = [self.vm] if self.stage is Stage.RUNNING else [self.vm, self.disk]
        if kind.endswith("write"):
            dev.pwrite(data, offset)
        elif kind.endswith("trim"):
            dev.trim(offset, length)  # the disk punches a hole: reads zeros
        else:
            dev.zero(offset, length)
        for target in targets:
            target[offset:offset + length] = data


def hole_clusters(image: RawImage) -> set[int]:
    """Clusters of SMALL_CS bytes that lie wholly in holes of ``image``."""
    return {c for off, n, flags in image.extents(0, image.size) if flags & EXTENT_HOLE
            for c in range(-(-off // SMALL_CS), (off + n) // SMALL_CS)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_views_match_the_model(ops: list[tuple[Any, ...]]) -> None:
    """... and a copy-before-write of a cluster that is a hole on the disk leaves a hole
    in the hidden overlay's data file (the disk's second half starts as holes, and zeros
    and trims make more)."""
    initial = pattern(SMALL // 2, seed=13) + bytes(SMALL // 2)
    with tempfile.TemporaryDirectory() as tmp:
        sec = make_replica(tmp, SMALL, SMALL_CS, fill=initial[:SMALL // 2])
        try:
            sec.start(SECONDARY)
            model = Model(initial)
            for op in ops:
                holes = hole_clusters(sec.disk)
                copied = set(sec.hidden_overlay.allocated_clusters())
                model.apply(sec, op)
                new = set(sec.hidden_overlay.allocated_clusters()) - copied
                assert not (new & holes) - hole_clusters(sec.hidden_overlay._data), op
                assert sec.stage is model.stage and sec.consistent is model.consistent
                assert read(sec.active_view) == model.vm, op
                assert read(sec.replica_view) == model.disk, op
            with open(os.path.join(tmp, "disk0.img"), "rb") as f:
                on_disk = f.read()
            if model.stage is Stage.DONE:
                assert on_disk == model.disk     # the file itself, after the commit
        finally:
            sec.close()


def test_failover_without_a_callback_reports_progress_as_events(tmp_path: Path) -> None:
    """A node's failover (through the framework, which passes no callback) is followed by
    FAILOVER_PROGRESS events, so `repdisk ctl` can show it; the last one is complete."""
    seen: list[tuple[str, dict[str, Any]]] = []
    path = os.path.join(tmp_path, "d.img")
    with RawImage.create(path, 64 * KiB) as disk:
        disk.pwrite(b"\x11" * (64 * KiB), 0)
    sec = SecondaryReplica.open("d", path, cluster_size=4 * KiB,
                                events=lambda n, d: seen.append((n, d)))
    try:
        sec.start(SECONDARY)
        sec.checkpoint()
        sec.replica_view.pwrite(b"\x22" * (8 * KiB), 0)
        sec.active_view.pwrite(b"\x33" * (4 * KiB), 32 * KiB)
        sec.ops().stop(None, True)  # type: ignore[arg-type]
        progress = [d for n, d in seen if n == "FAILOVER_PROGRESS"]
        assert progress and all(p["disk"] == "d" for p in progress)
        assert progress[-1]["done"] == progress[-1]["total"] > 0
        assert read(sec.active_view) == (b"\x11" * (32 * KiB) + b"\x33" * (4 * KiB)
                                         + b"\x11" * (28 * KiB))
    finally:
        sec.close()


def test_a_start_in_the_other_mode_names_the_mode_even_once_running(
        sec: SecondaryReplica) -> None:
    """`start mode=primary` sent to a running secondary is refused as the wrong node, not
    as "started already" (which hid that the operator had the wrong socket)."""
    sec.start(SECONDARY)
    with pytest.raises(ReplicationError, match="the start mode primary does not match this "
                                               "disk's mode secondary"):
        sec.start(ReplicationMode.PRIMARY)
    assert sec.stage is Stage.RUNNING
