"""A pair's life, cycle after cycle, through the command line only (issue 14).

Two nodes and a controller are started as a user starts them (``repdisk secondary``,
``repdisk primary``, ``repdisk controller``, all ``--background``), driven with
``repdisk ctl`` and written by fio (``--verify=crc32c``).  Each cycle, in alternating
direction (a -> b, then b -> a, ...):

1. fio writes the cycle's own 4 MiB region; the controller checkpoints it by itself;
2. fio writes a 2 MiB region after that checkpoint, and the primary is killed (kill -9);
3. the controller fails over by itself; on the survivor fio ``--verify_only`` checks
   every region checkpointed so far (this cycle's and all earlier ones, which went
   through every earlier promotion's resync), and the post-checkpoint region reads as
   zeros (rolled back) unless a checkpoint slipped in before the kill;
4. the dead side's disk comes back as a secondary through ``controller-promote``;
5. at the next checkpoint the pair is protected and both disk files are equal.

Interleaved: a promote before the new secondary is up and one with a wrong URI (both
refused, nothing changes); the controller killed (kill -9) and restarted with its
*original* options between a failover and the promotion, and again in a running pair whose
roles are swapped; a secondary killed in the middle of a resync (the primary's
``resync-rate`` makes that resync last about two seconds).

Runtime: 70-100 s per write mode on the shared machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest

REPDISK = os.path.join(os.path.dirname(sys.executable), "repdisk")
MiB = 1 << 20
SIZE = 64 * MiB
REGION = 4 * MiB            # checkpointed by cycle i at i * REGION
POST_AT = 32 * MiB          # written after the checkpoint by cycle i at POST_AT + i * POST
POST = 2 * MiB
BULK_AT, BULK = 48 * MiB, 16 * MiB   # written while the secondary is down (mid-resync kill)
CYCLES = 6

pytestmark = pytest.mark.timeout(600)


def repdisk(folder: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([REPDISK, *argv], cwd=folder, capture_output=True, text=True,
                         timeout=120)
    if check:
        assert run.returncode == 0, f"repdisk {' '.join(argv)}: {run.stderr}{run.stdout}"
    return run


def fio(uri: str, jobs: list[tuple[int, int, int]], verify_only: bool = False) -> None:
    """One fio run over ``(offset, size, seed)`` jobs: 64 KiB random writes, crc32c."""
    argv = ["fio", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k",
            "--iodepth=4", "--verify=crc32c", "--do_verify=0", "--group_reporting",
            "--verify_state_save=0"]  # no local-jN-0-verify.state in the working folder
    if verify_only:
        argv += ["--verify_only=1", "--verify_fatal=1"]
    for i, (offset, size, seed) in enumerate(jobs):
        argv += [f"--name=j{i}", f"--offset={offset}", f"--size={size}", f"--randseed={seed}"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and " err= 0" in run.stdout, run.stdout + run.stderr


def reads_zeros(uri: str, offset: int, length: int) -> bool:
    run = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c",
                          f"read -P 0 {offset} {length}", uri],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return "Pattern verification failed" not in run.stdout


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} still runs"


def kill_ours(pid: int, folder: str) -> None:
    """kill -9 of a process of this test (its command line names the test's folder): a pid
    file left by a process that is gone may name another program's process by now."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = folder.encode() in f.read()
    except OSError:
        ours = False
    assert ours, f"pid {pid} is not one of this test's processes"
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)


@dataclass
class Site:
    """One side: its disk and the node on it (either role, over time)."""

    folder: str
    name: str

    def path(self, ext: str) -> str:
        return os.path.join(self.folder, f"{self.name}.{ext}")

    @property
    def control(self) -> str:
        return self.path("qmp")

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.path('sock')}"

    def start(self, role: str, *keys: str) -> None:
        repdisk(self.folder, role, "--disk", self.path("img"), "--control", self.control,
                "--nbd-socket", self.path("sock"), "--background", "--pidfile", self.path("pid"),
                "--log", self.path("log"), *keys)

    def kill(self) -> None:
        with open(self.path("pid")) as f:
            kill_ours(int(f.read()), self.folder)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            self.kill()


class Cycler:
    def __init__(self, folder: str, write_mode: str) -> None:
        self.folder, self.write_mode = folder, write_mode
        self.a, self.b = Site(folder, "a"), Site(folder, "b")
        self.ctl = os.path.join(folder, "ctl.qmp")
        self.ctl_log = os.path.join(folder, "ctl.log")
        self.checkpointed: list[tuple[int, int, int]] = []
        self.rollbacks_checked = 0

    # -- the controller ----------------------------------------------------------------

    def start_controller(self) -> None:
        """Always with the original options: a is --primary, b --secondary."""
        repdisk(self.folder, "controller", "--primary", self.a.control, "--secondary",
                self.b.control, "--control", self.ctl, "--interval", "4s", "--heartbeat",
                "100ms", "--heartbeat-timeout", "1.2s", "--background", "--pidfile",
                self.ctl + ".pid", "--log", self.ctl_log)

    def kill_controller(self) -> None:
        with open(self.ctl + ".pid") as f:
            kill_ours(int(f.read()), self.folder)

    def query(self) -> dict[str, Any]:
        return json.loads(repdisk(self.folder, "ctl", self.ctl, "query-controller",
                                  "--json").stdout)

    def wait(self, what: str, pred: Any, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        q: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            try:
                q = self.query()
            except AssertionError:          # the controller is restarting
                q = None
            if q is not None and pred(q):
                return q
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout:g}s: {q and q['state']}; "
                             f"{q and q['events'][-5:]}")

    def checkpoint_after(self, t: float) -> dict[str, Any]:
        """The first checkpoint the controller completes (by itself) after ``t``."""
        return self.wait(f"checkpoint after {t:.1f}", lambda q: q["state"] == "running" and any(
            c["time"] - c["duration"] > t for c in q["last_checkpoints"]), 30)

    def roles(self, q: dict[str, Any]) -> tuple[Site, Site]:
        by_control = {s.control: s for s in (self.a, self.b)}
        return (by_control[q["nodes"]["primary"]["socket"]],
                by_control[q["nodes"]["secondary"]["socket"]])

    # -- the steps ---------------------------------------------------------------------

    def bring_up(self) -> None:
        for site in (self.a, self.b):
            subprocess.run(["truncate", "-s", str(SIZE), site.path("img")], check=True)
        self.b.start("secondary")
        self.a.start("primary", "--secondary", self.b.uri("replica"), "--timeout", "1s",
                     "--isolation-timeout", "0.6s", "--write-mode", self.write_mode,
                     "--resync-rate", "8M")
        self.start_controller()
        self.wait("running pair", lambda q: q["state"] == "running")

    def secondary_killed_mid_resync(self) -> None:
        q = self.query()
        pri, sec = self.roles(q)
        sec.kill()
        self.wait("degraded", lambda q: q["state"] == "degraded")
        fio(pri.uri(), [(BULK_AT, BULK, 99)])
        said = os.path.getsize(self.ctl_log)
        sec.start("secondary")
        deadline = time.monotonic() + 30
        while "RESYNC_STARTED" not in _since(self.ctl_log, said):
            assert time.monotonic() < deadline, "no resync started"
            time.sleep(0.01)
        time.sleep(0.3)
        sec.kill()                                          # mid-copy (8 MiB/s, 16 MiB)
        log = self.wait("failed resync", lambda q: any(
            e["event"] == "CONTROLLER_STATE_CHANGED" and e["data"]["from"] == "resyncing"
            and e["data"]["to"] == "degraded"
            for e in q["events"]))
        assert log["state"] == "degraded"
        sec.start("secondary")
        t = time.time()
        self.checkpoint_after(t)
        self.assert_equal_disks()

    def cycle(self, i: int) -> None:
        q = self.query()
        pri, sec = self.roles(q)
        assert q["state"] == "running" and q["nodes"]["primary"]["role"] == "primary"
        job = (i * REGION, REGION, 1000 + i)
        fio(pri.uri(), [job])
        written = time.time()
        if i == 3:   # the controller killed in a running pair and restarted (roles swapped)
            self.kill_controller()
            self.start_controller()
        self.checkpointed.append(job)
        before = self.checkpoint_after(written)
        seq = before["last_checkpoints"][-1]["seq"]
        fio(pri.uri(), [(POST_AT + i * POST, POST, 2000 + i)])   # after the checkpoint
        pri.kill()
        q = self.wait("failover", lambda q: q["state"] == "failed-over", 30)
        assert q["nodes"]["secondary"]["socket"] == sec.control
        fio(sec.uri("active"), self.checkpointed, verify_only=True)
        if q["last_checkpoints"][-1]["seq"] == seq:                 # none slipped in
            assert reads_zeros(sec.uri("active"), POST_AT + i * POST, POST)
            self.rollbacks_checked += 1
        # no write-mode=: the promoted node keeps the lost primary's (cycle 2: as the pair
        # file remembers it for a controller restarted after the failover)
        promote = ["ctl", self.ctl, "controller-promote", f"secondary={pri.control}",
                   f"uri={pri.uri('replica')}"]
        if i == 0:   # the new secondary is not up yet: refused, nothing changes
            bad = repdisk(self.folder, *promote, check=False)
            assert bad.returncode == 1 and "does not answer" in bad.stderr, bad.stderr
            assert self.query()["state"] == "failed-over"
        pri.start("secondary")
        if i == 1:   # a wrong URI: refused by the winner before anything changes
            nowhere = f"nbd+unix:///replica?socket={pri.path('nosock')}"
            for uri, said in (
                    (nowhere, "; start the new secondary first, or fix the URI\n"),
                    # the winner's own replica export (it answers, with the right size)
                    (sec.uri("replica"), f"cannot promote: {sec.uri('replica')} is this "
                                         "node's own replica export: give the new "
                                         "secondary's URI\n"),
                    # the new secondary's active export, not its replica
                    (pri.uri("active"), f"cannot promote: {pri.uri('active')} names export "
                                        "'active', not a secondary's replica export: give its "
                                        "replica export (.../replica?...)\n")):
                wrong = promote[:4] + [f"uri={uri}"] + promote[5:]
                bad = repdisk(self.folder, *wrong, check=False)
                assert bad.returncode == 1 and bad.stderr.endswith(said), bad.stderr
                q = self.query()
                assert q["state"] == "failed-over" and self.roles(q) == (pri, sec)
        if i == 2:   # the controller killed between failover and promotion, restarted
            self.kill_controller()
            self.start_controller()
            self.wait("failed-over adopted", lambda q: q["state"] == "failed-over", 30)
        promoted = time.time()
        repdisk(self.folder, *promote)
        q = self.checkpoint_after(promoted)
        assert self.roles(q) == (sec, pri)
        with open(pri.path("img") + ".state") as f:     # the node made a secondary
            state = json.load(f)
        assert state["role"] == "secondary" and state["epoch"] == q["epoch"] == 2 + i
        assert state["failed_over"] is False and state["fenced"] == ""
        mode = json.loads(repdisk(self.folder, "ctl", sec.control, "status", "--json").stdout
                          )["disks"][0]["write_mode"]
        assert mode == self.write_mode
        self.assert_equal_disks()

    def assert_equal_disks(self) -> None:
        with open(self.a.path("img"), "rb") as fa, open(self.b.path("img"), "rb") as fb:
            while True:
                x, y = fa.read(MiB), fb.read(MiB)
                assert x == y, f"the disks differ near byte {fa.tell()}"
                if not x:
                    return

    def close(self) -> None:
        for stop in (self.kill_controller, self.a.stop, self.b.stop):
            with contextlib.suppress(OSError, ValueError, AssertionError):
                stop()


def _since(path: str, offset: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_cycles_through_the_command_line(tmp_path: Any, write_mode: str) -> None:
    cycler = Cycler(str(tmp_path), write_mode)
    try:
        t0 = time.monotonic()
        cycler.bring_up()
        cycler.secondary_killed_mid_resync()
        for i in range(CYCLES):
            cycler.cycle(i)
        q = cycler.query()
        assert q["epoch"] == 1 + CYCLES and q["counters"]["failovers"] >= 1
        assert cycler.rollbacks_checked >= CYCLES // 2
        log = _since(cycler.ctl_log, 0)
        # A node restart never costs a failed attempt on a dead connection; a lost node is
        # one line (and one when it is back), not an error every heartbeat.
        assert "Disconnected" not in log and "qemu.qmp" not in log
        kills = 2 + CYCLES + 2                  # nodes killed, and controllers restarted
        lost = re.findall(r" node \S+ lost: ", log)
        assert 0 < len(lost) <= kills, lost
        print(f"\n{write_mode}: {CYCLES} cycles in {time.monotonic() - t0:.1f}s, "
              f"{cycler.rollbacks_checked} rollbacks checked")
    finally:
        cycler.close()
