"""Threads against one SecondaryReplica: primary writers, VM readers, a checkpointer.

Every cluster always holds a *stamp*: a 16-byte record (cluster index, generation) repeated
over the whole cluster.  Generations come from one global counter; each cluster is owned by
exactly one writer thread, so a cluster's generations on the disk only ever increase.

Invariants, all exact:

1. No torn or misplaced clusters: every cluster read through ``active`` is one stamp,
   repeated, carrying its own index.
2. Snapshots are right.  Checkpoint k's snapshot ``S[k]`` is read through ``active`` by the
   checkpointer right after ``checkpoint()`` returns (no other thread checkpoints, and there
   are no VM writes, so until checkpoint k+1 the active view must be exactly the disk at
   checkpoint k).  It is checked independently of the implementation: for each cluster,
   ``done[c]`` copied *before* the checkpoint started <= ``S[k][c]`` <= ``started[c]`` copied
   *after* it returned, and ``S[k][c]`` is a generation actually written to c (or 0).  A
   write that finished before the checkpoint must be in it; one not yet begun after it cannot.
   A primary write leaking into the VM's view before the next checkpoint would show as a
   generation above ``started[c]`` at the time of the checkpoint.
3. Reads are atomic with respect to checkpoints and see only checkpoints they could have
   observed: a reader notes ``a`` = the last published snapshot before its read and ``b`` =
   the number of checkpoints begun after it; every read must equal ``S[j]`` on all of its
   clusters for one single j in [a, b].
4. Failover: after the threads stop, the VM writes a few clusters, the secondary fails over,
   and the disk file must be exactly ``S[last]`` plus the VM's writes (the primary's writes
   since the last checkpoint are gone), byte for byte.
"""

from __future__ import annotations

import itertools
import random
import struct
import threading
import time
from pathlib import Path

import pytest

from repdisk.replication.framework import ReplicationMode
from repdisk.replication.stage import Stage
from tests.helpers.replicas import make_replica, read

CS = 4096
CLUSTERS = 128
SIZE = CS * CLUSTERS
WRITERS, READERS = 3, 3
RUN_SECONDS = 3.0
BLOCK = CLUSTERS // WRITERS  # writer w owns clusters [w * BLOCK, (w + 1) * BLOCK)


def stamp(cluster: int, gen: int) -> bytes:
    return struct.pack("<QQ", cluster, gen) * (CS // 16)


def stamps_of(data: bytes, first: int) -> list[int]:
    """The generation of each cluster in ``data`` (starting at cluster ``first``); torn fails."""
    gens = []
    for i in range(len(data) // CS):
        cluster, gen = struct.unpack_from("<QQ", data, i * CS)
        assert cluster == first + i, f"cluster {first + i} holds cluster {cluster}'s data"
        assert data[i * CS:(i + 1) * CS] == stamp(cluster, gen), f"cluster {cluster} is torn"
        gens.append(gen)
    return gens


class Harness:
    def __init__(self, sec) -> None:
        self.sec = sec
        self.gens = itertools.count(1)
        self.started = [0] * CLUSTERS          # last generation whose write began
        self.done = [0] * CLUSTERS             # last generation whose write returned
        self.written: list[set[int]] = [{0} for _ in range(CLUSTERS)]
        self.snapshots: list[list[int]] = [[0] * CLUSTERS]  # S[0]: the disk at start
        self.published = 0                     # highest k with S[k] in snapshots
        self.begun = 0                         # checkpoints begun
        self.observations: list[tuple[int, int, int, list[int]]] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.counts = {"writes": 0, "reads": 0}

    def run(self, target, *args) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as err:  # noqa: BLE001 - reported by the test thread
                self.errors.append(err)
                self.stop.set()
        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        return thread

    def writer(self, w: int) -> None:
        rng = random.Random(w)
        lo, hi = w * BLOCK, (w + 1) * BLOCK
        while not self.stop.is_set():
            first = rng.randrange(lo, hi)
            count = rng.randint(1, min(4, hi - first))
            gen = next(self.gens)
            for c in range(first, first + count):
                self.written[c].add(gen)
                self.started[c] = gen
            data = b"".join(stamp(c, gen) for c in range(first, first + count))
            self.sec.replica_view.pwrite(data, first * CS)
            for c in range(first, first + count):
                self.done[c] = gen
            self.counts["writes"] += 1

    def reader(self, r: int) -> None:
        rng = random.Random(100 + r)
        while not self.stop.is_set():
            first = rng.randrange(CLUSTERS)
            count = rng.randint(1, min(8, CLUSTERS - first))
            a = self.published
            data = read(self.sec.active_view, first * CS, count * CS)
            b = self.begun
            self.observations.append((a, b, first, stamps_of(data, first)))
            self.counts["reads"] += 1

    def checkpointer(self) -> None:
        while not self.stop.is_set():
            time.sleep(0.01)
            self.begun += 1
            lo = list(self.done)
            self.sec.checkpoint()
            hi = list(self.started)
            snap = stamps_of(read(self.sec.active_view), 0)
            for c in range(CLUSTERS):
                assert lo[c] <= snap[c] <= hi[c], (c, lo[c], snap[c], hi[c])
                assert snap[c] in self.written[c]
            self.snapshots.append(snap)
            self.published = self.begun

    def check_observations(self) -> None:
        for a, b, first, gens in self.observations:
            fits = [j for j in range(a, b + 1)
                    if self.snapshots[j][first:first + len(gens)] == gens]
            assert fits, f"read of clusters {first}.. saw {gens}, no snapshot in [{a}, {b}]"


@pytest.mark.timeout(60)
def test_concurrent_writes_reads_checkpoints_then_failover(tmp_path: Path) -> None:
    initial = b"".join(stamp(c, 0) for c in range(CLUSTERS))
    sec = make_replica(tmp_path, SIZE, CS, fill=initial)
    try:
        sec.start(ReplicationMode.SECONDARY)
        h = Harness(sec)
        threads = [h.run(h.writer, w) for w in range(WRITERS)]
        threads += [h.run(h.reader, r) for r in range(READERS)]
        threads.append(h.run(h.checkpointer))
        h.stop.wait(RUN_SECONDS)
        h.stop.set()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive(), "a thread is stuck"
        assert not h.errors, h.errors
        # Each side did real work, so the invariants were exercised, not vacuous.
        assert len(h.snapshots) >= 20, len(h.snapshots)
        assert h.counts["writes"] >= 200 and h.counts["reads"] >= 200, h.counts
        h.check_observations()
        assert stamps_of(read(sec.replica_view), 0) == h.done  # the disk: every write, in order

        # The VM writes a few clusters; failover keeps them over the last checkpoint.
        expected = [stamp(c, g) for c, g in enumerate(h.snapshots[-1])]
        for c in range(0, CLUSTERS, 9):
            expected[c] = stamp(c, 10**9 + c)
            sec.active_view.pwrite(expected[c], c * CS)
        sec.stop(True)
        assert sec.stage is Stage.DONE
        want = b"".join(expected)
        assert (tmp_path / "disk0.img").read_bytes() == want
        assert read(sec.active_view) == want and read(sec.replica_view) == want
    finally:
        sec.close()
