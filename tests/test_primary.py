"""PrimaryReplica against a real nbdkit secondary: forwarding, dirty map, checkpoint hold,
failure of the secondary (killed, hung), resync, bad input, throughput.

The secondary is nbdkit serving an image file with tests/helpers/batchserver.py (the replica
export and its batch twin, batch.py); the tests read the file directly, so "on the
secondary" means "in that file", byte for byte.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from repdisk.errors import BlockIOError, ConfigError
from repdisk.replication.framework import Registry, ReplicationError, ReplicationMode
from repdisk.replication.primary import RESYNC_CHUNK, PrimaryReplica
from repdisk.replication.stage import Stage
from tests.helpers.replicas import Secondary, read_local

PRIMARY = ReplicationMode.PRIMARY
KiB, MiB = 1024, 1024 * 1024


class Events:
    """An EventSink that keeps everything."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        with self.lock:
            self.seen.append((name, data))

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [d for n, d in self.seen if n == name]


def assert_differences_dirty(local: bytes, secondary: bytes, rep: PrimaryReplica) -> int:
    """Every granule where local and secondary differ must be dirty; returns differing granules."""
    g = rep.dirty.granularity
    lv, sv = memoryview(local), memoryview(secondary)
    differing = 0
    for off in range(0, len(local), g):
        if lv[off:off + g] != sv[off:off + g]:
            differing += 1
            assert rep.dirty.is_dirty(off, min(g, len(local) - off)), \
                f"bytes at [{off}, {off + g}) differ but are not dirty"
    return differing


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the QEMU reference scenario 2, as repdisk does it ------------------------------------


def test_reference_scenario_primary(secondary_factory, primary_factory) -> None:
    size = 64 * MiB
    sec = secondary_factory(size, fill=0x11)
    rep = primary_factory(size, sec.uri)
    # Not started: repdisk serves the guest; the write is local only and dirty.
    rep.view.pwrite(b"\x33" * MiB, 0)
    buf = bytearray(MiB)
    rep.view.pread_into(memoryview(buf), 0)
    assert buf == b"\x33" * MiB
    assert rep.dirty.runs() == [(0, MiB)]
    assert sec.read()[:MiB] == b"\x11" * MiB
    with pytest.raises(ReplicationError, match="not running"):
        rep.get_error()

    rep.start(PRIMARY)  # copies the dirty region first
    assert rep.stage is Stage.RUNNING
    assert rep.dirty.dirty_bytes == 0
    for off in range(32 * MiB, 64 * MiB, 4 * MiB):
        rep.view.pwrite(b"\x22" * (4 * MiB), off)
    assert sec.read() == b"\x33" * MiB + b"\x11" * (31 * MiB) + b"\x22" * (32 * MiB)
    assert rep.dirty.dirty_bytes == 0

    rep.stop(True)
    rep.checkpoint()  # DONE: ignored
    rep.get_error()
    rep.start(PRIMARY)  # DONE: ignored
    assert rep.stage is Stage.DONE
    # Still serving after stop; writes are local and dirty again.
    rep.view.pwrite(b"\x44" * 100, 5 * MiB + 7)
    assert rep.dirty.runs() == [(5 * MiB, 64 * KiB)]
    assert sec.read()[5 * MiB:6 * MiB] == b"\x11" * MiB


def test_not_started_guards(primary_factory, secondary_factory) -> None:
    sec = secondary_factory(MiB)
    rep = primary_factory(MiB, sec.uri)
    with pytest.raises(ReplicationError, match="not running"):
        rep.checkpoint()
    with pytest.raises(ReplicationError, match="not running"):
        rep.stop(False)
    with pytest.raises(ReplicationError, match="not running"):
        rep.resync()
    rep.resume()  # no hold: nothing to do


def test_registry_and_query(primary_factory, secondary_factory) -> None:
    sec = secondary_factory(MiB)
    events = Events()
    rep = primary_factory(MiB, sec.uri, events=events)
    registry = Registry()
    rep.register(registry)
    registry.start_all(PRIMARY)
    registry.get_error_all()
    rep.view.pwrite(b"x" * 4096, 0)
    registry.do_checkpoint_all()
    rep.resume()
    q = rep.query()
    assert q["disk"] == rep.name and q["mode"] == "primary" and q["stage"] == "running"
    assert q["error"] is None and q["degraded"] is False and q["write_mode"] == "sync"
    assert q["dirty_bytes"] == 0 and q["holding"] is False
    assert q["counters"] == {"writes": 1, "bytes": 4096, "forwarded": 1, "forward_errors": 0,
                             "checkpoints": 1, "blocks_from_memory": 0}
    assert q["last_checkpoint"]["duration"] >= 0
    assert [d["to"] for d in events.named("REPLICATION_STAGE_CHANGED")] == ["running"]
    assert len(events.named("CHECKPOINT_COMPLETED")) == 1
    registry.stop_all(False)
    assert rep.stage is Stage.DONE
    assert rep.query()["stage"] == "done"


# -- forwarding ----------------------------------------------------------------------------


def test_sync_write_is_on_secondary_when_it_returns(primary_factory, secondary_factory) -> None:
    size = 4 * MiB
    sec = secondary_factory(size)
    rep = primary_factory(size, sec.uri)
    rep.start(PRIMARY)
    rng = random.Random(1)
    for i in range(40):
        length = rng.randrange(1, 200 * KiB)
        off = rng.randrange(0, size - length)
        data = rng.randbytes(length)
        if i % 5 == 4:
            rep.view.zero(off, length, fua=True)
            data = bytes(length)
        else:
            rep.view.pwrite(memoryview(bytearray(data)), off, fua=i % 2 == 0)
        with open(sec.path, "rb") as f:
            f.seek(off)
            assert f.read(length) == data
    rep.view.flush()
    assert sec.read() == read_local(rep)
    assert rep.dirty.dirty_bytes == 0


def _write_random(rep: PrimaryReplica, rng: random.Random, count: int) -> None:
    for _ in range(count):
        length = rng.randrange(1, 64 * KiB)
        rep.view.pwrite(rng.randbytes(length), rng.randrange(0, rep.view.size - length))


def _started_async(primary_factory: Callable[..., PrimaryReplica],
                   secondary_factory: Callable[..., Secondary], size: int,
                   filters: tuple[str, ...] = (), **kwargs: Any
                   ) -> tuple[Secondary, PrimaryReplica]:
    """A secondary of ``size`` bytes and an async primary replicating to it, started."""
    sec = secondary_factory(size, filters=filters)
    rep = primary_factory(size, sec.uri, write_mode="async", **kwargs)
    rep.start(PRIMARY)
    return sec, rep


def test_async_checkpoint_barrier_and_hold(primary_factory, secondary_factory) -> None:
    size = 8 * MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size, window=8)
    _write_random(rep, random.Random(2), 300)
    rep.checkpoint()
    before = read_local(rep)
    assert sec.read() == before  # every earlier write is on the secondary
    assert rep.query()["holding"] is True

    rep.view.pwrite(b"\x55" * 8192, 4096)  # acknowledged locally, held
    time.sleep(0.3)
    assert sec.read() == before
    assert rep.query()["lag_bytes"] >= 8192  # in the held map, sent after resume
    assert rep.query()["dirty_bytes"] == 0     # lag, not a resync's work
    rep.resume()
    assert wait_until(lambda: sec.read() == read_local(rep))
    assert rep.query()["holding"] is False


def test_async_write_during_a_piece_read_is_sent_again(primary_factory,
                                                       secondary_factory) -> None:
    """An async guest write takes no range lock: one that lands while the forwarder reads a
    piece of the same bytes must be sent again (the piece is cleared before it is read),
    never lost behind a clear that comes after the read."""
    size = MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size)
    read, raced = rep.disk.pread_into, []

    def read_then_race(buf: memoryview, offset: int) -> None:
        read(buf, offset)
        if not raced:  # the guest's next write lands right after the piece was read
            raced.append(offset)
            rep.view.pwrite(b"\x77" * 4096, offset)

    rep.disk.pread_into = read_then_race  # type: ignore[method-assign]
    rep.view.pwrite(b"\x11" * 8192, 8192)  # two blocks: read back (blockcache.py)
    assert wait_until(lambda: bool(raced))
    rep.checkpoint()
    assert raced == [8192] and read_local(rep)[8192:16384] == b"\x77" * 4096 + b"\x11" * 4096
    assert sec.read() == read_local(rep)
    rep.resume()


def test_async_round_that_fails_a_read_leaves_every_piece_dirty(primary_factory) -> None:
    """A pull round clears its pieces, then reads them; a read failing mid-round marks
    all of them dirty again (none is sent: the forwarder fails on the error) and unlocks
    the disk, so nothing written is forgotten and a later round sends it all."""
    size = MiB
    rep = primary_factory(size, None, write_mode="async")
    runs = [(4096 * 10, 8192), (4096 * 100, 4096), (4096 * 200, 12288)]
    for offset, length in runs:
        rep.dirty.mark(offset, length)
    read, calls = rep.disk.pread_into, []

    def second_fails(buf: memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 2:
            raise BlockIOError(errno.EIO, "injected read error")
        read(buf, offset)

    rep.disk.pread_into = second_fails  # type: ignore[method-assign]
    with pytest.raises(BlockIOError, match="injected read error"):
        rep.write_path.next_pieces(64, MiB)
    assert calls == [4096 * 200, 4096 * 100]  # highest first
    assert rep.dirty.runs() == runs
    unlocked = threading.Thread(target=lambda: rep.write_path.locks.release(
        rep.write_path.locks.acquire(0, size)))
    unlocked.start()
    unlocked.join(5)
    assert not unlocked.is_alive()
    rep.disk.pread_into = read  # type: ignore[method-assign]
    got = rep.write_path.next_pieces(64, MiB)
    assert got is not None
    pieces, placed = got
    placed()
    assert [(offset, len(buf)) for offset, buf in pieces] == runs[::-1] and not rep.dirty
    assert rep.write_path.next_pieces(64, MiB) is None


def _count_disk_reads(rep: PrimaryReplica) -> list[tuple[int, int]]:
    """Record (offset, length) of every read of the local disk from here on, except the
    guest's (the view reads through the method it bound at start)."""
    read, reads = rep.disk.pread_into, []

    def counted(buf: memoryview, offset: int) -> None:
        reads.append((offset, len(buf)))
        read(buf, offset)

    rep.disk.pread_into = counted  # type: ignore[method-assign]
    return reads


def test_async_single_blocks_are_sent_from_memory(primary_factory, secondary_factory) -> None:
    """A 4 KiB block written by a lone writer reaches the secondary from the writer's copy:
    the same bytes, and no read of the local disk."""
    size = MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size)
    reads = _count_disk_reads(rep)
    rng = random.Random(5)
    blocks = rng.sample(range(0, size // 4096, 2), 20)  # never adjacent: a piece each
    for block in blocks:
        rep.view.pwrite(rng.randbytes(4096), block * 4096)
    rep.view.pwrite(rng.randbytes(8192), 4096 * 201)  # two blocks: read back
    rep.checkpoint()
    rep.resume()
    assert sec.read() == read_local(rep)
    assert reads == [(4096 * 201, 8192)]
    assert rep.query()["counters"]["blocks_from_memory"] == 20 and len(rep.write_path.blocks) == 0


def test_async_writes_of_one_block_at_once_are_sent_from_the_disk(primary_factory,
                                                                  secondary_factory) -> None:
    """Two writes of one block at once: only the disk knows which landed last, so neither
    may keep its copy (the first one's, kept after the second's, would reach the secondary
    last and differ from the primary for good)."""
    size = MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size)
    pwrite, written, go = rep.disk.pwrite, threading.Event(), threading.Event()

    def slow_pwrite(buf: Any, offset: int, fua: bool = False) -> None:
        pwrite(buf, offset, fua)
        if threading.current_thread().name == "first-writer":
            written.set()
            go.wait(10)

    rep.disk.pwrite = slow_pwrite  # type: ignore[method-assign]
    first = _start(rep.view.pwrite, b"\x01" * 4096, 8192, name="first-writer")
    assert written.wait(5)  # on the disk, neither kept nor marked yet
    rep.view.pwrite(b"\x02" * 4096, 8192)  # lands on the disk last
    go.set()
    first.join(5)
    rep.checkpoint()
    rep.resume()
    assert read_local(rep)[8192:12288] == b"\x02" * 4096
    assert sec.read() == read_local(rep)
    assert rep.query()["counters"]["blocks_from_memory"] == 0


def test_async_zero_and_trim_forget_kept_blocks(primary_factory, secondary_factory) -> None:
    """Blocks written before start are kept until start sends them; a zero or a trim over
    them afterwards must be what is sent."""
    size = MiB
    sec = secondary_factory(size)
    rep = primary_factory(size, sec.uri, write_mode="async")
    for block in range(8):
        rep.view.pwrite(bytes([block + 1]) * 4096, block * 4096)
    rep.view.zero(4096, 4096)
    rep.view.trim(4 * 4096, 2 * 4096)
    assert len(rep.write_path.blocks) == 5
    rep.start(PRIMARY)
    local = read_local(rep)
    assert local[:8 * 4096] == (b"\x01" * 4096 + bytes(4096) + b"\x03" * 4096 + b"\x04" * 4096
                                + bytes(8192) + b"\x07" * 4096 + b"\x08" * 4096)
    assert sec.read() == local


def _stalled_write(rep: PrimaryReplica, data: bytes, offset: int
                   ) -> tuple[threading.Thread, threading.Event]:
    """An async write in a thread of its own, stopped between its local write and its mark
    (an async write takes no range lock) until the returned event is set."""
    mark, in_mark, go = rep.dirty.mark, threading.Event(), threading.Event()

    def slow_mark(offset: int, length: int) -> None:
        if threading.current_thread().name == "stalled-writer":
            in_mark.set()
            go.wait(10)
        mark(offset, length)

    rep.dirty.mark = slow_mark  # type: ignore[method-assign]
    writer = _start(rep.view.pwrite, data, offset, name="stalled-writer")
    assert in_mark.wait(5)  # written locally, not yet marked
    return writer, go


def _start(target: Callable[..., Any], *args: Any, name: str | None = None) -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    t.start()
    return t


def _checkpoint_in_thread(rep: PrimaryReplica
                          ) -> tuple[threading.Thread, list[ReplicationError]]:
    """``rep.checkpoint()`` in a thread of its own; the list gets its ReplicationError."""
    errors: list[ReplicationError] = []

    def checkpoint() -> None:
        try:
            rep.checkpoint()
        except ReplicationError as err:
            errors.append(err)

    return _start(checkpoint), errors


def test_async_held_write_waits_for_an_overlapping_write_from_before_the_hold(
        primary_factory, secondary_factory) -> None:
    """A write from before a checkpoint's hold may be written but not yet marked when a held
    write of the same bytes arrives: the held write must wait for it, or the checkpoint
    would carry the held write's bytes."""
    size = MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size, timeout=4.0)
    before, go = _stalled_write(rep, b"P" * 4096, 8192)
    try:
        checkpoint = _start(rep.checkpoint)
        assert wait_until(lambda: rep.query()["holding"])
        held = _start(rep.view.pwrite, b"H" * 4096, 8192)
        time.sleep(0.3)
        assert read_local(rep)[8192:8196] == b"PPPP"  # the held write waits
    finally:
        go.set()
    for t in (before, checkpoint):
        t.join(10)
    assert sec.read()[8192:12288] == b"P" * 4096  # the checkpoint: the write from before
    rep.resume()
    held.join(10)
    assert wait_until(lambda: sec.read() == read_local(rep))
    assert read_local(rep)[8192:12288] == b"H" * 4096


def test_async_checkpoint_fails_if_a_write_from_before_outlasts_the_hold(
        primary_factory, secondary_factory) -> None:
    """The hold ends by itself after timeout/2; a checkpoint still waiting then for a write
    from before it fails with a clear error instead of waiting for ever (holding the
    replica's lock), and the next checkpoint succeeds."""
    size = MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size, timeout=1.0)
    writer, go = _stalled_write(rep, b"S" * 4096, 0)
    try:
        checkpoint, failed = _checkpoint_in_thread(rep)
        checkpoint.join(2.0)
        assert len(failed) == 1, "the checkpoint is still waiting after the hold ended"
        assert "writes from before the hold were still running when it ended (0.5s" in str(
            failed[0])
    finally:
        go.set()
    writer.join(10)
    rep.checkpoint()
    assert sec.read() == read_local(rep)
    rep.resume()


def test_async_write_back_is_bounded_by_max_lag(primary_factory, secondary_factory) -> None:
    """A slow secondary: guest writes wait once max_lag bytes are unsent, never more."""
    size = 16 * MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size,
                              filters=("--filter=delay", "delay-write=20ms"), max_lag=MiB,
                              window=4)
    rng = random.Random(5)
    peak = 0
    for _ in range(60):
        length = 64 * KiB
        rep.view.pwrite(rng.randbytes(length), rng.randrange(0, size - length))
        peak = max(peak, rep.dirty.dirty_bytes)
    # A write waits while more than max_lag is unsent, then adds its own granules: never more.
    g = rep.dirty.granularity
    assert MiB // 2 < peak <= MiB + 64 * KiB + 2 * g  # it did fill up, and no further
    rep.checkpoint()
    rep.resume()
    assert sec.read() == read_local(rep)


def test_async_write_during_hold_keeps_the_checkpoint_closed(primary_factory,
                                                             secondary_factory) -> None:
    """A write during the hold to a granule still to be sent waits for it to be taken;
    the checkpoint holds the bytes from before the hold, the held write lands after."""
    size = 4 * MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size,
                              filters=("--filter=delay", "delay-write=300ms"), timeout=4.0)
    rep.view.pwrite(b"A" * 4096, 0)          # unsent when the checkpoint starts (300 ms)
    done = threading.Event()
    cp = threading.Thread(target=lambda: (rep.checkpoint(), done.set()))
    cp.start()
    assert wait_until(lambda: rep.holding, 2)
    rep.view.pwrite(b"B" * 4096, 2048)       # half on A's granule: waits until A is taken
    t0 = time.monotonic()
    rep.view.pwrite(b"C" * 4096, 2 * MiB)    # an untouched granule: local at once
    assert time.monotonic() - t0 < 0.2
    cp.join(5)
    assert done.is_set()
    got = sec.read()
    assert got[:4096] == b"A" * 4096 and got[4096:6144] == bytes(2048)  # A, not B
    assert got[2 * MiB:2 * MiB + 4096] == bytes(4096)
    g = rep.dirty.granularity
    assert rep.query()["lag_bytes"] >= 4096 + 4096 + g and rep.query()["dirty_bytes"] == 0
    rep.resume()
    assert wait_until(lambda: sec.read() == read_local(rep), 5)


def test_async_held_write_goes_on_when_the_hold_expires_on_a_dead_link(
        primary_factory, secondary_factory) -> None:
    """A write waiting during a hold for its granule to be sent must not wait for a link
    that never sends it: when the hold expires it is an ordinary write (local, dirty)."""
    size = 4 * MiB
    sec, rep = _started_async(primary_factory, secondary_factory, size, timeout=2.0, window=1)
    sec.stop()
    try:
        rep.view.pwrite(b"X" * 4096, MiB)    # taken and sent: fills the window of 1, unanswered
        assert wait_until(lambda: rep.query()["in_flight"] == 1, 2)
        rep.view.pwrite(b"A" * 4096, 0)      # stays dirty: no room to take it
        cp, errors = _checkpoint_in_thread(rep)
        assert wait_until(lambda: rep.holding, 2)
        t0 = time.monotonic()
        rep.view.pwrite(b"B" * 4096, 2048)   # on A's dirty granule: waits for the hold...
        waited = time.monotonic() - t0
        assert 0.5 <= waited < 1.5           # ...until it expires (timeout/2 = 1 s), no longer
        cp.join(5)
        assert not cp.is_alive() and errors and "checkpoint failed" in str(errors[0])
    finally:
        sec.signal(signal.SIGCONT)
    assert read_local(rep)[:6144] == b"A" * 2048 + b"B" * 4096
    assert rep.degraded and rep.dirty.is_dirty(0, 6144)
    rep.resync()
    assert sec.read() == read_local(rep)


def test_clean_stop_sends_held_writes(primary_factory, secondary_factory) -> None:
    sec, rep = _started_async(primary_factory, secondary_factory, MiB)
    rep.checkpoint()
    rep.view.pwrite(b"\x5a" * 3000, 70000)  # held
    rep.stop(False)  # ends the hold, then the barrier covers the held write
    assert rep.stage is Stage.DONE and rep.dirty.dirty_bytes == 0
    assert sec.read() == read_local(rep)


def test_sync_write_waits_for_resume(primary_factory, secondary_factory) -> None:
    sec = secondary_factory(MiB)
    rep = primary_factory(MiB, sec.uri, timeout=4.0)
    rep.start(PRIMARY)
    rep.checkpoint()
    writer = threading.Thread(target=rep.view.pwrite, args=(b"\x66" * 4096, 0))
    writer.start()
    time.sleep(0.3)
    assert writer.is_alive()  # a sync write is acknowledged only once on the secondary
    assert sec.read()[:4096] == bytes(4096)
    rep.resume()
    writer.join(2)
    assert not writer.is_alive()
    assert sec.read()[:4096] == b"\x66" * 4096
    assert rep.degraded is False


def test_hold_expires_after_half_the_timeout(primary_factory, secondary_factory) -> None:
    sec = secondary_factory(MiB)
    events = Events()
    rep = primary_factory(MiB, sec.uri, write_mode="async", timeout=1.0, events=events)
    rep.start(PRIMARY)
    t0 = time.monotonic()
    rep.checkpoint()
    rep.view.pwrite(b"\x77" * 4096, 0)
    assert wait_until(lambda: sec.read()[:4096] == b"\x77" * 4096, 3)
    waited = time.monotonic() - t0
    assert 0.45 <= waited < 1.5
    assert wait_until(lambda: len(events.named("CHECKPOINT_HOLD_EXPIRED")) == 1, 1)
    assert events.named("CHECKPOINT_HOLD_EXPIRED") == [{"disk": rep.name, "mode": "primary",
                                                        "held": 0.5}]
    assert rep.query()["holding"] is False
    rep.resume()  # late resume: harmless
    rep.get_error()  # the expiry is not a forwarding error


def test_checkpoint_refused_while_dirty(primary_factory, secondary_factory) -> None:
    sec = secondary_factory(MiB)
    rep = primary_factory(MiB, sec.uri)
    rep.start(PRIMARY)
    rep.dirty.mark(0, 100)  # e.g. a write whose forward timed out
    with pytest.raises(ReplicationError, match="not in sync: 65536 bytes dirty; resync"):
        rep.checkpoint()
    assert rep.resync() == 64 * KiB
    rep.checkpoint()
    rep.resume()


# -- a failing secondary -------------------------------------------------------------------


class Load:
    """Guest writers on several threads, timing every write."""

    def __init__(self, rep: PrimaryReplica, threads: int, seed: int) -> None:
        self.rep = rep
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(seed + i,))
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        size = self.rep.view.size
        while not self.stop.is_set():
            length = rng.randrange(1, 48 * KiB)
            data = rng.randbytes(length)
            off = rng.randrange(0, size - length)
            t0 = time.monotonic()
            try:
                self.rep.view.pwrite(data, off)
            except BaseException as err:  # noqa: BLE001 - reported by finish()
                self.errors.append(err)
                return
            with self.lock:
                self.latencies.append(time.monotonic() - t0)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


@pytest.mark.timeout(60)
@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_killed_secondary_then_resync(primary_factory, secondary_factory, write_mode) -> None:
    size = 16 * MiB
    timeout = 1.0
    sec = secondary_factory(size)
    events = Events()
    rep = primary_factory(size, sec.uri, timeout=timeout, write_mode=write_mode, events=events)
    rep.start(PRIMARY)

    load = Load(rep, threads=4, seed=10)
    time.sleep(0.5)
    sec.kill()
    time.sleep(0.7)
    load.finish()
    assert load.latencies and max(load.latencies) < timeout + 1
    assert rep.degraded
    with pytest.raises(ReplicationError, match="secondary"):
        rep.get_error()
    assert len(events.named("REPLICATION_ERROR")) == 1
    local = read_local(rep)
    assert assert_differences_dirty(local, sec.read(), rep) > 0
    with pytest.raises(ReplicationError, match="bytes dirty"):
        rep.checkpoint()

    dirty_before = rep.dirty.dirty_bytes
    sec.start()
    progress: list[tuple[int, int]] = []
    sent = rep.resync(lambda done, total: progress.append((done, total)))
    assert dirty_before <= sent <= dirty_before + RESYNC_CHUNK
    assert progress and progress[-1][0] == sent
    assert events.named("RESYNC_PROGRESS")[-1] == {"disk": rep.name, "done": sent, "total": sent}
    rep.get_error()
    assert not rep.degraded and rep.dirty.dirty_bytes == 0
    assert sec.read() == read_local(rep)
    rep.checkpoint()
    rep.resume()


@pytest.mark.timeout(60)
def test_async_resync_completes_while_the_guest_keeps_writing(primary_factory,
                                                              secondary_factory) -> None:
    """Async writes keep the dirty map from running dry: resync must not wait for that
    (its barrier does not drain), so it ends while the guest writes; a checkpoint (writers
    held) then drains, and the secondary equals the primary."""
    size = 16 * MiB
    # A slow secondary and a small lag bound: the writers keep about max_lag unsent.
    sec, rep = _started_async(primary_factory, secondary_factory, size,
                              filters=("--filter=delay", "delay-write=5ms"), timeout=1.0,
                              max_lag=MiB, window=4)
    load = Load(rep, threads=2, seed=40)
    try:
        assert wait_until(lambda: rep.dirty.dirty_bytes > MiB // 2, 5)
        written = len(load.latencies)
        for _ in range(2):  # each waits for its own pieces, not for the map to run dry
            rep.resync()
            assert not rep.degraded
        assert len(load.latencies) > written  # the guest wrote on meanwhile
    finally:
        load.finish()
    rep.checkpoint()
    assert sec.read() == read_local(rep)
    rep.resume()


@pytest.mark.timeout(60)
def test_resync_with_writes_flowing(primary_factory, secondary_factory) -> None:
    size = 32 * MiB
    sec = secondary_factory(size)
    rep = primary_factory(size, sec.uri, timeout=1.0)
    rep.start(PRIMARY)
    sec.kill()
    rng = random.Random(5)
    for _ in range(200):  # degraded: local only, dirty
        length = rng.randrange(1, 256 * KiB)
        rep.view.pwrite(rng.randbytes(length), rng.randrange(0, size - length))
    assert wait_until(lambda: rep.degraded)
    dirty_before = rep.dirty.dirty_bytes
    sec.start()
    loads: list[Load] = []

    def start_writers(done: int, total: int) -> None:
        if not loads:  # the first chunk: the link is up, new writes are forwarded
            loads.append(Load(rep, threads=3, seed=20))

    try:
        sent = rep.resync(start_writers)
    finally:
        for load in loads:
            load.finish()
    assert loads and loads[0].latencies
    # The writes during the copy were forwarded, not copied.
    assert dirty_before <= sent <= dirty_before + RESYNC_CHUNK
    rep.checkpoint()  # in sync with nothing dirty
    rep.resume()
    rep.view.flush()
    assert rep.dirty.dirty_bytes == 0
    assert sec.read() == read_local(rep)


def test_resync_interrupted_keeps_the_rest_dirty(primary_factory, secondary_factory) -> None:
    size = 16 * MiB
    sec = secondary_factory(size)
    rep = primary_factory(size, sec.uri, timeout=1.0)
    rep.start(PRIMARY)
    sec.kill()
    rep.view.pwrite(b"\x01" * 4096, 0)  # the forward fails: degraded
    assert wait_until(lambda: rep.degraded)  # on_failure may come just after a rejection
    rep.dirty.mark(0, size)
    with pytest.raises(ReplicationError, match="secondary .* does not answer"):
        rep.resync()
    assert rep.dirty.dirty_bytes == size
    sec.start()
    assert rep.resync() == size
    assert sec.read() == read_local(rep)


@pytest.mark.timeout(30)
def test_hanging_secondary(primary_factory, secondary_factory) -> None:
    sec = secondary_factory(MiB)
    rep = primary_factory(MiB, sec.uri, timeout=1.0)
    rep.start(PRIMARY)
    rep.view.pwrite(b"\x01" * 4096, 0)
    sec.stop()  # SIGSTOP, and wait until it took: the next write must find it hung
    try:
        t0 = time.monotonic()
        rep.view.pwrite(b"\x02" * 4096, 8192)
        assert time.monotonic() - t0 < 1.5
        assert rep.dirty.is_dirty(8192, 4096)
        assert rep.degraded
        with pytest.raises(ReplicationError, match="did not acknowledge"):
            rep.get_error()
        t0 = time.monotonic()
        rep.view.pwrite(b"\x03" * 4096, 3 * 65536)  # degraded: local only, at once
        rep.view.flush()
        assert time.monotonic() - t0 < 0.5
        assert rep.dirty.runs() == [(0, 64 * KiB), (3 * 64 * KiB, 64 * KiB)]
        with pytest.raises(ReplicationError, match="cannot stop cleanly: .* 131072 bytes dirty"):
            rep.stop(False)
    finally:
        sec.signal(signal.SIGCONT)
    rep.stop(True)
    assert rep.stage is Stage.DONE


# -- bad input -----------------------------------------------------------------------------


def test_bad_requests(primary_factory, secondary_factory) -> None:
    sec = secondary_factory(MiB)
    rep = primary_factory(MiB, sec.uri)
    rep.start(PRIMARY)
    for call in (lambda: rep.view.pwrite(b"", 0), lambda: rep.view.zero(0, 0),
                 lambda: rep.view.pread_into(memoryview(bytearray(0)), 0)):
        with pytest.raises(BlockIOError, match="invalid request length 0"):
            call()
    for call in (lambda: rep.view.pwrite(b"x" * 2, MiB - 1), lambda: rep.view.trim(MiB, 1),
                 lambda: rep.view.pread_into(memoryview(bytearray(2)), MiB - 1),
                 lambda: rep.view.zero(-1, 2)):
        with pytest.raises(BlockIOError, match="past the end"):
            call()
    assert rep.query()["counters"]["writes"] == 0
    with pytest.raises(ReplicationError, match="running or done"):
        rep.start(PRIMARY)


def test_bad_configuration(primary_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match="write-mode.*'lazy'") as info:
        primary_factory(MiB, "nbd+unix:///?socket=/nonexistent", write_mode="lazy")
    assert info.value.key == "write-mode"
    with pytest.raises(ConfigError, match="timeout"):
        primary_factory(MiB, "nbd+unix:///?socket=/nonexistent", timeout=0)


def test_start_errors(primary_factory, secondary_factory, tmp_path) -> None:
    rep = primary_factory(MiB, None)
    with pytest.raises(ReplicationError, match="no secondary is configured"):
        rep.start(PRIMARY)
    with pytest.raises(ReplicationError, match="does not match this disk's mode primary"):
        rep.start(ReplicationMode.SECONDARY)

    uri = f"nbd+unix:///?socket={tmp_path}/nobody.sock"
    rep = primary_factory(MiB, uri)
    with pytest.raises(ReplicationError, match="secondary .* does not answer") as info:
        rep.start(PRIMARY)
    assert uri in str(info.value)
    assert rep.stage is Stage.NONE

    sec = secondary_factory(2 * MiB)
    rep = primary_factory(MiB, sec.uri)
    with pytest.raises(ReplicationError, match=f"{2 * MiB} bytes but the local disk is {MiB}"):
        rep.start(PRIMARY)
    assert rep.stage is Stage.NONE
    with pytest.raises(ReplicationError, match=f"{2 * MiB} bytes"):
        rep.probe()


# -- throughput (printed, not asserted) -------------------------------------------------------


@pytest.mark.timeout(60)
def test_measure_random_4k_writes(primary_factory, secondary_factory) -> None:
    size = 64 * MiB
    for mode in ("local", "sync", "async"):  # local: not started, the baseline
        sec = secondary_factory(size)
        rep = primary_factory(size, sec.uri, write_mode="sync" if mode == "local" else mode)
        if mode != "local":
            rep.start(PRIMARY)
        count = [0] * 8
        stop = threading.Event()
        data = os.urandom(4096)

        def run(i: int, stop: threading.Event = stop, rep: PrimaryReplica = rep,
                data: bytes = data, count: list[int] = count) -> None:
            rng = random.Random(i)
            while not stop.is_set():
                rep.view.pwrite(data, rng.randrange(size // 4096) * 4096)
                count[i] += 1

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        if mode != "local":
            rep.checkpoint()  # async: until everything is on the secondary
        elapsed = time.monotonic() - t0
        print(f"\n{mode}: {sum(count) / elapsed:.0f} random 4 KiB writes/s (8 threads)")
        if mode != "local":
            rep.resume()
            assert rep.dirty.dirty_bytes == 0
            rep.stop(False)
        sec.kill()
