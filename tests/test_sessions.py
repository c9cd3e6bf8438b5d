"""Writer sessions: a secondary fences stale primaries and superseded connections."""

from __future__ import annotations

import errno
import threading
import time

import nbd
import pytest

from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError
from repdisk.replication.sessions import SessionFence, SessionView, make_tag, split_tag
from tests.helpers.nodes import MiB, Nodes, make_disk


def test_tags_parse_and_bad_tags_are_refused() -> None:
    assert split_tag("replica") == ("replica", None)
    assert split_tag("replica/root" + make_tag(3, 17)) == ("replica/root", (3, 17))
    with pytest.raises(BlockIOError) as info:
        split_tag("replica@three")
    assert info.value.errno == errno.EINVAL and "EPOCH.GENERATION" in str(info.value)


def test_a_newer_session_fences_the_older_and_an_older_epoch_is_refused(tmp_path) -> None:
    with RawImage.create(str(tmp_path / "d.img"), MiB) as disk:
        fence = SessionFence("d")
        fence.admit((1, 10), node_epoch=1)
        old = SessionView(disk, fence, (1, 10))
        old.pwrite(b"a" * 512, 0)
        fence.admit((1, 11), node_epoch=1)
        new = SessionView(disk, fence, (1, 11))
        with pytest.raises(BlockIOError) as info:
            old.pwrite(b"b" * 512, 0)
        assert info.value.errno == errno.EPERM and "superseded" in str(info.value)
        new.pwrite(b"c" * 512, 512)
        buf = bytearray(1024)
        disk.pread_into(memoryview(buf), 0)
        assert buf == b"a" * 512 + b"c" * 512
        with pytest.raises(BlockIOError, match="newer primary session"):
            fence.admit((1, 9), node_epoch=1)
        with pytest.raises(BlockIOError, match="refusing a primary of epoch 0: this node is "
                                               "in epoch 1"):
            fence.admit((0, 99), node_epoch=1)


class _SlowDisk:
    """A device whose writes wait for a signal: a write of an old session still under way."""

    size = MiB

    def __init__(self) -> None:
        self.started, self.go = threading.Event(), threading.Event()
        self.log: list[str] = []

    def pwrite(self, buf, offset, fua=False) -> None:
        self.started.set()
        self.go.wait(5)
        self.log.append("old write done")

    def pread_into(self, buf, offset) -> None: ...
    def extents(self, offset, length): return []


def test_admission_waits_for_the_older_sessions_write_in_progress() -> None:
    disk, fence = _SlowDisk(), SessionFence("d")
    fence.admit((0, 1), 0)
    writer = threading.Thread(target=SessionView(disk, fence, (0, 1)).pwrite, args=(b"x", 0))
    writer.start()
    assert disk.started.wait(5)
    admitted = threading.Thread(target=lambda: (fence.admit((0, 2), 0),
                                                disk.log.append("newer admitted")))
    admitted.start()
    time.sleep(0.2)
    assert disk.log == []  # the admission is waiting for the old write
    disk.go.set()
    writer.join(5)
    admitted.join(5)
    assert disk.log == ["old write done", "newer admitted"]


def _connect(node, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(node.listen.socket)
    return h


def test_through_a_node_a_stale_connection_cannot_write_and_an_old_epoch_cannot_connect(
        tmp_path, nodes: Nodes) -> None:
    sec = nodes.secondary(make_disk(str(tmp_path / "s.img"), 16 * MiB))
    sec.ctl("replication-start", mode="secondary")
    old = _connect(sec, "replica@0.1")
    old.pwrite(b"\x01" * 4096, 0)
    new = _connect(sec, "replica@0.2")
    with pytest.raises(nbd.Error) as info:
        old.pwrite(b"\x02" * 4096, 0)
    assert info.value.errno == "EPERM"  # libnbd names the errno
    new.pwrite(b"\x03" * 4096, 4096)
    assert sec.client("replica").pread(8192, 0) == b"\x01" * 4096 + b"\x03" * 4096
    sec.ctl("replication-do-checkpoint")
    sec.ctl("replication-stop", failover=True)  # epoch 1 now
    with pytest.raises(nbd.Error):
        _connect(sec, "replica@0.3")
    assert "refusing a primary of epoch 0: this node is in epoch 1" in sec.log_text()


def test_a_real_primary_connects_with_a_session_tag(tmp_path, nodes: Nodes) -> None:
    sec = nodes.secondary(make_disk(str(tmp_path / "s.img"), 16 * MiB))
    pri = nodes.primary(make_disk(str(tmp_path / "p.img"), 16 * MiB), sec)
    sec.ctl("replication-start", mode="secondary")
    pri.ctl("replication-start", mode="primary")
    h = pri.client()
    h.pwrite(b"\x44" * 65536, 0)
    assert sec.client("replica").pread(65536, 0) == b"\x44" * 65536
    # a second connection of the same epoch (e.g. a resync after a hang) supersedes it
    intruder = _connect(sec, f"replica{make_tag(0, time.time_ns())}")
    intruder.pwrite(b"\x55" * 512, 0)
    h.pwrite(b"\x66" * 512, 0)  # the guest's write succeeds; its forward is refused
    query = pri.ctl("query-replication")
    assert query["disks"][0]["degraded"] is True
    assert "Operation not permitted" in query["disks"][0]["error"], query["disks"][0]["error"]
    assert sec.client("replica").pread(512, 0) == b"\x55" * 512
