"""What a primary's secondary lacks survives the primary's stop, crash and restart
(issue 15, item 1: DRBD's on-disk bitmap).

Run as a user runs it: ``repdisk lab``, ``qemu-io`` and ``repdisk ctl`` only.  A write
acknowledged while the secondary is down must be on the secondary's disk after the
primary restarts, the next checkpoint and a failover, whether the primary stopped
cleanly (its dirty map is saved and read back) or was killed (its state file says it did
not stop cleanly, so it compares the disks by digest before replicating).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from repdisk.block.dirtymap import DirtyMap
from repdisk.errors import ConfigError
from repdisk.node.state import NodeState
from tests.helpers.commands import REPDISK, lab_processes, qemu, run

MiB = 1 << 20
SIZE = 64 * MiB


def repdisk(folder: str, *argv: str) -> str:
    result = run([REPDISK, *argv], folder, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def pid(folder: str, role: str) -> int:
    with open(os.path.join(folder, f"{role}.pid")) as f:
        return int(f.read())


def kill9(folder: str, role: str) -> None:
    p = pid(folder, role)
    os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(proc.pid == p for proc in lab_processes(folder)):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def state(folder: str) -> dict:
    with open(os.path.join(folder, "pri.img.state")) as f:
        return json.load(f)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("stop", ["clean", "kill -9"])
def test_write_acknowledged_while_degraded_survives_a_primary_restart(lab_dir: str, stop: str,
                                                                      mode: str) -> None:
    repdisk("/", "lab", "--dir", lab_dir, "--size", "64M", "--write-mode", mode)
    assert state(lab_dir)["unclean"] is True           # serving: only a clean stop knows
    kill9(lab_dir, "sec")
    guest = f"nbd+unix:///?socket={lab_dir}/pri.sock"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 1M", guest)   # acknowledged
    if stop == "clean":
        repdisk(lab_dir, "lab", "--down", "--dir", lab_dir)
        assert state(lab_dir)["unclean"] is False
        saved = DirtyMap.load(os.path.join(lab_dir, "pri.img.state.disk0.dirtymap"), SIZE)
        assert saved.runs() == [(0, MiB)]
    else:
        kill9(lab_dir, "pri")
        assert state(lab_dir)["unclean"] is True
        repdisk(lab_dir, "lab", "--down", "--dir", lab_dir)  # removes the sockets and pids
    repdisk(lab_dir, "lab", "--dir", lab_dir, "--write-mode", mode)
    pri, sec = f"{lab_dir}/pri.qmp", f"{lab_dir}/sec.qmp"
    log = Path(lab_dir, "pri.log").read_text()
    if stop == "kill -9":
        assert "disk0: compared with the secondary in" in log and ": 1048576 bytes differ" in log
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert repdisk(lab_dir, "ctl", sock, cmd) == "ok\n"
    assert "consistent" in repdisk(lab_dir, "status", sec)
    assert repdisk(lab_dir, "ctl", sec, "failover") == "ok\n"
    active = f"nbd+unix:///active?socket={lab_dir}/sec.sock"
    qemu("qemu-io", "-f", "raw", "-c", "read -P 0x66 0 1M", "-c", f"read -P 0 1M {SIZE - MiB}",
         active)
    with open(os.path.join(lab_dir, "sec.img"), "rb") as f:
        assert f.read() == b"\x66" * MiB + bytes(SIZE - MiB)


def test_clean_stop_of_an_in_sync_primary_leaves_no_map_and_copies_nothing(lab_dir: str
                                                                          ) -> None:
    repdisk("/", "lab", "--dir", lab_dir, "--size", "64M")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M",
         f"nbd+unix:///?socket={lab_dir}/pri.sock")
    repdisk(lab_dir, "lab", "--down", "--dir", lab_dir)
    assert state(lab_dir)["unclean"] is False
    assert not os.path.exists(os.path.join(lab_dir, "pri.img.state.disk0.dirtymap"))
    repdisk(lab_dir, "lab", "--dir", lab_dir)
    q = json.loads(repdisk(lab_dir, "ctl", f"{lab_dir}/pri.qmp", "query-replication", "--json"))
    assert q["disks"][0]["counters"]["forwarded"] == 0    # nothing was copied at start
    said = Path(lab_dir, "pri.log").read_text()
    assert "did not stop cleanly" not in said
    # The lab took no checkpoint, so no file is recorded as the secondary's synced copy:
    # the primary compares (what it finds is nothing).
    assert said.count("says its disk is new to it") == 2, said
    assert said.count("compared with the secondary in") == 2
    assert said.count(": 0 bytes differ") == 2


@pytest.mark.parametrize("stop", ["clean", "kill -9"])
def test_a_primary_with_writes_its_peer_lacks_is_refused_as_its_secondary(lab_dir: str,
                                                                          stop: str) -> None:
    """The disks started in swapped roles: the old primary's disk, holding a write only it
    has, would be overwritten by the other's resync.  Its start as a secondary in the same
    epoch is refused and changes nothing; an epoch above is the operator's way to say the
    writes are no longer wanted."""
    repdisk("/", "lab", "--dir", lab_dir, "--size", "64M")
    kill9(lab_dir, "sec")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 1M",
         f"nbd+unix:///?socket={lab_dir}/pri.sock")                     # acknowledged
    if stop == "kill -9":
        kill9(lab_dir, "pri")
    repdisk(lab_dir, "lab", "--down", "--dir", lab_dir)
    before = state(lab_dir)
    assert before["role"] == "primary"
    # Paths name the lab folder: the fixture stops every nbdkit whose command line does.
    a, b = f"{lab_dir}/a", f"{lab_dir}/b"
    repdisk(lab_dir, "secondary", "--disk", f"{lab_dir}/pri.img", "--control", f"{a}.qmp",
            "--nbd-socket", f"{a}.sock", "--background")
    repdisk(lab_dir, "primary", "--disk", f"{lab_dir}/sec.img", "--control", f"{b}.qmp",
            "--nbd-socket", f"{b}.sock", "--secondary",
            f"nbd+unix:///replica?socket={a}.sock", "--background")
    assert len(lab_processes(lab_dir)) == 2
    bad = run([REPDISK, "ctl", "a.qmp", "start", "mode=secondary"], lab_dir, timeout=60)
    why = ("did not stop cleanly, so its disks may hold writes its secondary lacks"
           if stop == "kill -9" else
           "holds writes its secondary lacks (disk0: 1048576 bytes in "
           f"{lab_dir}/pri.img.state.disk0.dirtymap)")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == (f"repdisk: GenericError: epoch: this node was the primary of epoch "
                          f"{before['epoch']} and {why}: if its peer did not fail over since, "
                          "start it as the primary again (it sends them to its secondary); if "
                          "it did, start it as the winner's secondary with "
                          f"epoch={before['epoch'] + 1} or the winner's epoch (those writes "
                          "are dropped: its primary compares the disks and copies over them)\n")
    assert state(lab_dir) == before
    assert "none" in repdisk(lab_dir, "status", "a.qmp")        # still not started
    with open(os.path.join(lab_dir, "pri.img"), "rb") as f:
        assert f.read(MiB) == b"\x66" * MiB
    # A controller would start it in its own first epoch (1): it refuses, says why in
    # status, and changes nothing either.
    ctl0 = f"{lab_dir}/c0.qmp"
    repdisk(lab_dir, "controller", "--primary", f"{b}.qmp", "--secondary", f"{a}.qmp",
            "--control", ctl0, "--background", "--pidfile", f"{ctl0}.pid")
    try:
        deadline = time.monotonic() + 30
        while not json.loads(repdisk(lab_dir, "ctl", ctl0, "query-controller", "--json")
                             ).get("error"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        said = repdisk(lab_dir, "status", ctl0).splitlines()
        assert said[-1].startswith(f"controller error: {a}.qmp was the primary of epoch "
                                   f"{before['epoch']} and {why}: start it as the primary "
                                   "again"), said
    finally:
        with open(f"{ctl0}.pid") as f:
            os.kill(int(f.read()), signal.SIGTERM)
    assert state(lab_dir) == before
    with open(os.path.join(lab_dir, "pri.img"), "rb") as f:
        assert f.read(MiB) == b"\x66" * MiB
    epoch = before["epoch"] + 1
    assert repdisk(lab_dir, "ctl", "a.qmp", "start", "mode=secondary",
                   f"epoch={epoch}") == "ok\n"
    assert state(lab_dir)["role"] == "secondary" and state(lab_dir)["epoch"] == epoch
    # ... and a controller starts its primary in that epoch, the disks compared first
    ctl = f"{lab_dir}/c.qmp"
    repdisk(lab_dir, "controller", "--primary", f"{b}.qmp", "--secondary", f"{a}.qmp",
            "--control", ctl, "--background", "--pidfile", f"{ctl}.pid")
    try:
        deadline = time.monotonic() + 30
        while json.loads(repdisk(lab_dir, "ctl", ctl, "query-controller", "--json")
                         )["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with open(os.path.join(lab_dir, "pri.img"), "rb") as x, \
                open(os.path.join(lab_dir, "sec.img"), "rb") as y:
            assert x.read() == y.read()                      # the unwanted write is gone
    finally:
        with open(f"{ctl}.pid") as f:
            os.kill(int(f.read()), signal.SIGTERM)


UNCLEAN = "did not stop cleanly, so its disks may hold writes its secondary lacks"


@pytest.mark.parametrize("state,epoch,unsent,refusal", [
    # The last primary with writes its peer may lack: not in its own epoch.
    (NodeState(epoch=2, role="primary"), None, UNCLEAN, "was the primary of epoch 2"),
    (NodeState(epoch=2, role="primary"), 3, UNCLEAN, None),
    # ... unless it was fenced: it lost a failover, those writes are superseded.
    (NodeState(epoch=2, role="primary", fenced="lost"), None, UNCLEAN, None),
    # A winner not promoted since holds the newest data.
    (NodeState(epoch=2, role="secondary", failed_over=True), None, "", "won the failover"),
    (NodeState(epoch=2, role="secondary", failed_over=True), 3, "", None),
    # A node that won once and was then a primary is the last primary, not the winner:
    # fenced since (it lost a later failover), or stopped with nothing unsent.
    (NodeState(epoch=2, role="primary", failed_over=True, fenced="lost"), None, UNCLEAN, None),
    (NodeState(epoch=2, role="primary", failed_over=True), None, "", None),
])
def test_which_secondary_start_a_nodes_state_allows(state: NodeState, epoch: int | None,
                                                     unsent: str, refusal: str | None) -> None:
    before = NodeState(**{k: v for k, v in vars(state).items()})
    if refusal is None:
        state.check_start("secondary", epoch, unsent)
    else:
        with pytest.raises(ConfigError, match=refusal):
            state.check_start("secondary", epoch, unsent)
    assert state == before                                  # a check changes nothing


def test_an_old_primary_restarted_without_a_controller_comes_up_fenced(lab_dir: str) -> None:
    """The primary is lost, its secondary fails over (epoch 1), and the old primary is
    started again with its old command while no controller runs: it sees the winner's
    newer epoch and refuses guest writes from its first one, which the winner would never
    have (they would be lost at the re-protect)."""
    repdisk("/", "lab", "--dir", lab_dir, "--size", "64M")
    guest = f"nbd+unix:///?socket={lab_dir}/pri.sock"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", guest)
    pri, sec = f"{lab_dir}/pri.qmp", f"{lab_dir}/sec.qmp"
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert repdisk(lab_dir, "ctl", sock, cmd) == "ok\n"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M", guest)   # after the checkpoint
    kill9(lab_dir, "pri")
    assert repdisk(lab_dir, "ctl", sec, "failover") == "ok\n"
    assert state(lab_dir)["epoch"] == 0
    c = f"{lab_dir}/c"
    replica = f"nbd+unix:///replica?socket={lab_dir}/sec.sock"
    repdisk(lab_dir, "primary", "--disk", f"{lab_dir}/pri.img", "--control", f"{c}.qmp",
            "--nbd-socket", f"{c}.sock", "--secondary", replica, "--background")
    why = (f"the node at --secondary {replica} is in epoch 1, newer than this node's 0: it "
           "won a failover and holds the newest data")
    q = json.loads(repdisk(lab_dir, "ctl", f"{c}.qmp", "status", "--json"))
    assert q["fenced"] == why and state(lab_dir)["fenced"] == why
    assert f"FENCED ({why})" in repdisk(lab_dir, "status", f"{c}.qmp")
    refused = run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M",
                   f"nbd+unix:///?socket={c}.sock"], lab_dir, timeout=60)
    assert "Operation not permitted" in refused.stdout + refused.stderr
    with open(os.path.join(lab_dir, "pri.img"), "rb") as f:
        assert f.read(MiB) == b"\x22" * MiB                           # untouched
    start = run([REPDISK, "ctl", f"{c}.qmp", "start", "mode=primary"], lab_dir, timeout=60)
    assert start.returncode == 1 and "this node was fenced" in start.stderr
    qemu("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M",
         f"nbd+unix:///active?socket={lab_dir}/sec.sock")             # the winner: checkpoint


def test_an_old_primary_that_meets_the_winner_later_is_fenced_then(lab_dir: str) -> None:
    """As above, but the winner is down when the old primary starts again: it serves (it
    cannot know), and the first contact, its start, fences it instead of failing obscurely."""
    repdisk("/", "lab", "--dir", lab_dir, "--size", "64M")
    pri, sec = f"{lab_dir}/pri.qmp", f"{lab_dir}/sec.qmp"
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert repdisk(lab_dir, "ctl", sock, cmd) == "ok\n"
    kill9(lab_dir, "pri")
    assert repdisk(lab_dir, "ctl", sec, "failover") == "ok\n"
    os.kill(pid(lab_dir, "sec"), signal.SIGTERM)                    # the winner goes away
    deadline = time.monotonic() + 10
    while lab_processes(lab_dir):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c, replica = f"{lab_dir}/c", f"nbd+unix:///replica?socket={lab_dir}/sec.sock"
    repdisk(lab_dir, "primary", "--disk", f"{lab_dir}/pri.img", "--control", f"{c}.qmp",
            "--nbd-socket", f"{c}.sock", "--secondary", replica, "--background")
    assert json.loads(repdisk(lab_dir, "ctl", f"{c}.qmp", "status", "--json"))["fenced"] is None
    repdisk(lab_dir, "secondary", "--disk", f"{lab_dir}/sec.img", "--control",
            f"{lab_dir}/s2.qmp", "--nbd-socket", f"{lab_dir}/sec.sock", "--background")
    assert re.match(r"secondary +disk0 +done +epoch 1 ",                 # the winner, again
                    repdisk(lab_dir, "status", f"{lab_dir}/s2.qmp"))
    start = run([REPDISK, "ctl", f"{c}.qmp", "start", "mode=primary"], lab_dir, timeout=60)
    why = (f"the node at --secondary {replica} is in epoch 1, newer than this node's 0: it "
           "won a failover and holds the newest data")
    assert (start.returncode, start.stderr) == (1, (
        f"repdisk: GenericError: epoch: start refused, and this node is fenced now: {why}; "
        "start its disk as that node's secondary\n"))
    assert state(lab_dir)["fenced"] == why
    refused = run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M",
                   f"nbd+unix:///?socket={c}.sock"], lab_dir, timeout=60)
    assert "Operation not permitted" in refused.stdout + refused.stderr
