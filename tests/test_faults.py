"""Faults under real nodes: processes killed with SIGKILL, a full disk under an overlay,
I/O errors and a slow secondary (nbdkit's error and delay filters), and files left
corrupt by a crash.

For each: what the guest (a libnbd client of the primary) sees, what is reported
(``query-replication`` / ``replication-get-error``), and that no acknowledged write is
lost: the primary's disk is compared with a model of every acknowledged write, and the
secondary's disk with the primary's after recovery, every byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import nbd
import pytest

from repdisk.cli import nodeproc
from repdisk.errors import ControlError, RepdiskError
from tests.helpers.nodes import (
    MiB,
    NodeProc,
    Nodes,
    checkpoint,
    kill9,
    make_disk,
    random_bytes,
    read_all,
    read_file,
    restart,
    start_node,
    start_pair,
)

SIZE = 4 * MiB
BLOCK = 64 * 1024


# -- kill -9 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_secondary_killed_in_the_middle_of_a_checkpoint_then_restarted(nodes: Nodes,
                                                                       seed: int) -> None:
    """SIGKILL at a random moment inside the secondary's checkpoint; the guest never sees an
    error, the primary degrades, and restart + start + resync + checkpoint makes both
    disks equal to every write the guest made."""
    rng = random.Random(seed)
    pri, sec = start_pair(nodes, SIZE, timeout="1s")
    h = pri.client()
    model = bytearray(random_bytes(seed, SIZE))
    h.pwrite(bytes(model), 0)
    pri.ctl("replication-do-checkpoint")
    sec.ctl("replication-get-error")
    t = threading.Thread(target=_swallow, args=(sec.ctl, "replication-do-checkpoint"))
    t.start()
    time.sleep(rng.uniform(0, 0.01))
    kill9(sec)
    t.join()
    pri.ctl("replication-resume")
    for _i in range(32):                  # the guest goes on writing: no error, ever
        off = rng.randrange(0, SIZE - BLOCK)
        data = rng.randbytes(rng.randrange(1, BLOCK))
        h.pwrite(data, off)
        model[off:off + len(data)] = data
    h.flush()
    q = pri.ctl("query-replication")["disks"][0]
    assert q["degraded"] and q["error"]
    assert read_file(pri.disks[0]) == model            # every acknowledged write is local
    sec = restart(nodes, sec, [("disk", sec.disks[0])])
    sec.ctl("replication-start", mode="secondary")
    pri.ctl("replication-resync")
    checkpoint(pri, sec)
    h.shutdown()
    assert read_file(sec.disks[0]) == model


def _swallow(fn: Any, *args: Any) -> None:
    with contextlib.suppress(ControlError, OSError):   # the node died under the command
        fn(*args)


@pytest.mark.parametrize("seed", [4, 5])
def test_primary_killed_under_sync_writes_loses_no_acknowledged_write(nodes: Nodes,
                                                                     seed: int) -> None:
    """Sync mode's promise: an acknowledged write is on both disks, even if the primary
    is killed the next instant."""
    pri, sec = start_pair(nodes, SIZE)
    acked: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(seed)
        h = pri.client()
        blocks = list(range(SIZE // BLOCK))
        rng.shuffle(blocks)
        try:
            for b in blocks * 4:
                data = rng.randbytes(BLOCK)
                h.pwrite(data, b * BLOCK)
                acked.append((b, data))
                if stop.is_set():
                    return
        except nbd.Error:
            return                       # the primary is gone

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(random.Random(seed).uniform(0.05, 0.3))
    kill9(pri)
    stop.set()
    t.join()
    assert len(acked) > 5
    latest: dict[int, bytes] = {}
    for b, data in acked:
        latest[b] = data
    pri_disk, sec_disk = read_file(pri.disks[0]), read_file(sec.disks[0])
    in_flight_block = None            # the one write not acknowledged when the primary died
    for b, data in latest.items():
        for disk in (pri_disk, sec_disk):
            if disk[b * BLOCK:(b + 1) * BLOCK] != data:
                assert in_flight_block in (None, b), "two blocks differ from what was acked"
                in_flight_block = b


# -- a full disk under an overlay ------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Any) -> Iterator[str]:
    """A 1 MiB tmpfs: the overlay placed there runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = str(tmp_path / "small")
    os.makedirs(mnt)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", mnt],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_full_disk_under_the_hidden_overlay(nodes: Nodes, small_fs: str) -> None:
    """Copy-before-write runs out of space: the primary's write is still acknowledged to the
    guest, the secondary refuses the replica write (EIO on the wire, ENOSPC in its own
    error), the primary degrades, and the secondary's last checkpoint stays intact
    (failover returns it exactly)."""
    sec_disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE, fill=0x33)
    pri_disk = make_disk(os.path.join(nodes.folder, "pri.img"), SIZE, fill=0x33)
    sec = nodes.secondary(sec_disk, hidden=os.path.join(small_fs, "hidden"))
    sec.ctl("replication-start", mode="secondary")
    pri = nodes.primary(pri_disk, sec, timeout="2s")
    pri.ctl("replication-start", mode="primary")
    h = pri.client()
    checkpoint(pri, sec)                       # the pair's good state: all 0x33
    at_checkpoint = read_file(sec_disk)
    new = random_bytes(9, SIZE)
    for off in range(0, SIZE, BLOCK):          # every old cluster must be saved: > 1 MiB
        h.pwrite(new[off:off + BLOCK], off)    # never fails for the guest
    h.flush()
    assert read_file(pri_disk) == new
    q = pri.ctl("query-replication")["disks"][0]
    assert q["degraded"] and "failed write" in q["error"], q["error"]
    with pytest.raises(ControlError,
                       match="replica pwrite .* failed: .*hidden: .*No space left on device"):
        sec.ctl("replication-get-error")
    # The failover needs no free space: the overlay's bitmap blocks were reserved when it
    # was created, so its bits are persisted on the full file system, and the commit
    # writes into the secondary disk, elsewhere. The disk is the last checkpoint, exactly.
    sec.ctl("replication-stop", failover=True)
    disk = sec.ctl("query-replication")["disks"][0]
    assert disk["stage"] == "done" and disk["error"] is None
    assert read_all(sec.client("active")) == at_checkpoint
    assert read_file(sec_disk) == at_checkpoint


def test_full_disk_under_the_active_overlay(nodes: Nodes, small_fs: str) -> None:
    """The secondary VM's writes run out of space: it gets an error for that write (EIO:
    the secondary maps every failure to EIO), never a silent loss; replication is not
    broken by it and the primary stays in sync."""
    pri, sec = _pair_with(nodes, active=os.path.join(small_fs, "active"))
    checkpoint(pri, sec)
    vm = sec.client("active")
    written, err = 0, None
    try:
        while written < SIZE:
            vm.pwrite(b"\x44" * BLOCK, written)
            written += BLOCK
    except nbd.Error as e:
        err = e
    assert err is not None and err.errno == "EIO", err
    assert 0 < written < 2 * MiB
    for off in range(0, written, BLOCK):       # what was acknowledged reads back
        assert vm.pread(BLOCK, off) == b"\x44" * BLOCK
    sec.ctl("replication-get-error")            # a VM's failed write is not a replication error
    h = pri.client()
    h.pwrite(b"\x55" * BLOCK, 0)
    h.flush()
    assert not pri.ctl("query-replication")["disks"][0]["degraded"]
    assert read_file(sec.disks[0])[:BLOCK] == b"\x55" * BLOCK


def _pair_with(nodes: Nodes, **sec_keys: str) -> tuple[NodeProc, NodeProc]:
    sec_disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE)
    pri_disk = make_disk(os.path.join(nodes.folder, "pri.img"), SIZE)
    sec = nodes.secondary(sec_disk, **sec_keys)
    sec.ctl("replication-start", mode="secondary")
    pri = nodes.primary(pri_disk, sec, timeout="2s")
    pri.ctl("replication-start", mode="primary")
    return pri, sec


# -- I/O errors and a slow secondary (nbdkit filters in front of a plain secondary) -----------

class FilteredSecondary:
    """``nbdkit --filter=F file IMG`` on a Unix socket: a stand-in secondary whose faults
    the test switches on and off."""

    def __init__(self, folder: str, filters: list[str], params: list[str]) -> None:
        self.disk = make_disk(os.path.join(folder, "plain.img"), SIZE)
        self.sock = os.path.join(folder, "plain.sock")
        self.listen = nodeproc.Listen(socket=self.sock)
        cmd = (["nbdkit", "-f", "--exit-with-parent", "-U", self.sock]
               + [f"--filter={f}" for f in filters] + ["file", self.disk] + params)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.sock) and self.listen.answers()):
            assert self.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)

    def uri(self) -> str:
        return self.listen.uri("replica")  # the file plugin serves any export name

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def plain(nodes: Nodes, request: Any) -> Iterator[Any]:
    made: list[FilteredSecondary] = []

    def make(filters: list[str], params: list[str]) -> FilteredSecondary:
        made.append(FilteredSecondary(nodes.folder, filters, params))
        return made[-1]
    yield make
    for s in made:
        s.close()


def _primary_to(nodes: Nodes, uri: str, **keys: str) -> NodeProc:
    disk = make_disk(os.path.join(nodes.folder, "pri.img"), SIZE)
    pri = start_node(nodes, "primary", "pri",
                     [("disk", disk), ("secondary", uri)] + list(keys.items()),
                     nodeproc.Listen(socket=os.path.join(nodes.folder, "pri.sock")))
    pri.ctl("replication-start", mode="primary")
    return pri


def test_io_errors_on_the_secondary_degrade_without_failing_the_guest(nodes: Nodes,
                                                                      plain: Any) -> None:
    trigger = os.path.join(nodes.folder, "fail-now")
    sec = plain(["error"], ["error-pwrite=EIO", "error-pwrite-rate=100%",
                            f"error-pwrite-file={trigger}"])
    pri = _primary_to(nodes, sec.uri(), timeout="2s")
    h = pri.client()
    model = bytearray(random_bytes(11, SIZE))
    h.pwrite(bytes(model[:MiB]), 0)
    open(trigger, "w").close()                          # the secondary's disk starts failing
    h.pwrite(bytes(model[MiB:]), MiB)                   # acknowledged to the guest anyway
    h.flush()
    q = pri.ctl("query-replication")["disks"][0]
    assert q["degraded"] and "Input/output error" in q["error"], q["error"]
    with pytest.raises(ControlError, match="Input/output error"):
        pri.ctl("replication-get-error")
    assert read_file(pri.disks[0]) == model
    os.unlink(trigger)                                  # repaired
    pri.ctl("replication-resync")
    pri.ctl("replication-get-error")                    # no error any more
    h.flush()
    h.shutdown()
    assert read_file(sec.disk) == model


def test_slow_secondary_bounds_guest_latency_by_the_timeout(nodes: Nodes, plain: Any) -> None:
    sec = plain(["delay"], ["delay-write=3"])
    pri = _primary_to(nodes, sec.uri(), timeout="500ms")
    h = pri.client()
    t0 = time.monotonic()
    h.pwrite(b"\x66" * BLOCK, 0)
    first = time.monotonic() - t0
    t0 = time.monotonic()
    for i in range(1, 16):
        h.pwrite(b"\x66" * BLOCK, i * BLOCK)
    rest = time.monotonic() - t0
    assert 0.4 < first < 1.5 and rest < 1.0, (first, rest)
    q = pri.ctl("query-replication")["disks"][0]
    assert q["degraded"] and "within 0.5s" in q["error"], q["error"]
    assert read_file(pri.disks[0])[:16 * BLOCK] == b"\x66" * 16 * BLOCK


# -- files left corrupt by a crash are refused at start-up ---------------------------------------

def _corrupt(path: str, how: str) -> None:
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(max(0, os.path.getsize(path) // 2 - 1))
    elif how == "garbage":
        with open(path, "r+b") as f:
            f.write(b"\x00garbage{")
    else:
        os.unlink(path)


@pytest.mark.parametrize("target,how,message", [
    ("hidden.bitmap", "garbage", "overlay bitmap .*hidden.bitmap: bad magic"),
    ("hidden.bitmap", "truncate", "hidden"),
    ("active", "truncate", "overlay .*active: data file is"),
    ("active.bitmap", "delete", "cannot open overlay bitmap .*active.bitmap"),
    ("state", "garbage", "state: .*sec.img.state cannot be read"),
    ("state", "truncate", "state: .*sec.img.state"),
])
def test_files_left_corrupt_are_refused_at_start_with_a_clear_message(
        nodes: Nodes, target: str, how: str, message: str) -> None:
    disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE)
    sec = nodes.secondary(disk)
    sec.ctl("replication-start", mode="secondary")
    client = sec.client("replica")
    client.pwrite(b"\x77" * BLOCK, 0)                  # something in the hidden overlay
    client.flush()
    kill9(sec)
    path = f"{disk}.{target}"
    assert os.path.exists(path), path
    _corrupt(path, how)
    with pytest.raises(RepdiskError, match=message) as info:
        nodes.secondary(disk, name="sec2")
    text = str(info.value)
    assert "Traceback" not in text and "\n" not in text.strip()


def test_a_state_file_with_a_foreign_format_is_refused(nodes: Nodes) -> None:
    disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE)
    with open(disk + ".state", "w") as f:
        json.dump({"format": 99, "epoch": 1, "role": "secondary", "failed_over": False}, f)
    with pytest.raises(RepdiskError, match="not a repdisk state file of format 1"):
        nodes.secondary(disk)
