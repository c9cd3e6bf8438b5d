"""The primary's fast path (nbdplugin/repdisk-fast.c, repdisk.replication.fastpath).

Real nodes started as ``repdisk`` starts them (with the filter that ``make setup`` builds).
What is checked, for sync and async primaries: the states in which the filter serves
writes itself (armed) and those in which every write goes through the plugin, exact bytes
on both disks under concurrent and overlapping writes, and that a secondary that dies,
hangs or fences the primary while fast writes are under way loses no acknowledged write
and lets no fenced write through; for async, that the filter keeps to max-lag and hands
writes to the plugin when its mark log is full.
"""

from __future__ import annotations

import signal
import threading
import time

import nbd
import pytest

from tests.helpers.commands import sigstop
from tests.helpers.nodes import (
    SIZE,
    MiB,
    NodeProc,
    Nodes,
    checkpoint,
    kill9,
    make_disk,
    random_bytes,
    read_export,
    start_pair,
)

BLOCK = 4096


def disk(node: NodeProc) -> dict:
    return node.ctl("query-replication")["disks"][0]  # type: ignore[index]


def fast(node: NodeProc) -> dict:
    return disk(node)["fast_path"]


def aio_write_all(h: nbd.NBD, writes: list[tuple[bytes, int]], depth: int = 32) -> None:
    """Issue ``writes`` (data, offset) with up to ``depth`` in flight; every one must
    succeed (aio_command_completed raises the error of one that failed)."""
    pending = list(writes)
    cookies: list[int] = []
    while pending or cookies:
        while pending and len(cookies) < depth:
            data, offset = pending.pop(0)
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset))
        h.poll(-1)
        cookies = [c for c in cookies if not h.aio_command_completed(c)]
    h.flush()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_concurrent_overlapping_writes_reach_both_disks_identically(nodes: Nodes,
                                                                    mode: str) -> None:
    """32 writes in flight from one client, and a second client writing the same blocks:
    overlapping writes may land in any order, but in the same order on both disks (async:
    once a checkpoint has sent what is unsent)."""
    pri, sec = start_pair(nodes, write_mode=mode)
    data = random_bytes(7, 64 * BLOCK)
    writes = [(data[(i % 64) * BLOCK:(i % 64 + 1) * BLOCK], (i * 7 % 48) * BLOCK)
              for i in range(600)]
    other = [(bytes([i % 251]) * BLOCK, (i * 5 % 48) * BLOCK) for i in range(300)]
    a, b = pri.client(), pri.client()
    try:
        second = threading.Thread(target=aio_write_all, args=(b, other))
        second.start()
        aio_write_all(a, writes)
        second.join()
    finally:
        a.shutdown()
        b.shutdown()
    state = fast(pri)
    assert (state["armed"], state["writes"]) == (1, 900)
    if mode == "async":
        checkpoint(pri, sec)
    assert disk(pri)["counters"]["writes"] == 900
    assert (disk(pri)["dirty_bytes"], disk(pri)["lag_bytes"]) == (0, 0)
    assert read_export(pri) == read_export(sec, "replica")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_which_states_arm_the_fast_path(nodes: Nodes, mode: str) -> None:
    """Armed only while a write's route is the mode's (sync FORWARD, async WRITE_BACK) and
    nothing else needs every write to come through the plugin: not before start, not
    during a checkpoint hold, not while degraded or stopped; a write the plugin served is
    counted, not the filter's.  A hung secondary degrades a sync pair at the write, an
    async one only when the forwarder's deadline passes (the write is local).  After the
    resync, a checkpoint leaves both disks equal."""
    sec = nodes.secondary(make_disk(f"{nodes.folder}/sec.img", SIZE))
    sec.ctl("replication-start", mode="secondary")
    pri = nodes.primary(make_disk(f"{nodes.folder}/pri.img", SIZE), sec, timeout="2s",
                        write_mode=mode)
    h = pri.client()
    table = []

    def step(what: str) -> None:
        before = fast(pri)["writes"]
        h.pwrite(bytes([len(table) + 1]) * BLOCK, len(table) * BLOCK)
        state = fast(pri)
        table.append((what, state["armed"], state["writes"] - before))

    try:
        step("not started")
        pri.ctl("replication-start", mode="primary")
        step("running")
        pri.ctl("replication-do-checkpoint")   # a hold: sync writes wait for its end
        before = fast(pri)["writes"]
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x99" * BLOCK)), 100 * BLOCK)
        table.append(("holding", fast(pri)["armed"], 0))
        sec.ctl("replication-do-checkpoint")
        pri.ctl("replication-resume")
        while h.aio_in_flight():
            h.poll(-1)
        assert fast(pri)["writes"] == before   # the plugin served it
        step("resumed")
        pri.ctl("replication-verify")
        step("after a verify")
        sigstop(sec.proc)
        step("secondary hung")
        deadline = time.monotonic() + 10
        while not disk(pri)["degraded"] and time.monotonic() < deadline:
            time.sleep(0.05)
        sec.proc.send_signal(signal.SIGCONT)
        step("degraded")
        pri.ctl("replication-resync")
        step("resynced")
        checkpoint(pri, sec)
        assert read_export(pri) == read_export(sec, "replica")
        pri.ctl("replication-stop", failover=True)
        step("stopped")
    finally:
        h.shutdown()
    assert table == [
        ("not started", 0, 0),
        ("running", 1, 1),
        ("holding", 0, 0),
        ("resumed", 1, 1),
        ("after a verify", 1, 1),
        ("secondary hung", 0, 0) if mode == "sync" else ("secondary hung", 1, 1),
        ("degraded", 0, 0),
        ("resynced", 1, 1),
        ("stopped", 0, 0),
    ]


def test_a_hung_secondary_degrades_the_pair_and_loses_no_acknowledged_write(
        nodes: Nodes) -> None:
    """A fast write whose secondary does not answer within the timeout is acknowledged
    from the local disk within about the timeout, marked dirty, and the link degrades;
    the resync then brings the secondary to exactly the primary's bytes."""
    pri, sec = start_pair(nodes, timeout="1s")
    h = pri.client()
    try:
        h.pwrite(b"\x11" * BLOCK, 0)
        assert fast(pri)["writes"] == 1
        sigstop(sec.proc)
        began = time.monotonic()
        h.pwrite(b"\x22" * BLOCK, 8 * BLOCK)
        took = time.monotonic() - began
        q = disk(pri)
        assert (q["degraded"], q["fast_path"]["armed"], q["counters"]["forward_errors"]) == (
            True, 0, 1)
        assert q["dirty_bytes"] >= BLOCK
        assert 0.9 < took < 3.0, took
        h.pwrite(b"\x33" * BLOCK, 16 * BLOCK)           # degraded: local and dirty
        sec.proc.send_signal(signal.SIGCONT)
        pri.ctl("replication-resync")
        assert disk(pri)["dirty_bytes"] == 0
    finally:
        h.shutdown()
    data = read_export(pri)
    assert data[:BLOCK] == b"\x11" * BLOCK
    assert data[8 * BLOCK:9 * BLOCK] == b"\x22" * BLOCK
    assert data[16 * BLOCK:17 * BLOCK] == b"\x33" * BLOCK
    assert read_export(sec, "replica") == data
    checkpoint(pri, sec)


def test_a_killed_secondary_loses_no_acknowledged_write(nodes: Nodes) -> None:
    """kill -9 of the secondary under fast writes at queue depth 16: every write is
    acknowledged, the ones that did not reach it are dirty, and a new secondary on the
    same disk receives them by resync."""
    pri, sec = start_pair(nodes, timeout="2s")
    data = random_bytes(3, 256 * BLOCK)
    h = pri.client()
    try:
        aio_write_all(h, [(data[i * BLOCK:(i + 1) * BLOCK], i * BLOCK) for i in range(128)],
                      depth=16)
        kill9(sec)
        aio_write_all(h, [(data[i * BLOCK:(i + 1) * BLOCK], i * BLOCK)
                          for i in range(128, 256)], depth=16)
        q = disk(pri)
        assert (q["degraded"], q["fast_path"]["armed"]) == (True, 0)
        assert q["counters"]["writes"] == 256
        sec = nodes.secondary(sec.disks[0])
        sec.ctl("replication-start", mode="secondary")
        pri.ctl("replication-resync")
        assert (disk(pri)["dirty_bytes"], fast(pri)["armed"]) == (0, 1)
        before = fast(pri)["writes"]
        h.pwrite(b"\x44" * BLOCK, 0)
        assert fast(pri)["writes"] == before + 1
    finally:
        h.shutdown()
    assert read_export(pri)[BLOCK:256 * BLOCK] == data[BLOCK:]
    assert read_export(sec, "replica") == read_export(pri)


def test_an_open_fast_connection_is_refused_after_a_failover_and_the_primary_fences(
        nodes: Nodes) -> None:
    """The filter's connection to the secondary was open before the failover: its next
    write is refused by the secondary's fence, the primary learns that it lost and fences
    itself, and the guest's write fails (never acknowledged by two nodes in one epoch)."""
    pri, sec = start_pair(nodes, timeout="2s")
    g = pri.client()
    try:
        g.pwrite(b"\x55" * BLOCK, 0)
        assert fast(pri)["writes"] == 1
        checkpoint(pri, sec)
        sec.ctl("replication-stop", failover=True)
        before = read_export(sec, "replica")
        with pytest.raises(nbd.Error, match="Operation not permitted"):
            g.pwrite(b"\x77" * BLOCK, 0)
    finally:
        g.shutdown()
    assert read_export(sec, "replica") == before
    q = pri.ctl("query-replication")
    assert q["fenced"], q                            # type: ignore[index]
    assert q["disks"][0]["fast_path"]["armed"] == 0  # type: ignore[index]


def test_async_fast_writes_keep_to_max_lag(nodes: Nodes) -> None:
    """The secondary hangs (timeout long enough not to degrade): once the forwarder has
    its fill in flight (at most 16 MiB and a batch), unsent bytes grow to max-lag and no
    further; writers wait, and all go on once the secondary does.  Without the filter's
    own check its writes would not wait: they never ask the plugin."""
    size = 64 * MiB
    pri, sec = start_pair(nodes, size=size, write_mode="async", timeout="60s",
                          max_lag="1M")
    sigstop(sec.proc)
    data = random_bytes(11, 8192 * BLOCK)
    writes = [(data[i * BLOCK:(i + 1) * BLOCK], i * BLOCK) for i in range(8192)]
    h = pri.client()
    writer = threading.Thread(target=aio_write_all, args=(h, writes, 16))
    try:
        writer.start()
        most = 0
        for _ in range(40):
            time.sleep(0.05)
            most = max(most, disk(pri)["lag_bytes"])
        still = writer.is_alive()
    finally:
        sec.proc.send_signal(signal.SIGCONT)
        writer.join()
        h.shutdown()
    assert still, "every write was acknowledged: nothing waited for the lag"
    assert most <= 16 * MiB + 256 * 1024 + MiB + 32 * BLOCK, most
    checkpoint(pri, sec)
    assert read_export(pri) == read_export(sec, "replica")
    assert read_export(pri)[:8192 * BLOCK] == data


def test_a_full_mark_log_hands_async_writes_to_the_plugin(nodes: Nodes) -> None:
    """The secondary hangs, so the forwarder stops taking marks once its fill is in
    flight: the filter's log (16384 marks) fills and later writes go to the plugin, which
    marks the map itself.  Every write is counted once and reaches the secondary."""
    pri, sec = start_pair(nodes, write_mode="async", timeout="60s")
    sigstop(sec.proc)
    n = 24000
    writes = [(bytes([i % 251 + 1]) * BLOCK, (i * 7 % 4096) * BLOCK) for i in range(n)]
    h = pri.client()
    try:
        aio_write_all(h, writes, 16)
    finally:
        sec.proc.send_signal(signal.SIGCONT)
        h.shutdown()
    state, counters = fast(pri), disk(pri)["counters"]
    assert counters["writes"] == n
    assert 16384 <= state["writes"] < n, state
    checkpoint(pri, sec)
    assert read_export(pri) == read_export(sec, "replica")


def test_writes_in_flight_when_the_link_goes_down_are_kept_locally(nodes: Nodes) -> None:
    """The secondary hangs before the filter made any connection.  16 writes of one block
    are in flight at once: the first holds the range until its connection times out and
    takes the link down; the others, admitted as fast writes before that, then find no
    link.  Every one is acknowledged from the local disk and marked dirty."""
    pri, sec = start_pair(nodes, timeout="1s")
    sigstop(sec.proc)
    h = pri.client()
    try:
        aio_write_all(h, [(bytes([i + 1]) * BLOCK, 0) for i in range(16)], depth=16)
        h.pwrite(b"\xee" * BLOCK, 0)
    finally:
        h.shutdown()
        sec.proc.send_signal(signal.SIGCONT)
    q = disk(pri)
    assert (q["degraded"], q["fast_path"]["armed"], q["counters"]["writes"]) == (True, 0, 17)
    assert q["dirty_bytes"] >= BLOCK
    assert read_export(pri)[:BLOCK] == b"\xee" * BLOCK
