"""Forwarder against real nbdkit servers: order, barrier, hold, failures, throughput.

Every content check reads the whole export back with a separate libnbd handle and
compares every byte with a model that applies the requests in submission order
(``Ticket.seq``), which is what the forwarder promises for overlapping requests.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from repdisk.errors import ForwardError
from repdisk.replication.batch import BATCH_PIECE_MAX
from repdisk.replication.forwarder import Forwarder
from repdisk.replication.overlap import GRAIN, OverlapIndex
from repdisk.replication.ticket import Ticket
from repdisk.uri import with_export_suffix
from tests.helpers.commands import sigstop
from tests.helpers.replicas import BATCH_SERVER

#: What a source returns (forwarder.Source): pieces and the call that unlocks them.
Pieces = tuple[list[tuple[int, bytearray]], Callable[[], None]] | None

MiB = 1024 * 1024
SIZE = 64 * MiB


class Server:
    """An nbdkit process on a Unix socket; stopped (SIGCONT first) and reaped at cleanup."""

    def __init__(self, sock: Path, *args: str, export: str = "") -> None:
        self.sock = sock
        self.uri = f"nbd+unix:///{export}?socket={sock}"
        self.batch = False  # serves batch records (tests/helpers/batchserver.py)
        self.proc = subprocess.Popen(["nbdkit", "-U", str(sock), "--exit-with-parent", "-f",
                                      *args])
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.proc.poll() is None, f"nbdkit {args} exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"nbdkit {args} did not come up"
            time.sleep(0.02)

    def _answers(self) -> bool:
        if not self.sock.exists():
            return False
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            h.shutdown()
            return True
        except nbd.Error:
            return False

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        sigstop(self.proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self.sock.unlink(missing_ok=True)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: str, name: str = "s.sock", export: str = "") -> Server:
        srv = Server(tmp_path / name, *args, export=export)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill()


@pytest.fixture
def server(servers: Callable[..., Server]) -> Server:
    return servers("memory", str(SIZE))


# A parallel server whose requests take random times, so that two overlapping requests in
# flight together would land out of order (nbdkit memory is too quick to show it).
JITTERY_PLUGIN = f"""
import random, time
import nbdkit
API_VERSION = 2
disk = bytearray({SIZE})
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def open(readonly):
    return 1
def get_size(h):
    return len(disk)
def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]
def pwrite(h, buf, offset, flags):
    time.sleep(random.random() * 0.004)
    disk[offset:offset + len(buf)] = buf
def zero(h, count, offset, flags):
    time.sleep(random.random() * 0.004)
    disk[offset:offset + count] = bytes(count)
def flush(h, flags):
    pass
"""


def batch_server_on(servers: Callable[..., Server], tmp_path: Path) -> Server:
    """tests/helpers/batchserver.py on a SIZE image: a replica export with its batch twin, whose
    writes sleep up to 4 ms first (requests in flight finish out of order)."""
    img = tmp_path / "batch.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    return servers("python", str(BATCH_SERVER), f"file={img}", "jitter=0.004")


@pytest.fixture
def batch_server(servers: Callable[..., Server], tmp_path: Path) -> Server:
    return batch_server_on(servers, tmp_path)


@pytest.fixture(params=["memory", "jittery", "batch"])
def any_server(request: pytest.FixtureRequest, servers: Callable[..., Server],
               tmp_path: Path) -> Server:
    """nbdkit memory, the jittery plugin, or the batch server (``batch`` True: a forwarder
    with a source may send it batch records)."""
    if request.param == "memory":
        return servers("memory", str(SIZE))
    if request.param == "batch":
        srv = batch_server_on(servers, tmp_path)
        srv.batch = True
        return srv
    script = tmp_path / "jittery.py"
    script.write_text(JITTERY_PLUGIN)
    return servers("python", str(script))


class Failures:
    """on_failure recorder: every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []

    def __call__(self, error: str, ranges: list[tuple[int, int]]) -> None:
        self.calls.append((error, ranges))


@pytest.fixture
def make_fwd() -> Iterator[Callable[..., tuple[Forwarder, Failures]]]:
    made: list[Forwarder] = []

    def make(uri: str, **kw: object) -> tuple[Forwarder, Failures]:
        failures = Failures()
        fwd = Forwarder(uri, on_failure=failures, **kw)  # type: ignore[arg-type]
        fwd.connect()
        made.append(fwd)
        return fwd, failures

    yield make
    for fwd in made:
        fwd.close()


def read_all(uri: str, size: int = SIZE) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray(size)
    chunk = 4 * MiB
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        out[off:off + n] = h.pread(n, off)
    h.shutdown()
    return bytes(out)


def assert_same(got: bytes, want: bytes | bytearray) -> None:
    if got != want:
        first = next(i for i in range(len(want)) if got[i] != want[i])
        pytest.fail(f"server differs from the model first at byte {first}")


Op = tuple[Ticket, bytes | None]   # ticket (kind, offset, length, seq) and the data written


def apply_in_order(model: bytearray, ops: list[Op]) -> None:
    for t, data in sorted(ops, key=lambda op: op[0].seq):
        if t.kind == "write":
            assert data is not None
            model[t.offset:t.offset + t.length] = data
        elif t.kind == "zero":
            model[t.offset:t.offset + t.length] = bytes(t.length)


def random_write_args(rng: random.Random, region: int) -> tuple[int, int]:
    """A length log-uniform in 4 KiB..1 MiB, sometimes unaligned, inside ``region``."""
    length = int(2 ** rng.uniform(12, 20)) + rng.choice([0, 0, 1, 511])
    return rng.randrange(0, region - length), length


def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def run_threads(n: int, fn: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            fn(i)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- order and content ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_overlapping_writes_land_in_submission_order(any_server, make_fwd):
    server = any_server
    fwd, failures = make_fwd(server.uri, batch=server.batch)
    ops: list[Op] = []
    lock = threading.Lock()
    region = 6 * MiB  # small, so concurrent requests overlap a lot

    def writer(i: int) -> None:
        rng = random.Random(i)
        mine: list[Op] = []
        reused = bytearray(MiB)  # thread 0 reuses one buffer: safe once wait() returns
        for _ in range(40):
            offset, length = random_write_args(rng, region)
            if rng.random() < 0.15:
                mine.append((fwd.submit_zero(offset, length, fua=rng.random() < 0.5), None))
                continue
            data = rng.randbytes(length)
            if i == 0:
                reused[:length] = data
                t = fwd.submit_write(memoryview(reused)[:length], offset)
                assert t.wait(10)
            else:
                t = fwd.submit_write(data, offset, fua=rng.random() < 0.1)
            mine.append((t, data))
        with lock:
            ops.extend(mine)

    run_threads(8, writer)
    assert all(t.wait(10) for t, _ in ops)
    assert sorted(t.seq for t, _ in ops) == list(range(len(ops)))
    model = bytearray(SIZE)
    apply_in_order(model, ops)
    assert_same(read_all(server.uri), model)
    assert failures.calls == [] and not fwd.failed
    writes = [t for t, d in ops if d is not None]
    assert fwd.stats["writes"] == len(writes)
    assert fwd.stats["bytes"] == sum(t.length for t in writes)
    assert fwd.stats["zeros"] == len(ops) - len(writes)
    assert (fwd.in_flight, fwd.queued, fwd.in_flight_bytes) == (0, 0, 0)


def test_overlapping_request_waits_and_blocks_the_queue(servers, make_fwd):
    """With a slow server: B overlaps in-flight A, so B and C (behind it) stay queued."""
    srv = servers("--filter=delay", "memory", str(SIZE), "delay-write=300ms")
    fwd, _ = make_fwd(srv.uri)
    a = fwd.submit_write(b"a" * 4096, 0)
    b = fwd.submit_write(b"b" * 4096, 2048)
    c = fwd.submit_write(b"c" * 4096, MiB)
    time.sleep(0.15)
    assert (fwd.in_flight, fwd.queued) == (1, 2)
    assert all(t.wait(5) for t in (a, b, c))
    got = read_all(srv.uri, 2 * MiB)
    assert got[:2048] == b"a" * 2048 and got[2048:6144] == b"b" * 4096
    assert got[MiB:MiB + 4096] == b"c" * 4096


def test_window_bounds_requests_in_flight(servers, make_fwd):
    srv = servers("--filter=delay", "memory", str(SIZE), "delay-write=300ms")
    fwd, _ = make_fwd(srv.uri, window=2)
    tickets = [fwd.submit_write(bytes([i]) * 4096, i * 4096) for i in range(5)]
    time.sleep(0.15)
    assert (fwd.in_flight, fwd.queued, fwd.in_flight_bytes) == (2, 3, 8192)
    assert all(t.wait(5) for t in tickets)


def test_flush_and_trim_are_acknowledged(server, make_fwd):
    fwd, failures = make_fwd(server.uri)
    w = fwd.submit_write(b"x" * 8192, 4096)
    tr = fwd.submit_trim(4096, 4096)
    fl = fwd.submit_flush()
    assert w.wait(5) and tr.wait(5) and fl.wait(5)
    assert (fwd.stats["trims"], fwd.stats["flushes"]) == (1, 1)
    # Trim is advisory: only the untrimmed half has a defined content.
    assert read_all(server.uri, MiB)[8192:12288] == b"x" * 4096
    assert failures.calls == []


# -- barrier and hold -------------------------------------------------------------------


def test_barrier_returns_after_every_earlier_write_is_on_the_server(any_server, make_fwd):
    server = any_server
    fwd, _ = make_fwd(server.uri, batch=server.batch)
    rng = random.Random(7)
    ops: list[Op] = []
    for _ in range(150):
        offset, length = random_write_args(rng, SIZE)
        data = rng.randbytes(length)
        ops.append((fwd.submit_write(data, offset), data))
    assert fwd.barrier(10)
    assert all(t.done and t.ok for t, _ in ops)  # done before the barrier returned
    model = bytearray(SIZE)
    apply_in_order(model, ops)
    assert_same(read_all(server.uri), model)
    assert fwd.stats["flushes"] == 1


def test_small_queued_writes_go_as_one_record_and_settle_together(batch_server, make_fwd):
    """Released together, small writes (overlapping ones included) go as batch records, in
    order; a FUA write and a large one go alone; every ticket is settled."""
    fwd, failures = make_fwd(batch_server.uri, batch=True)
    rng = random.Random(11)
    fwd.hold()
    ops: list[Op] = [(fwd.submit_write(d, off), d) for off, d in
                     [(rng.randrange(0, MiB), rng.randbytes(rng.randrange(1, 9000)))
                      for _ in range(100)]]
    ops.append((fwd.submit_write(b"F" * 4096, 4096, fua=True), b"F" * 4096))
    ops.append((fwd.submit_write(b"L" * (128 << 10), 0), b"L" * (128 << 10)))
    ops += [(fwd.submit_write(b"s" * 512, 1000), b"s" * 512)]
    assert fwd.in_flight == 0
    fwd.release()
    assert all(t.wait(10) for t, _ in ops)
    model = bytearray(SIZE)
    apply_in_order(model, ops)
    assert_same(read_all(batch_server.uri, 2 * MiB), model[:2 * MiB])
    assert fwd.stats["batches"] >= 1 and fwd.stats["writes"] == len(ops)
    assert fwd.stats["bytes"] == sum(len(d) for _, d in ops if d is not None)
    assert failures.calls == [] and (fwd.in_flight, fwd.queued, fwd.in_flight_bytes) == (0, 0, 0)


def test_overlap_index_of_records_in_flight() -> None:
    """Records in flight are indexed by GRAIN block: a write sharing a byte with one of
    their parts always waits, one sharing only a block may wait, others never do; the
    index empties as records retire."""
    index = OverlapIndex()
    rng = random.Random(4)
    records = [[(rng.randrange(0, 1 << 22), rng.randrange(1, BATCH_PIECE_MAX))
                for _ in range(rng.randrange(1, 20))] for _ in range(4)]
    indexed = [index.add(parts) for parts in records]
    blocks = {g for parts in records for o, n in parts
              for g in range(o // GRAIN, (o + n - 1) // GRAIN + 1)}
    for _ in range(3000):
        start = rng.randrange(0, 1 << 22)
        end = start + int(2 ** rng.uniform(0, 26))
        hit = index.hits(start, end)
        assert hit == any(start // GRAIN <= g <= (end - 1) // GRAIN for g in blocks)
        if any(o < end and start < o + n for parts in records for o, n in parts):
            assert hit
    for grains in indexed:
        index.remove(grains)
    assert index.records == []


def test_held_writes_reach_the_server_only_after_release(server, make_fwd):
    fwd, failures = make_fwd(server.uri, timeout=1.0)
    rng = random.Random(3)
    before = [(fwd.submit_write(d, o), d)
              for o, d in ((o, rng.randbytes(65536)) for o in range(0, 4 * MiB, MiB))]
    fwd.hold()
    held = [(fwd.submit_write(d, o + 4096), d)
            for o, d in ((o, rng.randbytes(65536)) for o in range(0, 4 * MiB, MiB))]
    assert fwd.barrier(5)  # checkpoint order: hold, then barrier
    model = bytearray(SIZE)
    apply_in_order(model, before)
    assert_same(read_all(server.uri), model)
    time.sleep(1.3)  # longer than timeout: held requests do not time out while held
    assert not any(t.done for t, _ in held)
    assert (fwd.in_flight, fwd.queued) == (0, len(held))
    assert_same(read_all(server.uri), model)
    fwd.release()
    assert all(t.wait(5) for t, _ in held)
    apply_in_order(model, held)
    assert_same(read_all(server.uri), model)
    assert failures.calls == [] and not fwd.failed


def test_release_sends_held_writes_in_order(server, make_fwd):
    fwd, _ = make_fwd(server.uri)
    fwd.hold()
    ops = [(fwd.submit_write(bytes([i]) * 8192, 1000 * i), bytes([i]) * 8192) for i in range(20)]
    ops.append((fwd.submit_zero(3000, 5000), None))
    time.sleep(0.1)
    assert read_all(server.uri, MiB) == bytes(MiB)
    fwd.release()
    assert fwd.barrier(5)
    model = bytearray(SIZE)
    apply_in_order(model, ops)
    assert_same(read_all(server.uri), model)


# -- failures ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_killed_server_fails_every_waiter_and_reports_unacknowledged_ranges(servers, make_fwd,
                                                                           tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    srv = servers("file", str(disk))
    timeout = 2.0
    fwd, failures = make_fwd(srv.uri, timeout=timeout)
    nthreads, block = 8, 8192
    ops: list[Op] = []
    lock = threading.Lock()
    finished_at: list[float] = []

    def writer(i: int) -> None:
        rng = random.Random(i)
        mine: list[Op] = []
        blocks = iter(range(i, SIZE // block, nthreads))  # every write owns its block
        while True:
            burst = []
            for _ in range(4):  # a few unwaited ones: in flight and queued at the kill
                data = rng.randbytes(rng.randrange(512, block))
                burst.append((fwd.submit_write(data, next(blocks) * block), data))
            mine.extend(burst)
            if not all([t.wait(timeout) for t, _ in burst]):
                break
            time.sleep(0.001)
        finished_at.append(time.monotonic())
        data = b"late"
        mine.append((fwd.submit_write(data, next(blocks) * block), data))
        with lock:
            ops.extend(mine)

    threads = threading.Thread(target=run_threads, args=(nthreads, writer))
    threads.start()
    time.sleep(0.3)
    srv.signal(signal.SIGSTOP)  # so that some writes are surely in flight at the kill:
    time.sleep(0.2)             # replies already sent are read, the writers' next bursts stay
    deadline = time.monotonic() + 1.0
    while fwd.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    srv.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    threads.join(30)
    assert not threads.is_alive()
    assert max(finished_at) - killed_at <= timeout + 1
    assert fwd.failed and fwd.error
    assert len(failures.calls) == 1
    error, ranges = failures.calls[0]
    assert error == fwd.error and srv.uri in error
    assert all(t.done for t, _ in ops)
    unacked = sorted((t.offset, t.length) for t, _ in ops if not t.ok and not t.rejected)
    assert ranges and sorted(ranges) == unacked
    assert any(t.rejected for t, _ in ops)  # the late ones
    reported = set(ranges) | {(t.offset, t.length) for t, _ in ops if t.rejected}
    fd = os.open(disk, os.O_RDONLY)
    try:
        for t, data in ops:
            on_disk = os.pread(fd, t.length, t.offset) == data
            if t.ok:
                assert on_disk, f"{t} acknowledged but not on the server"
            elif not on_disk:
                assert (t.offset, t.length) in reported, f"{t} lost without being reported"
    finally:
        os.close(fd)
    assert sum(t.ok for t, _ in ops) > 0


class DirtyDisk:
    """A write-back source like the async primary's: a local copy and its dirty blocks.

    ``write`` changes the local copy and marks the block (or, ``push``, also submits it
    directly, like a sync write or a resync piece, in the same critical section);
    ``next_pieces`` is the forwarder's source: the lowest dirty blocks, read and cleared."""

    BLOCK = 4096

    def __init__(self, size: int) -> None:
        self.local = bytearray(size)
        self.dirty: set[int] = set()
        self.lock = threading.Lock()
        self.pieces: list[tuple[int, int]] = []
        self.calls = 0
        self.fwd: Forwarder | None = None

    def write(self, offset: int, data: bytes, push: bool = False) -> None:
        assert self.fwd is not None
        with self.lock:
            self.local[offset:offset + len(data)] = data
            if push:
                self.fwd.submit_write(data, offset)
            else:
                first, last = offset // self.BLOCK, (offset + len(data) - 1) // self.BLOCK
                self.dirty.update(range(first, last + 1))
        self.fwd.pull()

    def next_pieces(self, count: int, budget: int) -> Pieces:
        """Like the primary's: the pieces come with the lock still held, released by the
        forwarder once it has placed them in its order."""
        self.lock.acquire()
        self.calls += 1
        if not self.dirty:
            self.lock.release()
            return None
        pieces = []
        for block in sorted(self.dirty)[:min(count, -(-budget // self.BLOCK))]:
            offset = block * self.BLOCK
            self.dirty.discard(block)
            self.pieces.append((offset, self.BLOCK))
            pieces.append((offset, bytearray(self.local[offset:offset + self.BLOCK])))
            if self.ends_round(block):
                break
        return pieces, self.lock.release

    def ends_round(self, block: int) -> bool:
        """True if a round taking ``block`` ends with it."""
        return False


def test_pulled_pieces_and_pushed_writes_land_in_order(any_server, make_fwd):
    """Writers mark blocks and push writes over a small region; the barrier then covers
    both, and the server holds exactly the local copy (pieces never overtake a push of
    older bytes, nor the reverse)."""
    disk = DirtyDisk(SIZE)
    fwd, failures = make_fwd(any_server.uri, source=disk.next_pieces, pull_delay=0.001,
                             batch=any_server.batch)
    disk.fwd = fwd
    region = 2 * MiB

    def writer(i: int) -> None:
        rng = random.Random(100 + i)
        for _ in range(60):
            length = rng.randrange(1, 3 * DirtyDisk.BLOCK)
            disk.write(rng.randrange(0, region - length), rng.randbytes(length),
                       push=rng.random() < 0.3)

    run_threads(6, writer)
    assert fwd.barrier(10)
    assert not disk.dirty
    assert_same(read_all(any_server.uri, region), disk.local[:region])
    assert failures.calls == [] and (fwd.in_flight, fwd.queued) == (0, 0)
    assert len(disk.pieces) > 0 and fwd.stats["pulled"] == len(disk.pieces)
    assert (fwd.stats["batches"] > 0) is any_server.batch  # records: pieces share requests


class RacingDirtyDisk(DirtyDisk):
    """A source whose every fourth block is rewritten and pushed the moment the forwarder
    unlocks it (as a resync copy can when a guest write re-dirties it meanwhile): the
    push carries newer bytes than the piece, so it must land after it.  Batched, a record
    then ends at the piece and the next starts after the push."""

    def ends_round(self, block: int) -> bool:
        return block % 4 == 0  # a block to rewrite ends its round, so placed() can

    def next_pieces(self, count: int, budget: int) -> Pieces:
        got = super().next_pieces(count, budget)
        if got is None or got[0][-1][0] // self.BLOCK % 4:
            return got
        pieces, release = got
        offset = pieces[-1][0]

        def placed() -> None:
            release()
            self.write(offset, bytes([len(self.pieces) % 250 + 1]) * self.BLOCK, push=True)

        return pieces, placed


@pytest.mark.parametrize("batch", [False, True])
def test_push_after_a_piece_was_read_lands_after_it(servers, batch_server, make_fwd, batch):
    srv = batch_server if batch else servers("memory", str(SIZE))
    disk = RacingDirtyDisk(SIZE)
    fwd, failures = make_fwd(srv.uri, source=disk.next_pieces, batch=batch)
    disk.fwd = fwd
    with disk.lock:
        for block in range(40):
            disk.local[block * 4096:(block + 1) * 4096] = b"\xee" * 4096
            disk.dirty.add(block)
    assert fwd.barrier(10)
    assert_same(read_all(srv.uri, MiB), disk.local[:MiB])
    assert failures.calls == []
    assert (fwd.stats["batches"] > 0) is batch


def test_barrier_waits_until_the_source_runs_dry(servers, make_fwd):
    """A barrier arriving with pieces still at the source sends them all first."""
    srv = servers("--filter=delay", "memory", str(SIZE), "delay-write=100ms")
    disk = DirtyDisk(SIZE)
    fwd, failures = make_fwd(srv.uri, source=disk.next_pieces, window=2)
    disk.fwd = fwd
    with disk.lock:  # marked without a pull: only the barrier makes the forwarder look
        for block in range(6):
            disk.local[block * 4096:(block + 1) * 4096] = bytes([block + 1]) * 4096
            disk.dirty.add(block)
    t0 = time.monotonic()
    assert fwd.barrier(10)
    assert time.monotonic() - t0 >= 0.3  # 6 pieces, 2 in flight at a time, 100 ms each
    assert disk.pieces == [(b * 4096, 4096) for b in range(6)]
    assert read_all(srv.uri, MiB)[:6 * 4096] == bytes(disk.local[:6 * 4096])
    assert fwd.stats["writes"] == 6 and fwd.stats["flushes"] == 1
    assert failures.calls == []


def test_source_wake_is_a_pull_rearmed_before_the_forwarder_looks(server, make_fwd):
    """The C fast path's way to ask for a pull (forwarder.SourceWake): its eventfd
    becoming readable is a pull, and the forwarder rearms it just before it looks; marks
    made with no wake-up wait (as marks without ``pull()`` do), and so do those whose
    wake-up an earlier forwarder left unread (a link comes up for a copy that sends them:
    pulled too, they would race a paced resync)."""
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    os.eventfd_write(wake_fd, 1)                     # left by an earlier forwarder
    rearms: list[int] = []
    disk = DirtyDisk(SIZE)
    try:
        fwd, failures = make_fwd(server.uri, source=disk.next_pieces,
                                 source_wake=(wake_fd, lambda: rearms.append(disk.calls)))
        disk.fwd = fwd
        with disk.lock:
            for block in range(4):
                disk.local[block * 4096:(block + 1) * 4096] = bytes([block + 1]) * 4096
                disk.dirty.add(block)
        time.sleep(0.2)
        assert (disk.calls, rearms, len(disk.dirty)) == (0, [], 4)   # nobody asked
        os.eventfd_write(wake_fd, 1)
        deadline = time.monotonic() + 5
        while disk.dirty and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not disk.dirty and rearms[:1] == [0]      # rearmed before the first look
        assert fwd.barrier(5)
        assert read_all(server.uri, MiB)[:4 * 4096] == bytes(disk.local[:4 * 4096])
        assert disk.pieces == [(b * 4096, 4096) for b in range(4)]
        assert failures.calls == []
    finally:
        os.close(wake_fd)


@pytest.mark.parametrize("batch", [False, True])
def test_failure_reports_the_pieces_taken_but_not_acknowledged(servers, make_fwd, tmp_path,
                                                                batch):
    """Batched, the three pieces go as one record, and a failure reports the pieces, not
    the span they lie in."""
    img = tmp_path / "slow.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    srv = servers("--filter=delay", "python", str(BATCH_SERVER), f"file={img}",
                  "delay-write=2")
    disk = DirtyDisk(SIZE)
    fwd, failures = make_fwd(srv.uri, source=disk.next_pieces, timeout=5.0, batch=batch)
    disk.fwd = fwd
    with disk.lock:
        for block in (3, 9, 20):
            disk.local[block * 4096:(block + 1) * 4096] = b"x" * 4096
            disk.dirty.add(block)
    fwd.pull()
    assert eventually(lambda: len(disk.pieces) == 3)
    assert fwd.in_flight == (1 if batch else 3)
    srv.kill()
    # ``failed`` is published just before on_failure runs on the I/O thread: wait for both.
    assert eventually(lambda: fwd.failed and len(failures.calls) == 1)
    assert len(failures.calls) == 1
    assert sorted(failures.calls[0][1]) == [(3 * 4096, 4096), (9 * 4096, 4096),
                                            (20 * 4096, 4096)]


def test_stopped_server_times_out_a_waiting_writer(server, make_fwd):
    fwd, failures = make_fwd(server.uri, timeout=1.0)
    assert fwd.submit_write(b"a" * 4096, 0).wait(5)
    server.stop()
    start = time.monotonic()
    t = fwd.submit_write(b"b" * 4096, 8192)
    assert t.wait(10) is False
    assert time.monotonic() - start < 1.5
    assert fwd.failed and "did not acknowledge write [8192, 12288) within 1.0s" in fwd.error
    assert failures.calls == [(fwd.error, [(8192, 4096)])]
    late = fwd.submit_write(b"c" * 4096, 0)
    assert late.done and not late.ok and late.rejected and late.wait(1) is False


def test_expired_wait_fails_the_forwarder(server, make_fwd):
    """A caller's shorter wait is a verdict too: it returns on time and the ranges are reported."""
    fwd, failures = make_fwd(server.uri, timeout=30.0)
    server.stop()
    start = time.monotonic()
    tickets = [fwd.submit_write(b"z" * 4096, i * 4096) for i in range(3)]
    assert tickets[0].wait(0.5) is False
    assert time.monotonic() - start < 0.8
    assert fwd.failed and "within 0.5s" in fwd.error
    assert all(t.done and not t.ok for t in tickets)
    assert failures.calls == [(fwd.error, [(0, 4096), (4096, 4096), (8192, 4096)])]
    assert fwd.barrier(1) is False


def test_write_error_from_the_server_fails_the_forwarder(servers, make_fwd, tmp_path):
    trigger = tmp_path / "fail-writes"
    srv = servers("--filter=error", "memory", str(SIZE), "error-pwrite=EIO",
                  "error-pwrite-rate=100%", f"error-pwrite-file={trigger}")
    fwd, failures = make_fwd(srv.uri)
    assert fwd.submit_write(b"a" * 4096, 0).wait(5)
    trigger.touch()
    t = fwd.submit_write(b"b" * 4096, 4096)
    assert t.wait(5) is False
    assert "failed write [4096, 8192): Input/output error" in fwd.error
    assert failures.calls == [(fwd.error, [(4096, 4096)])]
    assert fwd.stats["errors"] == 1


def test_close_aborts_held_requests_and_reports_them(server, make_fwd):
    fwd, failures = make_fwd(server.uri)
    fwd.hold()
    t = fwd.submit_write(b"q" * 100, 12345)
    fwd.close()
    fwd.close()
    assert t.done and not t.ok
    assert failures.calls == [(fwd.error, [(12345, 100)])] and "closed with 1" in fwd.error
    assert fwd.submit_flush().rejected


def test_clean_close_reports_nothing(server, make_fwd):
    fwd, failures = make_fwd(server.uri)
    assert fwd.submit_write(b"q" * 100, 0).wait(5)
    fwd.close()
    assert failures.calls == [] and not fwd.failed
    assert fwd.submit_write(b"r", 0).rejected


# -- connecting -------------------------------------------------------------------------


def test_connect_to_a_missing_socket_names_the_uri(tmp_path):
    uri = f"nbd+unix:///replica?socket={tmp_path}/nobody.sock"
    want = re.escape(f"secondary {uri} does not answer: ") + ".*ENOENT"
    with pytest.raises(ForwardError, match=want):
        Forwarder(uri).connect()


def test_connect_to_a_socket_nobody_listens_on(tmp_path):
    path = tmp_path / "deaf.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: connection refused
    try:
        uri = f"nbd+unix:///replica?socket={path}"
        want = re.escape(f"secondary {uri} does not answer: ") + ".*ECONNREFUSED"
        with pytest.raises(ForwardError, match=want):
            Forwarder(uri).connect()
    finally:
        s.close()


def test_connect_to_a_silent_server_times_out(tmp_path):
    path = tmp_path / "silent.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()  # accepts into the backlog, never speaks NBD
    try:
        uri = f"nbd+unix:///replica?socket={path}"
        start = time.monotonic()
        with pytest.raises(ForwardError, match="does not answer: no NBD handshake within 0.5s"):
            Forwarder(uri, timeout=0.5).connect()
        assert time.monotonic() - start < 1.5
    finally:
        s.close()


def test_reconnect_after_failure(servers, make_fwd):
    srv = servers("memory", str(SIZE))
    fwd, failures = make_fwd(srv.uri)
    with pytest.raises(ForwardError, match="already connected"):
        fwd.connect()
    assert fwd.submit_write(b"1" * 4096, 0).wait(5)
    srv.kill()
    assert fwd.submit_write(b"2" * 4096, 0).wait(5) is False  # failed or already rejected
    assert eventually(lambda: len(failures.calls) == 1) and fwd.failed
    with pytest.raises(ForwardError, match="does not answer"):
        fwd.connect()
    srv2 = servers("memory", str(SIZE))
    assert srv2.uri == srv.uri
    fwd.connect()
    assert not fwd.failed and fwd.error is None
    assert fwd.submit_write(b"3" * 4096, 4096).wait(5)
    assert fwd.barrier(5)
    assert read_all(srv2.uri, 8192) == bytes(4096) + b"3" * 4096
    assert len(failures.calls) == 1


def test_export_suffix_is_appended_to_the_export_name(servers, make_fwd):
    srv = servers("--filter=exportname", "memory", str(MiB), "exportname=replica-d0",
                  "exportname-strict=true", export="replica-d0")
    base = srv.uri.replace("/replica-d0?", "/replica?")
    with pytest.raises(ForwardError, match="does not answer"):
        Forwarder(base).connect()
    fwd, _ = make_fwd(base, export_suffix="-d0")
    assert fwd.uri == srv.uri
    assert fwd.size == MiB
    assert fwd.submit_write(b"s" * 512, 0).wait(5)


def test_with_export_suffix_quotes_the_suffix():
    assert with_export_suffix("nbd+unix:///replica?socket=/x", "") == \
        "nbd+unix:///replica?socket=/x"
    assert with_export_suffix("nbd+unix:///replica?socket=/x", "-a b") == \
        "nbd+unix:///replica-a%20b?socket=/x"
    assert with_export_suffix("nbd://127.0.0.1:10809", "d") == "nbd://127.0.0.1:10809/d"


# -- throughput ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_throughput_4k_random_writes_16_threads(server, make_fwd):
    """Prints writes/s (run with -s); asserts only that every write was acknowledged."""
    fwd, _ = make_fwd(server.uri)
    seconds, nthreads = 2.0, 16
    counts = [0] * nthreads

    def writer(i: int) -> None:
        rng = random.Random(i)
        buf = rng.randbytes(4096)
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            assert fwd.submit_write(buf, rng.randrange(SIZE // 4096) * 4096).wait(5)
            n += 1
        counts[i] = n

    start = time.monotonic()
    run_threads(nthreads, writer)
    rate = sum(counts) / (time.monotonic() - start)
    print(f"\nforwarder: {rate:,.0f} random 4 KiB writes/s, {nthreads} threads waiting "
          "for each acknowledgement, nbdkit memory over a Unix socket")
    assert fwd.stats["writes"] == sum(counts) and not fwd.failed
