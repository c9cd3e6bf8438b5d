"""Crashes in the middle of the pair's own operations, with real node and controller processes.

* a secondary SIGKILLed inside its failover commit finishes the commit when it restarts,
  and its disk is exactly the last checkpoint plus the secondary VM's writes;
* the controller SIGKILLed at random moments (one of them inside a checkpoint) is
  restarted on the same sockets and adopts the running pair: no failover, no resync,
  and a final checkpoint + failover gives the primary's disk at that checkpoint;
* both nodes die: the primary restarts first from its own disk, then the secondary; the
  controller re-protects by checksum, and a later failover gives the primary's disk at
  the checkpoint taken after that.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from repdisk.errors import ConfigError, ControlError
from repdisk.node.state import NodeState
from repdisk.qmp.client import QMPClient, execute
from repdisk.replication.resync import GRANULARITY
from tests.helpers.controller import (
    ISOLATION,
    TIMEOUT,
    Writer,
    events,
    file_bytes,
    make_pair,
    read_export,
    step_until,
    wait_for,
)
from tests.helpers.controller import restart as forget
from tests.helpers.nodes import MiB, NodeProc, Nodes, kill9, make_disk, restart, slowed_writes

pytestmark = pytest.mark.timeout(120)

# -- a secondary killed inside its failover commit ---------------------------------------------

DISK = 192 * MiB       # the secondary's disk
REWRITTEN = 128 * MiB  # what the primary overwrote after the checkpoint: hidden holds it all


@functools.lru_cache(maxsize=2)
def _pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(DISK)


def _state(disk: str) -> dict[str, Any]:
    with open(disk + ".state") as f:
        return json.load(f)


def _fill_overlays(sec: NodeProc, rng: random.Random, expected: bytearray) -> None:
    """The primary rewrites REWRITTEN bytes (hidden gets their checkpoint contents); the
    secondary VM writes 48 pieces anywhere, at any alignment (into active)."""
    primary = sec.client("replica")
    newer = _pattern(2)
    for off in range(0, REWRITTEN, 4 * MiB):
        primary.pwrite(newer[off:off + 4 * MiB], off)
    primary.flush()
    primary.shutdown()
    vm = sec.client("active")
    for _ in range(48):
        length = rng.randrange(1, 512 << 10)
        off = rng.randrange(0, DISK - length)
        data = rng.randbytes(length)
        vm.pwrite(data, off)
        expected[off:off + length] = data
    vm.flush()
    vm.shutdown()


def _kill_during_commit(sec: NodeProc, phase: int, fraction: float) -> tuple[int, int, int]:
    """Start the failover and SIGKILL the node once its commit progress (FAILOVER_PROGRESS:
    phase 0 commits active into hidden, phase 1 hidden into the disk) reaches ``fraction``
    of ``phase``; return where the last event seen was (phase, done, total)."""
    watch = QMPClient(timeout=30).connect(sec.control)
    stopper = threading.Thread(target=_swallow, args=(sec.ctl, "replication-stop"),
                               kwargs={"failover": True})
    seen, total = 0, None
    try:
        stopper.start()
        while True:
            data = watch.wait_event("FAILOVER_PROGRESS")["data"]
            if total is not None and data["total"] != total:
                seen += 1                  # a new run: the hidden overlay's commit
            total = data["total"]
            if seen > phase or (seen == phase and data["done"] >= fraction * data["total"]):
                kill9(sec)
                return seen, data["done"], data["total"]
    finally:
        watch.close()
        stopper.join()


def _swallow(fn: Any, *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(ControlError, OSError):   # the node died under the command
        fn(*args, **kwargs)


@pytest.mark.parametrize("phase,fraction", [(0, 0.3), (1, 0.2), (1, 0.7)])
def test_secondary_killed_in_its_failover_commit_finishes_it_at_restart(
        nodes: Nodes, phase: int, fraction: float) -> None:
    """Overlays full (128 MiB in hidden, the VM's writes in active), failover, SIGKILL in
    the commit: the state file still says the commit of epoch 1 is under way; restarted
    on the same files, the node finishes it before serving: stage done, epoch 2, and the
    active export is, byte for byte, the checkpoint plus the secondary VM's writes."""
    rng = random.Random(f"{phase}-{fraction}")
    checkpointed = _pattern(1)
    disk = os.path.join(nodes.folder, "sec.img")
    with open(disk, "wb") as f:
        f.write(checkpointed)
    sec = nodes.secondary(disk)
    sec.ctl("replication-start", mode="secondary", epoch=1)
    sec.ctl("replication-do-checkpoint")   # the pair's checkpoint: the disk as it is now
    expected = bytearray(checkpointed)
    _fill_overlays(sec, rng, expected)
    assert sec.ctl("query-replication")["disks"][0]["hidden_bytes"] >= REWRITTEN
    with slowed_writes(sec, 40_000):       # 40 ms a write: the commit outlasts the kill's lag
        where = _kill_during_commit(sec, phase, fraction)
    state = _state(disk)
    assert state["failover_commit"] == 1 and state["epoch"] == 1, (where, state)
    on_disk = file_bytes(disk)
    restored = sum(on_disk[off:off + MiB] == expected[off:off + MiB]
                   for off in range(0, REWRITTEN, MiB))
    t0 = time.monotonic()
    sec = restart(nodes, sec, [("disk", disk)])
    resumed = time.monotonic() - t0
    q = sec.ctl("query-replication")
    assert q["disks"][0]["stage"] == "done" and q["epoch"] == 2 and q["failed-over"], q
    assert q["disks"][0]["hidden_bytes"] == q["disks"][0]["active_bytes"] == 0
    assert read_export(sec.uri("active"), DISK) == expected
    assert file_bytes(disk) == expected
    assert _state(disk)["failover_commit"] is None
    log = sec.log_text()
    assert "finishing it" in log and "failover commit finished: epoch 2" in log
    with pytest.raises(ControlError, match="won the failover into epoch 2"):
        sec.ctl("replication-start", mode="secondary", epoch=2)
    print(f"\nkilled at commit run {where[0]} {where[1] / MiB:.0f}/{where[2] / MiB:.0f} MiB "
          f"({restored} of {REWRITTEN // MiB} rewritten MiB restored on the disk); "
          f"restart with the commit finished in {resumed:.2f}s")


def test_an_unfinished_failover_commit_refuses_every_start() -> None:
    state = NodeState(epoch=3, role="secondary", failover_commit=3)
    for role, epoch in (("secondary", 4), ("secondary", None), ("primary", 9)):
        with pytest.raises(ConfigError, match="the failover commit of epoch 3 was interrupted"):
            state.check_start(role, epoch)
    state.end_failover()
    assert (state.epoch, state.failed_over, state.failover_commit) == (4, True, None)


def test_a_primary_refuses_to_open_over_an_unfinished_failover_commit(nodes: Nodes) -> None:
    disk = make_disk(os.path.join(nodes.folder, "sec.img"), 4 * MiB)
    NodeState(epoch=1, role="secondary", failover_commit=1).save(disk + ".state")
    sec = nodes.secondary(make_disk(os.path.join(nodes.folder, "other.img"), 4 * MiB), "other")
    with pytest.raises(Exception, match="failover commit of epoch 1 was interrupted on this "
                                        "node: start it as the secondary it was"):
        nodes.primary(disk, sec)


# -- the controller killed at random moments -----------------------------------------------------

def _controller(pair: Any, ctrl: str, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "repdisk.cli.main", "controller", "--primary", pair.pri.control,
           "--secondary", pair.sec.control, "--control", ctrl, "--interval", "100ms",
           "--heartbeat", "100ms", "--heartbeat-timeout", "1.2s", "--log", log]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _adopted(ctrl: str) -> dict[str, Any]:
    """Wait until the controller at ``ctrl`` runs the pair and has checkpointed it."""
    def ready() -> bool:
        try:
            q = execute(ctrl, "query-controller")
        except (ControlError, OSError):
            return False
        return q["state"] == "running" and q["counters"]["checkpoints"] >= 1
    wait_for(ready, 15, f"controller {ctrl} running")
    return execute(ctrl, "query-controller")


def _kill_in_a_checkpoint(pri: NodeProc, proc: subprocess.Popen) -> None:
    """SIGKILL the controller while the primary holds a checkpoint (between the barrier and
    replication-resume: the secondary's step is under way or next)."""
    watch = QMPClient(timeout=10).connect(pri.control)
    try:
        deadline = time.monotonic() + 10
        while not watch.execute("query-replication")["disks"][0]["holding"]:
            assert time.monotonic() < deadline, "no checkpoint hold seen in 10 s"
        proc.kill()
    finally:
        watch.close()


def test_controller_killed_at_random_moments_adopts_the_running_pair(nodes: Nodes,
                                                                      tmp_path: Any) -> None:
    """kill -9 of the controller three times (the first inside a checkpoint, then at random
    moments) under a writing guest; each restart on the same control socket adopts the
    pair: running, no failover, no sync, the same epoch.  Then a last checkpoint and a
    failover: the secondary is the primary's disk at that checkpoint, every byte."""
    rng = random.Random("controller-kill")
    pair = make_pair(nodes)
    ctrl, log = str(tmp_path / "ctrl.qmp"), str(tmp_path / "ctrl.log")
    pri_q = QMPClient(timeout=10).connect(pair.pri.control)
    proc = _controller(pair, ctrl, log)
    writer = None
    try:
        _adopted(ctrl)
        writer = Writer(pair.pri.uri(), pair.size, max_len=16 << 10).start()
        for round_ in range(3):
            if round_ == 0:
                _kill_in_a_checkpoint(pair.pri, proc)
                try:   # killed before replication-resume: the primary lets go by itself
                    held = pri_q.wait_event("CHECKPOINT_HOLD_EXPIRED", timeout=1.5)["data"]["held"]
                except ControlError:
                    held = None                                # resume was already sent
            else:
                time.sleep(rng.uniform(0.0, 0.5))
                proc.kill()
            proc.wait()
            time.sleep(rng.uniform(0.0, 0.3))                  # nobody checkpoints meanwhile
            proc = _controller(pair, ctrl, log)
            q = _adopted(ctrl)
            seen = {e["event"] for e in q["events"]}
            assert q["epoch"] == 1 and not seen & {"FAILOVER_STARTED", "SYNC_STARTED"}, seen
        time.sleep(0.3)
        image = writer.pause()                                 # every acknowledged write
        assert not writer.errors and writer.writes > 0
        execute(ctrl, "replication-do-checkpoint")
        execute(ctrl, "controller-failover", {"reason": "test"})
        assert read_export(pair.sec.uri("active"), pair.size) == image == file_bytes(pair.pri_disk)
        assert pair.sec.ctl("query-replication")["epoch"] == 2
        with open(log) as f:
            assert f.read().count("FAILOVER_STARTED") == 1
        print(f"\ncontroller killed 3 times under {writer.writes} guest writes (first in a "
              f"checkpoint: hold {'expired after ' + str(held) + 's' if held else 'resumed'}): "
              "adopted each time, one failover (the final one), disks equal")
    finally:
        if writer is not None:
            writer.stop()
        proc.kill()
        proc.wait()
        pri_q.close()
        pair.close()


# -- both nodes die --------------------------------------------------------------------------------

def test_both_nodes_die_primary_first_then_secondary_reprotects_by_checksum(nodes: Nodes) -> None:
    """Both nodes killed under writes: the controller cannot fail over (the secondary is
    gone too); the primary restarts from its own disk, then the secondary: the primary's
    own digest comparison (its dirty map died with it) makes the disks equal, and a
    failover after the next checkpoint gives the primary's disk at that checkpoint."""
    pair = make_pair(nodes)
    try:
        ctl = pair.controller()
        ctl.start()
        writer = Writer(pair.pri.uri(), pair.size, seed=5, span=MiB).start()  # 3 hot MiB
        time.sleep(0.2)
        writer.pause()
        ctl.checkpoint()
        writer.resume()
        time.sleep(0.2)
        pair.sec.kill()
        time.sleep(0.2)                                        # the primary writes alone
        pair.pri.kill()
        writer.stop()
        deadline = time.monotonic() + 1.5                      # past heartbeat-timeout
        while time.monotonic() < deadline:
            ctl.step()
            time.sleep(0.1)
        assert not events(ctl, "FAILOVER_COMPLETED") and ctl.epoch == 1
        forget(nodes, pair.pri)
        pair.pri = nodes.start("primary", "pri", [("disk", pair.pri_disk),
                                                  ("secondary", pair.sec.uri("replica")),
                                                  ("timeout", TIMEOUT),
                                                  ("isolation-timeout", ISOLATION)])
        step_until(ctl, "degraded")                            # the secondary is still down
        pair.restart_secondary()
        step_until(ctl, "running")
        # The restarted primary compared the disks by itself (its dirty map was not saved):
        # the controller compared only at the first start.  What the primary wrote alone
        # (and the secondary's own unsynced writes, if any) is copied: at most the three hot
        # regions, never the whole disk.
        assert len(events(ctl, "SYNC_COMPARED")) == 1
        copies = events(ctl, "RESYNC_COMPLETED")
        assert 0 < copies[-1]["bytes"] <= 3 * MiB + 3 * GRANULARITY, copies
        assert file_bytes(pair.pri_disk) == file_bytes(pair.sec_disk)
        writer = Writer(pair.pri.uri(), pair.size, seed=6).start(file_bytes(pair.pri_disk))
        time.sleep(0.2)
        image = writer.pause()
        ctl.checkpoint()
        writer.resume()
        time.sleep(0.2)                                        # rolled back by the failover
        pair.pri.kill()
        writer.stop()
        step_until(ctl, "failed-over")
        assert read_export(pair.sec.uri("active"), pair.size) == image
        assert ctl.epoch == 2
        print(f"\nboth nodes lost: the restarted primary copied {copies[-1]['bytes']} bytes")
    finally:
        pair.close()


def test_controller_retries_a_failover_whose_secondary_died_in_the_commit(nodes: Nodes) -> None:
    """The primary dies, the controller fails over, the secondary is SIGKILLed inside that
    commit and restarted (it finishes the commit): the controller's retried failover finds
    it done, so the epoch goes up once, and the guest gets the last checkpoint."""
    pair = make_pair(nodes, size=96 * MiB)
    ctl = pair.controller()
    try:
        ctl.start()
        h = pair.pri.client()
        for off in range(0, 64 * MiB, 4 * MiB):                # 64 MiB for the hidden overlay
            h.pwrite(_pattern(3)[off:off + 4 * MiB], off)
        image = file_bytes(pair.pri_disk)
        ctl.checkpoint()
        for off in range(0, 64 * MiB, 4 * MiB):
            h.pwrite(_pattern(4)[off:off + 4 * MiB], off)      # rolled back by the failover
        h.shutdown()
        watch = QMPClient(timeout=30).connect(pair.sec.control)
        runner = threading.Thread(target=ctl.run, daemon=True)
        try:
            pair.pri.kill()
            runner.start()
            while watch.wait_event("FAILOVER_PROGRESS")["data"]["done"] < 16 * MiB:
                pass
            kill9(pair.sec)
        finally:
            watch.close()
        assert _state(pair.sec_disk)["failover_commit"] == 1
        pair.restart_secondary()
        wait_for(lambda: ctl.state == "failed-over", 15, "failed-over")
        ctl.stop()
        runner.join()
        assert ctl.epoch == 2 and pair.sec.ctl("query-replication")["epoch"] == 2
        assert read_export(pair.sec.uri("active"), pair.size) == image
    finally:
        pair.close()
