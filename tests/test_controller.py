"""The controller against real nodes: failover, resync, sync, promotion, fencing, CLI.

Every node is a real nbdkit with the repdisk plugin; the guest is libnbd (and, for the
pause and VM-state test, a real QEMU without a machine).  Timings are short (heartbeat
0.1 s, heartbeat-timeout 1.2 s, isolation-timeout 0.6 s, primary timeout 1 s).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import nbd
import psutil
import pytest

from repdisk.cli.status import controller_lines, status_lines
from repdisk.controller.config import ControllerConfig
from repdisk.controller.controller import Controller
from repdisk.errors import ControlError
from repdisk.qmp.client import QMPClient, execute
from repdisk.replication.resync import GRANULARITY
from tests.helpers.controller import (
    HEARTBEAT_TIMEOUT,
    ISOLATION,
    TIMEOUT,
    Pair,
    Writer,
    bare_qemu,
    controlled_pair_with_guest,
    events,
    file_bytes,
    make_pair,
    read_export,
    restart,
    run_in_thread,
    step_until,
    wait_for,
)
from tests.helpers.nodes import MiB, Nodes, make_disk

pytestmark = pytest.mark.timeout(120)


# -- primary lost ------------------------------------------------------------------------------

@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_kill_primary_during_load_fails_over_to_the_last_checkpoint(tmp_path, write_mode):
    """kill -9 of the primary at random moments: the secondary's active export equals, byte
    for byte, the primary's disk at the last completed checkpoint."""
    rng = random.Random(f"kill-primary-{write_mode}")
    measured = []
    for round_ in range(3):
        nodes = Nodes(str(tmp_path / f"{write_mode}{round_}"))
        os.makedirs(nodes.folder)
        pair = make_pair(nodes, write_mode=write_mode)
        try:
            ctl = pair.controller()
            ctl.start()
            writer = Writer(pair.pri.uri(), pair.size, seed=round_).start()
            image = None
            for _ in range(rng.randint(1, 3)):
                time.sleep(rng.uniform(0.05, 0.4))
                snapshot = writer.pause()      # every acknowledged write is in the model
                ctl.checkpoint()
                image = snapshot
                writer.resume()
            time.sleep(rng.uniform(0.0, 0.4))  # writes after the checkpoint: rolled back
            pair.pri.kill()
            writer.stop()
            step_until(ctl, "failed-over")
            assert image is not None and writer.writes > 0
            assert read_export(pair.sec.uri("active"), pair.size) == image
            assert ctl.epoch == 2 and pair.sec.ctl("query-replication")["epoch"] == 2
            measured.append(ctl.last_failover["loss_to_serving"])
        finally:
            pair.close()
            nodes.close()
    print(f"\n{write_mode}: loss-to-serving {', '.join(f'{t:.2f}s' for t in measured)} "
          f"(heartbeat-timeout {HEARTBEAT_TIMEOUT}s)")
    assert all(HEARTBEAT_TIMEOUT <= t < HEARTBEAT_TIMEOUT + 1.0 for t in measured)


def test_failover_hook_gets_epoch_and_secondary(nodes, tmp_path):
    out = tmp_path / "hook.out"
    pair = make_pair(nodes)
    try:
        ctl = pair.controller(on_failover=f"echo $REPDISK_EPOCH $REPDISK_SECONDARY_CONTROL "
                                          f"${{REPDISK_VM_STATE:-none}} > {out}")
        ctl.start()
        pair.pri.kill()
        step_until(ctl, "failed-over")
        q = ctl.query()
        assert (q["dirty"], q["lag"]) == (None, None)   # not the lost primary's last ones
        assert "dirty ? lag ?" in controller_lines(q)[0]
        deadline = time.monotonic() + 5
        while not events(ctl, "HOOK_COMPLETED") and time.monotonic() < deadline:
            ctl.step()
        assert events(ctl, "HOOK_COMPLETED")[0]["rc"] == 0
        assert out.read_text().split() == ["2", pair.sec.control, "none"]
        # The old primary comes back (same sockets, its old state): it sees the winner's
        # newer epoch and comes up fenced, before any contact; the controller notes it.
        restart(nodes, pair.pri)
        pair.pri = nodes.start("primary", "pri", [("disk", pair.pri_disk),
                                                  ("secondary", pair.sec.uri("replica"))])
        assert pair.pri.ctl("query-replication")["fenced"] == (
            f"the node at --secondary {pair.sec.uri('replica')} is in epoch 2, newer than "
            "this node's 1: it won a failover and holds the newest data")
        h = pair.pri.client()
        with pytest.raises(nbd.Error, match="Operation not permitted"):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
        wait_for(lambda: (ctl.step(), ctl.query()["old_primary_fenced"])[1], 5, "fence")
    finally:
        pair.close()


def test_a_failover_made_without_the_controller_is_noticed_and_its_loser_fenced(nodes):
    """``repdisk ctl SEC failover`` while the controller runs: its next heartbeat sees the
    winner's newer epoch, goes failed-over (so controller-promote works) and fences the
    primary, whose guest writes the winner would never have."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        h = pair.pri.client()
        h.pwrite(b"\x42" * 8192, 0)
        ctl.checkpoint()
        pair.sec.ctl("replication-stop", failover=True)           # by hand
        step_until(ctl, "failed-over")
        assert ctl.epoch == 2
        assert controller_lines(ctl.query())[1] == (
            "controller failed over to epoch 2: made without this controller (noticed at a "
            "heartbeat)")
        wait_for(lambda: (ctl.step(), ctl.query()["old_primary_fenced"])[1], 5, "fence")
        assert pair.pri.ctl("query-replication")["fenced"] == (
            f"the pair failed over to {pair.sec.control} in epoch 2")
        with pytest.raises(nbd.Error, match="Operation not permitted"):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
        assert read_export(pair.sec.uri("active"), 8192) == b"\x42" * 8192
    finally:
        pair.close()


def test_checkpoints_start_every_interval_not_a_heartbeat_later(nodes):
    """--interval bounds what a failover rolls back: checkpoints start ``interval`` apart,
    not ``interval`` after the last one ended and then at the next heartbeat."""
    pair = make_pair(nodes)
    try:
        ctl = Controller(ControllerConfig(primary=pair.pri.control, secondary=pair.sec.control,
                                          interval=0.6, heartbeat=0.45,
                                          heartbeat_timeout=HEARTBEAT_TIMEOUT))
        pair.controllers.append(ctl)
        ctl.start()
        runner = run_in_thread(ctl)
        wait_for(lambda: len(ctl.checkpoints) >= 8, 20, "checkpoints")
        ctl.stop()
        runner.join()
        starts = [c["time"] for c in list(ctl.checkpoints)[-7:]]
        gaps = sorted(b - a for a, b in zip(starts, starts[1:], strict=False))
        assert gaps[len(gaps) // 2] < 0.6 * 1.2, gaps      # a heartbeat late: about 0.9 s
    finally:
        pair.close()


def test_manual_failover_fences_the_live_primary_first(nodes):
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        h = pair.pri.client()
        h.pwrite(b"\x42" * 8192, 0)
        ctl.checkpoint()
        rec = ctl.failover("maintenance")
        assert rec["epoch"] == 2 and ctl.query()["old_primary_fenced"]
        with pytest.raises(nbd.Error, match="Operation not permitted"):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
        assert read_export(pair.sec.uri("active"), 8192) == b"\x42" * 8192
        assert pair.pri.ctl("query-replication")["disks"][0]["stage"] == "done"
    finally:
        pair.close()


def test_status_lines_show_progress_and_failover():
    q = {"state": "resyncing", "epoch": 3, "dirty": 3 << 20, "lag": 0,
         "nodes": {"primary": {"reachable": True, "last_seen": 0.1},
                   "secondary": {"reachable": False, "last_seen": 4.0}},
         "last_checkpoints": [{"duration": 0.0123, "pause": 0.002, "age": 7.0}],
         "progress": {"phase": "copy", "done": 1 << 20, "total": 4 << 20, "rate": 2 << 20,
                      "eta": 1.5},
         "failover": {"epoch": 3, "reason": "primary lost", "loss_to_serving": 1.25}}
    lines = controller_lines(q)
    assert lines[0].split() == ["controller", "resyncing", "epoch", "3", "primary", "ok",
                                "(0.1s", "ago)", "secondary", "LOST", "(4.0s", "ago)", "dirty",
                                "3.0", "MiB", "lag", "0.0", "MiB", "last", "checkpoint",
                                "12.3", "ms", "(pause", "2.0", "ms)", "7s", "ago"]
    assert lines[1] == "controller copy: 1.0 MiB of 4.0 MiB (25%) 2.0 MiB/s ETA 2s"
    assert len(lines) == 2                  # re-protected since: the failover is history
    assert controller_lines({**q, "state": "promoting"})[2] == (
        "controller failed over to epoch 3: primary lost (loss to serving 1.25s)")
    nodes = {"primary": {"socket": "/r/a.qmp", "role": "primary", "ok": False},
             "secondary": {"socket": "/r/b.qmp", "role": "secondary", "ok": True}}
    failed_over = controller_lines({**q, "state": "failed-over", "progress": None,
                                    "nodes": nodes})
    assert failed_over[2:] == [                 # what to do next, after the failover line
        "controller next: start a new secondary for the winner /r/b.qmp, then repdisk ctl "
        "CONTROLLER controller-promote secondary=ITS-CONTROL "
        "uri=nbd+unix:///replica?socket=ITS-NBD-SOCKET"], failed_over
    assert controller_lines({**q, "state": "failed-over", "progress": None, "nodes": nodes},
                            "/r/ctl.qmp")[2].endswith(
        ", then repdisk ctl /r/ctl.qmp controller-promote secondary=ITS-CONTROL "
        "uri=nbd+unix:///replica?socket=ITS-NBD-SOCKET")     # the socket status was given
    nodes["secondary"]["answers_as"] = "primary"          # the winner promoted by hand
    assert controller_lines({**q, "state": "failed-over", "progress": None,
                             "nodes": nodes})[2:] == [
        "controller next: the winner /r/b.qmp is a primary already: the controller adopts "
        "the pair at a heartbeat (its error line says what stops it)"]
    for state in ("running", "degraded"):
        assert len(controller_lines({**q, "state": state, "progress": None})) == 1


# -- secondary lost ------------------------------------------------------------------------------

def test_kill_secondary_during_load_then_resync_only_dirty_regions(nodes):
    pair = make_pair(nodes, size=32 * MiB, write_mode="async")
    try:
        ctl = pair.controller()
        ctl.start()
        runner = run_in_thread(ctl)
        writer = Writer(pair.pri.uri(), pair.size, max_len=16 << 10, span=2 * MiB).start()
        time.sleep(0.3)
        before = writer.writes
        pair.sec.kill()
        wait_for(lambda: ctl.state == "degraded", 5, "degraded")
        time.sleep(0.5)
        writer.pause()
        assert not writer.errors and writer.writes > before
        worst = max(writer.latencies)
        assert worst < 1.0 + 0.5, f"a write waited {worst:.2f}s (timeout 1s)"
        dirty = pair.pri.ctl("query-replication")["disks"][0]["dirty_bytes"]
        assert 0 < dirty < pair.size // 2
        pair.restart_secondary()
        wait_for(lambda: ctl.state == "running" and events(ctl, "RESYNC_COMPLETED")[-1:]
                 and events(ctl, "RESYNC_COMPLETED")[-1]["command"] == "replication-resync",
                 10, "resync")
        sent = events(ctl, "RESYNC_COMPLETED")[-1]["bytes"]
        print(f"\nsecondary lost: {dirty} bytes dirty, resync sent {sent} bytes "
              f"({pair.size} byte disk); worst write latency {worst * 1000:.0f} ms")
        assert sent == dirty
        ctl.stop()
        runner.join()
        ctl.checkpoint()
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk) == bytes(writer.model)
        writer.stop()
    finally:
        pair.close()


def test_a_secondary_put_right_is_reprotected_without_waiting_out_the_back_off(nodes):
    """Re-protection attempts that fail back off (doubling); a secondary restarted (put
    right) is tried again at the next heartbeat, not after the back-off grown meanwhile."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        runner = run_in_thread(ctl)
        pair.sec.kill()
        wait_for(lambda: ctl.state == "degraded", 5, "degraded")
        small = make_disk(os.path.join(nodes.folder, "small.img"), pair.size // 2)
        restart(nodes, pair.sec)
        pair.sec = nodes.secondary(small, "sec")     # the wrong disk: every attempt fails
        wait_for(lambda: ctl._backoff >= 8 * ctl.cfg.heartbeat_timeout, 30, "a long back-off")
        restart(nodes, pair.sec)
        put_right = time.monotonic()
        pair.sec = nodes.secondary(pair.sec_disk, "sec")
        wait_for(lambda: ctl.state == "running", 10, "re-protected")
        waited = time.monotonic() - put_right
        assert waited < 2 * ctl.cfg.heartbeat_timeout, f"re-protected after {waited:.1f}s"
        print(f"\nre-protected {waited:.2f}s after the secondary was put right "
              f"(back-off then {ctl._backoff:.1f}s)")
        ctl.stop()
        runner.join()
    finally:
        pair.close()


# -- the link between the nodes --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cut", "hang"])
def test_link_cut_degrades_then_reprotects_without_failover(nodes, how):
    """Failure matrix: link lost, controller sees both -> primary degraded, writes go on,
    no failover; link back -> resync, RUNNING, disks equal."""
    pair = make_pair(nodes, proxy=True)
    try:
        ctl = pair.controller()
        ctl.start()
        runner = run_in_thread(ctl)
        writer = Writer(pair.pri.uri(), pair.size, max_len=16 << 10).start()
        time.sleep(0.2)
        getattr(pair.link, how)()
        wait_for(lambda: ctl.state == "degraded", 5, "degraded")
        time.sleep(1.0)  # longer than isolation-timeout: the controller's heartbeat is contact
        assert ctl.state in ("degraded", "resyncing")       # retrying, with a back-off
        assert not events(ctl, "FAILOVER_STARTED")
        assert pair.sec.ctl("query-replication")["disks"][0]["consistent"]
        count = writer.writes
        time.sleep(0.3)
        assert writer.writes > count and not writer.errors
        assert max(writer.latencies) < 1.5
        pair.link.heal()
        wait_for(lambda: ctl.state == "running", 10, "re-protected")
        image = writer.pause()
        ctl.stop()
        runner.join()
        ctl.checkpoint()
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk) == image
        # Controller lost, nodes fine: the secondary's acknowledgements are contact enough.
        ctl.close()
        writer.resume()
        time.sleep(1.0)
        before = writer.writes
        time.sleep(0.5)
        assert writer.writes > before and not writer.errors
        writer.stop()
        assert pair.pri.ctl("query-replication")["isolation"]["suspended"] is False
    finally:
        pair.close()


def test_isolated_primary_suspends_then_is_fenced(nodes):
    """Failure matrix: primary cut off from both -> it holds guest writes within
    isolation-timeout, the controller fails over after heartbeat-timeout, and fences the
    old primary when it hears from it again: its held write fails, nothing was acknowledged
    by two nodes in one epoch."""
    pair = make_pair(nodes, proxy=True, ctl_proxy=True)
    try:
        ctl = pair.controller()
        ctl.start()
        runner = run_in_thread(ctl)
        writer = Writer(pair.pri.uri(), pair.size, max_len=16 << 10, threads=1).start()
        time.sleep(0.3)
        cut = time.monotonic()
        pair.link.cut()
        pair.ctl_link.cut()
        wait_for(lambda: ctl.state == "failed-over", 5, "failover")
        failed_over = time.monotonic()
        n = writer.writes
        time.sleep(0.3)
        assert writer.writes == n, "the isolated primary acknowledged writes after failover"
        # The secondary serves the new epoch.
        h = nbd.NBD()
        h.connect_uri(pair.sec.uri("active"))
        h.pwrite(b"\x5a" * 4096, 0)
        h.shutdown()
        # Contact returns: the controller fences the old primary; its held write fails.
        pair.ctl_link.heal()
        wait_for(lambda: ctl.query()["old_primary_fenced"], 5, "fence")
        wait_for(lambda: writer.errors, 5, "held write refused")
        assert "EPERM" in writer.errors[0]    # EROFS in the plugin; NBD's wire has only EPERM
        q = pair.pri.ctl("query-replication")
        assert q["fenced"] and q["epoch"] == 1
        assert pair.sec.ctl("query-replication")["epoch"] == 2
        h = pair.pri.client()
        with pytest.raises(nbd.Error) as err:
            h.pwrite(b"x" * 512, 0)
        assert err.value.errno == "EPERM"
        h.shutdown()
        ev = pair.pri.ctl("query-replication")["isolation"]
        assert ev["fenced"]
        print(f"\nisolation: cut at 0, failover at {failed_over - cut:.2f}s")
        writer.stop()
        ctl.stop()
        runner.join()
        # A fenced node may not start as a primary again.
        with pytest.raises(ControlError, match="fenced"):
            pair.pri.ctl("replication-start", mode="primary", epoch=3)
    finally:
        pair.close()


def test_a_primary_stopped_past_the_failover_acknowledges_nothing_when_it_wakes(nodes):
    """A primary frozen (SIGSTOP) with a write under way for longer than the controller's
    heartbeat-timeout wakes after the failover with a stale verdict of its guard (its
    monitor thread slept too): that write, and any other, must not be acknowledged; they
    wait for contact, which is the controller's fence."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        runner = run_in_thread(ctl)
        writer = Writer(pair.pri.uri(), pair.size, max_len=16 << 10, threads=2).start()
        time.sleep(0.3)
        pair.pri.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: ctl.state == "failed-over", 5, "failover")
            n = writer.writes
        finally:
            pair.pri.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: ctl.query()["old_primary_fenced"], 5, "fence")
        wait_for(lambda: len(writer.errors) == 2, 5, "both writes refused")
        assert writer.writes == n, "the woken primary acknowledged a write after the failover"
        assert all("EPERM" in e for e in writer.errors), writer.errors
        writer.stop()
        ctl.stop()
        runner.join()
    finally:
        pair.close()


def test_controller_cut_from_primary_only_fails_over_and_fences(nodes):
    """Failure matrix: the controller loses the primary, the link still works -> failover;
    the secondary refuses the old primary's writes, which degrades and then isolates it;
    after contact it is fenced.  Only the new epoch accepts writes in the end."""
    pair = make_pair(nodes, ctl_proxy=True)
    try:
        ctl = pair.controller()
        ctl.start()
        runner = run_in_thread(ctl)
        writer = Writer(pair.pri.uri(), pair.size, max_len=16 << 10, threads=1,
                        stop_on_error=False).start()
        time.sleep(0.2)
        pair.ctl_link.cut()
        wait_for(lambda: ctl.state == "failed-over", 5, "failover")
        done_at = time.monotonic()
        wait_for(lambda: pair.pri.ctl("query-replication")["isolation"]["suspended"], 3,
                 "isolated")
        suspended_at = time.monotonic()
        window = suspended_at - done_at
        print(f"\nold primary acknowledged local writes for {window:.2f}s after the failover "
              "(old epoch; bounded by isolation-timeout)")
        assert window < 0.6 + 0.5
        pair.ctl_link.heal()
        wait_for(lambda: ctl.query()["old_primary_fenced"], 5, "fence")
        n = writer.writes
        time.sleep(0.3)
        assert writer.writes == n
        writer.stop()
        assert pair.pri.ctl("query-replication")["epoch"] == 1
        assert pair.sec.ctl("query-replication")["epoch"] == 2
        ctl.stop()
        runner.join()
    finally:
        pair.close()


# -- initial sync and interrupted resync ----------------------------------------------------------

def _fill(path: str, runs: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for off, length in runs:
            f.seek(off)
            f.write(rng.randbytes(length))


def _differing_bytes(a: bytes, b: bytes, granularity: int) -> int:
    return sum(min(granularity, len(a) - o) for o in range(0, len(a), granularity)
               if a[o:o + granularity] != b[o:o + granularity])


@pytest.mark.parametrize("mode", ["checksum", "full"])
def test_initial_sync_from_different_disks(nodes, mode):
    size = 32 * MiB
    folder = nodes.folder
    pri_disk = make_disk(os.path.join(folder, "pri.img"), size)
    sec_disk = make_disk(os.path.join(folder, "sec.img"), size)
    shared = [(8 * MiB, 4 * MiB)]                          # equal on both sides
    _fill(pri_disk, shared, 1)
    _fill(sec_disk, shared, 1)
    _fill(pri_disk, [(0, 3 * MiB), (20 * MiB + 4096, 100_000)], 2)   # primary only
    _fill(sec_disk, [(2 * MiB, 2 * MiB), (28 * MiB, 1 * MiB)], 3)    # secondary only (holes
    _fill(pri_disk, [(9 * MiB, 8192)], 4)                  # on the primary at 28M) + change
    expect = _differing_bytes(file_bytes(pri_disk), file_bytes(sec_disk), GRANULARITY)
    sec = nodes.secondary(sec_disk)
    pri = nodes.primary(pri_disk, sec, timeout="1s", isolation_timeout="0.6s")
    pair = Pair(nodes, folder, size, pri_disk, sec_disk, sec, pri)
    try:
        ctl = pair.controller(initial_sync=mode)
        ctl.start()
        compared = events(ctl, "SYNC_COMPARED")[0]
        sent = events(ctl, "RESYNC_COMPLETED")[0]["bytes"]
        print(f"\n{mode} sync: {expect} bytes differ in {GRANULARITY}-byte granules, "
              f"marked {compared['marked']}, sent {sent}")
        assert sent == compared["dirty"]
        if mode == "checksum":
            assert compared["marked"] == sent == expect
        else:  # everything allocated on either side, whole granules
            assert sent >= expect and sent >= compared["marked"] >= 9 * MiB
        assert ctl.state == "running"
        assert file_bytes(pri_disk) == file_bytes(sec_disk)
        assert events(ctl, "RESYNC_PROGRESS")
    finally:
        pair.close()


def test_interrupted_initial_sync_resumes_and_never_fails_over_meanwhile(nodes):
    pair = make_pair(nodes, size=32 * MiB, proxy=True)
    _fill(pair.pri_disk, [(0, pair.size)], 7)
    try:
        pair.link.cut_after = 20 * MiB
        ctl = pair.controller()
        with pytest.raises(Exception):  # noqa: B017 (any failure: the link is cut mid-sync)
            ctl.start()
        first = pair.link.sent
        assert pair.sec.ctl("query-replication")["disks"][0]["consistent"] is False
        with pytest.raises(ControlError, match="cannot failover: the controller is starting"):
            ctl.failover()                             # the pair never replicated
        q = pair.sec.ctl("query-replication")
        assert q["epoch"] == 1 and q["disks"][0]["stage"] == "running"  # nothing changed
        left = pair.pri.ctl("query-replication")["disks"][0]["dirty_bytes"]
        assert 0 < left <= pair.size - 4 * MiB  # the first 4 MiB chunk settled before the cut
        pair.link.sent = 0
        pair.link.heal()
        step_until(ctl, "running")
        resumed = [e for e in events(ctl, "RESYNC_COMPLETED")][-1]["bytes"]
        print(f"\ninterrupted sync: {first} bytes before the cut, {resumed} after "
              f"({left} were left dirty) of {pair.size}")
        assert resumed == left
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk)
    finally:
        pair.close()


def test_primary_restart_resyncs_by_itself(nodes):
    """A primary killed and restarted (its dirty map not saved) compares itself with the
    secondary by digest; the controller adds no comparison of its own, just starts it."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller(auto_failover=False)
        ctl.start()
        pair.pri.kill()
        _fill(pair.pri_disk, [(5 * MiB, 200_000)], 9)   # written while nothing replicated
        restart(nodes, pair.pri)
        pair.pri = nodes.start("primary", "pri", [("disk", pair.pri_disk),
                                                  ("secondary", pair.sec.uri("replica")),
                                                  ("timeout", "1s")])
        wait_for(lambda: (ctl.step(), len(events(ctl, "RESYNC_COMPLETED")) == 2)[1], 10,
                 "resync")
        assert ctl.state == "running"
        assert len(events(ctl, "SYNC_COMPARED")) == 1              # the first start's only
        sent = events(ctl, "RESYNC_COMPLETED")[1]["bytes"]
        assert 200_000 <= sent <= 200_000 + 2 * GRANULARITY
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk)
    finally:
        pair.close()


def test_a_stop_during_a_resync_says_it_waits_for_it(nodes, caplog):
    """SIGTERM (stop) while a long resync runs: the controller ends it first, and says so
    at once rather than seeming to ignore the signal."""
    pair = make_pair(nodes, pri_fill=1, resync_rate="4M")     # 16 MiB to copy: 4 s
    try:
        ctl = pair.controller(auto_failover=False, initial_sync="full")
        starting = threading.Thread(target=ctl.start)
        starting.start()
        wait_for(lambda: ctl.operation is not None and ctl.progress is not None, 10, "resync")
        ctl.stop()
        assert caplog.text.count("stopping once the start under way ends") == 1
        starting.join()
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk)
    finally:
        pair.close()


# -- promotion -------------------------------------------------------------------------------

def test_promotion_and_reprotection(nodes):
    """Fail over, promote the winner, attach the old primary's disk as the new secondary,
    resync by checksum (it undoes the rolled-back writes), fail over again, compare."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        writer = Writer(pair.pri.uri(), pair.size, seed=11, span=MiB).start()
        time.sleep(0.3)
        image = writer.pause()
        ctl.checkpoint()
        writer.resume()
        time.sleep(0.2)                                    # to be rolled back
        pair.pri.kill()
        writer.stop()
        step_until(ctl, "failed-over")
        assert read_export(pair.sec.uri("active"), pair.size) == image
        winner = pair.sec
        guest = winner.client("active")                    # opened before the promotion
        guest.pwrite(b"\x77" * 65536, 3 * MiB)
        image = image[:3 * MiB] + b"\x77" * 65536 + image[3 * MiB + 65536:]
        # The old primary's host comes back as a secondary (its disk has rolled-back writes).
        restart(nodes, pair.pri)
        new_sec = nodes.secondary(pair.pri_disk, "newsec")
        assert file_bytes(pair.pri_disk) != image
        differ = _differing_bytes(file_bytes(pair.pri_disk), file_bytes(pair.sec_disk),
                                  GRANULARITY)
        ctl.promote(new_sec.control, new_sec.uri("replica"))
        assert ctl.state == "running" and ctl.epoch == 2
        sent = events(ctl, "RESYNC_COMPLETED")[-1]["bytes"]
        assert 0 < sent == differ <= 3 * MiB + 4 * GRANULARITY   # 3 hot regions + 1 block
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk) == image
        # The connection opened before the promotion keeps working, now replicated.
        guest.pwrite(b"\x88" * 4096, 0)
        image = b"\x88" * 4096 + image[4096:]
        guest.shutdown()
        ctl.checkpoint()
        assert read_export(new_sec.uri("active"), pair.size) == image
        status = status_lines(winner.control)
        assert status[0].startswith("primary")
        # Second failover: the old primary's disk takes over again, at the last checkpoint.
        writer = Writer(winner.uri("active"), pair.size, seed=12).start(image)
        time.sleep(0.2)
        image = writer.pause()
        ctl.checkpoint()
        writer.resume()
        time.sleep(0.1)
        winner.kill()
        writer.stop()
        step_until(ctl, "failed-over")
        assert ctl.epoch == 3
        assert read_export(new_sec.uri("active"), pair.size) == image
        print(f"\npromotion: checksum resync sent {sent} bytes of {pair.size}")
    finally:
        pair.close()


def test_a_promotion_keeps_the_lost_primarys_write_mode_and_max_lag(nodes):
    """The new primary of a promotion replicates as the lost one did: async and with its
    max-lag, not the winner's defaults (sync, 256M), also when the controller restarted in
    between (its pair file remembers both)."""
    pair = make_pair(nodes, write_mode="async", max_lag="2M")
    control = os.path.join(pair.folder, "ctl.qmp")
    try:
        ctl = pair.controller(control=control)
        ctl.start()
        pair.pri.kill()
        step_until(ctl, "failed-over")
        ctl.close()
        again = pair.controller(control=control)
        again.start()
        assert again.state == "failed-over"
        restart(nodes, pair.pri)
        new_sec = nodes.secondary(pair.pri_disk, "newsec")
        again.promote(new_sec.control, new_sec.uri("replica"))
        disk = pair.sec.ctl("query-replication")["disks"][0]
        assert (disk["write_mode"], disk["max_lag"]) == ("async", 2 * MiB)
    finally:
        pair.close()


def test_failover_winner_is_adopted_never_made_a_secondary(nodes):
    """A controller started later with stale options (the old primary back as a primary, the
    winner as its secondary) adopts the pair as it is: failed-over, the old primary fenced,
    the winner untouched; the node refuses to become a secondary in its winning epoch too."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        pair.pri.kill()
        step_until(ctl, "failed-over")
        ctl.close()
        restart(nodes, pair.pri)
        old = nodes.start("primary", "pri2", [("disk", pair.pri_disk),
                                              ("secondary", pair.sec.uri("replica"))])
        stale = pair.controller(primary=old.control)
        stale.start()
        assert stale.state == "failed-over" and stale.epoch == 2
        changed = [e["data"] for e in stale.query()["events"]
                   if e.get("event") == "CONTROLLER_STATE_CHANGED"]
        assert changed[-1]["why"] == (f"{pair.sec.control} won the failover into epoch 2: "
                                      "promote it (controller-promote)"), changed
        assert stale.query()["nodes"]["secondary"]["socket"] == pair.sec.control
        wait_for(lambda: (stale.step(), old.ctl("query-replication")["fenced"])[1], 10,
                 "the old primary fenced")
        q = pair.sec.ctl("query-replication")
        assert q["disks"][0]["stage"] == "done" and q["epoch"] == 2
        with pytest.raises(ControlError, match="won the failover into epoch 2 "):
            pair.sec.ctl("replication-start", mode="secondary", epoch=2)   # the node itself
        # The winner restarted as a secondary process: still the winner, adopted as such,
        # and serving its disk (done) as before.
        pair.restart_secondary()
        again = pair.controller(primary=old.control)
        again.start()
        assert again.state == "failed-over"
        q = pair.sec.ctl("query-replication")
        assert (q["disks"][0]["stage"], q["epoch"], q["failed-over"]) == ("done", 2, True)
    finally:
        pair.close()


def test_a_winner_restarted_as_a_primary_is_not_promoted_again_but_adopted(nodes):
    """The failover's winner restarted by hand as a primary, the old primary's disk as its
    secondary: controller-promote is refused, saying that the controller adopts the pair,
    and changes nothing; the next heartbeat adopts the pair and re-protects it."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        h = pair.pri.client()
        h.pwrite(b"\x42" * 65536, 0)
        ctl.checkpoint()
        h.shutdown()
        pair.pri.kill()
        step_until(ctl, "failed-over")
        restart(nodes, pair.pri)
        restart(nodes, pair.sec)
        old = nodes.secondary(pair.pri_disk, "pri")               # same sockets as before
        winner = nodes.primary(pair.sec_disk, old, "sec", timeout=TIMEOUT,
                               isolation_timeout=ISOLATION)
        with pytest.raises(ControlError, match="^" + re.escape(
                f"cannot promote: the failover's winner {winner.control} is a primary "
                "already (promoted by hand?): this controller adopts the pair as the nodes "
                "describe it at its next heartbeat")):
            ctl.promote(old.control, old.uri("replica"))
        assert ctl.state == "failed-over"
        step_until(ctl, "running", 30)                    # adopted, swapped, re-protected
        assert (ctl.primary.socket, ctl.secondary.socket) == (winner.control, old.control)
        ctl.checkpoint()
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk)
        assert file_bytes(pair.sec_disk)[:65536] == b"\x42" * 65536
    finally:
        pair.close()


# -- guest pause, VM state, control socket, CLI ----------------------------------------------

def test_checkpoint_pauses_guest_and_saves_vm_state(nodes, tmp_path):
    pair = make_pair(nodes)
    qmp = str(tmp_path / "guest.qmp")
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{qmp},server=on,wait=off",
         "-blockdev", f"driver=nbd,server.type=unix,server.path={pair.pri.listen.socket},"
                      f"export=disk0,node-name=d0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(qmp), 10, "QEMU's QMP socket")
        vm_state = tmp_path / "state"
        vm_state.mkdir()
        ctl = pair.controller(qmp=qmp, vm_state=str(vm_state), control=str(tmp_path / "c.qmp"))
        ctl.start()
        rec = ctl.checkpoint()
        assert rec["pause"] > 0 and rec["vm_state_bytes"] > 0
        assert (vm_state / "vmstate").stat().st_size == rec["vm_state_bytes"]
        assert not (vm_state / "vmstate.tmp").exists()
        ctl.close()                                        # QEMU serves one QMP client
        with QMPClient().connect(qmp) as guest:
            assert guest.execute("query-status")["running"] is True
        print(f"\ncheckpoint with stop/migrate/cont: pause {rec['pause'] * 1000:.1f} ms, "
              f"duration {rec['duration'] * 1000:.1f} ms")
    finally:
        qemu.kill()
        qemu.wait()
        pair.close()


def test_a_checkpoint_never_continues_a_guest_that_migrated_away(nodes, tmp_path):
    """--qmp naming a QEMU whose guest moved on (a switchover, then the controller restarted
    with its first options): continuing it would run the guest twice.  The checkpoint is
    refused, the old QEMU stays in postmigrate."""
    pair = make_pair(nodes)
    qmp, new_qmp = str(tmp_path / "guest.qmp"), str(tmp_path / "new.qmp")
    mig = tmp_path / "mig.sock"
    qemus = [bare_qemu(qmp), bare_qemu(new_qmp, "-incoming", f"unix:{mig}")]
    try:
        wait_for(lambda: os.path.exists(qmp) and os.path.exists(mig), 10, "QEMUs")
        with QMPClient().connect(qmp) as guest:
            guest.execute("migrate", {"uri": f"unix:{mig}"})
            wait_for(lambda: guest.execute("query-status")["status"] == "postmigrate", 10,
                     "migration")
        ctl = pair.controller(qmp=qmp, control=str(tmp_path / "c.qmp"))
        with pytest.raises(ControlError, match=r"migrated away \(postmigrate\): restart the "
                                               "controller with --qmp of the QEMU it runs in"):
            ctl.start()
        ctl.close()
        with QMPClient().connect(qmp) as guest:
            assert guest.execute("query-status")["status"] == "postmigrate"
    finally:
        for q in qemus:
            q.kill()
            q.wait()
        pair.close()


def test_a_guest_qemu_restarted_on_the_same_monitor_is_paused_again(nodes, tmp_path):
    """The guest's QEMU restarted (its monitor socket made anew): the next checkpoint
    connects to the new QEMU, pauses and continues it, instead of failing for ever on the
    old connection.  While no QEMU answers, checkpoints fail and status says so first."""
    with controlled_pair_with_guest(nodes, str(tmp_path)) as (_, ctl, guest):
        assert ctl.checkpoint()["pause"] > 0
        guest.kill()
        os.unlink(guest.qmp)
        for _ in range(2):                 # no guest: checkpoints fail, and status says so
            with pytest.raises(ControlError, match=rf"guest monitor {guest.qmp} does not "
                                                   r"answer \(No such file or directory\): "
                                                   "start the guest's QEMU, or give --qmp"):
                ctl.checkpoint()
        assert ctl.query()["checkpoints_failing"]["count"] == 2
        assert re.match(r"controller running CHECKPOINTS FAILING \(2 in a row, \d+s\) epoch",
                        controller_lines(ctl.query())[0])
        guest.start()
        assert ctl.checkpoint()["pause"] > 0
        assert ctl.query()["checkpoints_failing"] is None
        ctl.close()                                        # QEMU serves one QMP client
        with QMPClient().connect(guest.qmp) as monitor:
            assert monitor.execute("query-status")["running"] is True


def test_a_hung_guest_monitor_holds_a_checkpoint_for_heartbeat_timeout_only(nodes, tmp_path):
    """A guest QEMU that stopped answering (SIGSTOP; a `stop` that hangs draining I/O)
    fails the checkpoint after heartbeat-timeout, not 60 s: the run loop, whose heartbeats
    notice a lost primary, waits for it.  Continued, the guest is paused again."""
    with controlled_pair_with_guest(nodes, str(tmp_path)) as (_, ctl, guest):
        guest.proc.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(ControlError, match=r"query-status: no answer within 1\.2 s"):
            ctl.checkpoint()
        assert time.monotonic() - began < 3 * HEARTBEAT_TIMEOUT
        guest.proc.send_signal(signal.SIGCONT)
        assert ctl.checkpoint()["pause"] > 0
        ctl.close()


def test_freeze_without_guest_agent_fails_cleanly(nodes, tmp_path):
    pair = make_pair(nodes)
    try:
        ctl = pair.controller(freeze=True, qga=str(tmp_path / "no-agent.sock"))
        with pytest.raises(ControlError, match="guest agent"):
            ctl.start()
        assert pair.pri.ctl("query-replication")["disks"][0]["holding"] is False
    finally:
        pair.close()


def test_cli_controller_status_checkpoint_and_metrics(nodes, tmp_path):
    pair = make_pair(nodes)
    ctrl = str(tmp_path / "ctrl.qmp")
    metrics_file = tmp_path / "metrics.prom"
    repdisk = [sys.executable, "-m", "repdisk.cli.main"]
    run = subprocess.run(repdisk + ["controller", "--primary", pair.pri.control,
                                    "--secondary", pair.sec.control, "--control", ctrl,
                                    "--interval", "200ms", "--heartbeat", "100ms",
                                    "--heartbeat-timeout", "1.2s",
                                    "--metrics-file", str(metrics_file), "--background"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    pidfile = ctrl + ".pid"
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        wait_for(lambda: execute(ctrl, "query-controller")["state"] == "running", 10,
                 "running")
        st = subprocess.run(repdisk + ["status", ctrl, pair.pri.control], capture_output=True,
                            text=True, timeout=30)
        assert st.returncode == 0, st.stderr
        first = st.stdout.splitlines()[0]
        assert first.startswith("controller running") and "epoch 1" in first
        assert f"primary {pair.pri.control} ok" in first     # which socket has which role
        assert f"secondary {pair.sec.control} ok" in first
        assert st.stdout.splitlines()[1].startswith("primary")
        ck = subprocess.run(repdisk + ["ctl", ctrl, "checkpoint", "--json"], capture_output=True,
                            text=True, timeout=30)
        assert ck.returncode == 0 and '"pause"' in ck.stdout
        # ctl's short names mean the controller's own commands there
        for alias, key in (("status", '"state": "running"'), ("resync", '"bytes": 0')):
            run = subprocess.run(repdisk + ["ctl", ctrl, alias, "--json"], capture_output=True,
                                 text=True, timeout=30)
            assert run.returncode == 0 and key in run.stdout, (alias, run.stdout, run.stderr)
        text = execute(ctrl, "query-metrics")
        assert 'repdisk_controller_state{state="running"} 1' in text
        assert "repdisk_epoch 1" in text and "repdisk_checkpoints_total" in text
        wait_for(lambda: metrics_file.exists() and "repdisk_dirty_bytes" in
                 metrics_file.read_text(), 5, "metrics file")
        q = execute(ctrl, "query-controller")
        assert q["counters"]["checkpoints"] >= 2        # the interval runs them
        assert any(e["event"] == "CHECKPOINT_COMPLETED" for e in q["events"])
        # A controller started since at the same path owns the pid file (this one lost its
        # socket): stopping this one leaves that file, by which `down` finds the other.
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not psutil.pid_exists(pid) or
                 psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, "controller exit")
        with open(pidfile) as f:
            assert f.read() == f"{os.getpid()}\n"
        os.unlink(pidfile)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(pidfile), 10, "controller exit")
        pair.close()


def test_cli_controller_refusals_one_controller_per_pair_and_timing(nodes, tmp_path):
    """Refused with one line, nothing changed: the same node twice, a heartbeat-timeout that
    breaks the timing rules against the primary's own settings, a second controller on a
    pair whose nodes lease it to the first (naming it), and a second one on the same socket."""
    pair = make_pair(nodes)
    repdisk = [sys.executable, "-m", "repdisk.cli.main", "controller"]

    def controller(*extra: str, ctrl: str = "ctrl.qmp",
                   primary: str = pair.pri.control) -> subprocess.CompletedProcess:
        return subprocess.run(repdisk + ["--primary", primary, "--secondary", pair.sec.control,
                                         "--control", str(tmp_path / ctrl), "--heartbeat",
                                         "100ms", "--background", *extra],
                              capture_output=True, text=True, timeout=60)

    def refused(run: subprocess.CompletedProcess, *words: str) -> None:
        assert run.returncode == 1 and len(run.stderr.splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr and all(w in run.stderr for w in words), run.stderr

    first = str(tmp_path / "ctrl.qmp")
    try:
        refused(controller(primary=pair.sec.control), "is the same node as --primary")
        refused(controller("--heartbeat-timeout", "1s"), "timeout=1s, which must be below "
                "--heartbeat-timeout (1s)", "give --heartbeat-timeout 2s")
        refused(controller("--heartbeat-timeout", "500ms"), "has isolation-timeout=0.6s and "
                "timeout=1s, which must be below --heartbeat-timeout (0.5s)",
                "give --heartbeat-timeout 2s")     # one value that meets both rules
        assert pair.sec.ctl("query-replication")["disks"][0]["stage"] == "none"
        assert not os.path.exists(first)
        ok = controller("--heartbeat-timeout", "1.2s")
        assert ok.returncode == 0, ok.stderr
        wait_for(lambda: execute(first, "query-controller")["state"] == "running",
                 20, "running")
        refused(controller("--heartbeat-timeout", "1.2s", ctrl="other.qmp"),
                "controller lease refused: controller", first, "stop that controller first")
        refused(controller("--heartbeat-timeout", "1.2s"),
                f"a controller already serves {first}")
        for ctrl in ("ctrl.qmp", "other.qmp"):     # in the foreground too: one line, at once
            fg = subprocess.run(repdisk + ["--primary", pair.pri.control, "--secondary",
                                           pair.sec.control, "--control", str(tmp_path / ctrl),
                                           "--heartbeat", "100ms", "--heartbeat-timeout",
                                           "1.2s"], capture_output=True, text=True, timeout=60)
            refused(fg, "a live server answers there" if ctrl == "ctrl.qmp" else
                    "controller lease refused")
        assert not os.path.exists(tmp_path / "other.qmp")
        lease = pair.pri.ctl("query-replication")["lease"]
        assert lease["holder"].endswith(":" + first) and lease["duration"] == 5.0
        assert execute(first, "query-controller")["state"] == "running"
        _stop_controller(first)          # a clean stop releases the lease: the next one runs
        other = controller("--heartbeat-timeout", "1.2s", ctrl="other.qmp")
        assert other.returncode == 0, other.stderr
        assert pair.pri.ctl("query-replication")["lease"]["holder"].endswith("other.qmp")
    finally:
        for ctrl in (first, str(tmp_path / "other.qmp")):
            _stop_controller(ctrl)
        pair.close()


def _stop_controller(ctrl: str) -> None:
    if os.path.exists(ctrl + ".pid"):
        with open(ctrl + ".pid") as f:
            os.kill(int(f.read()), 15)
        wait_for(lambda: not os.path.exists(ctrl + ".pid"), 10, "controller exit")
