"""After the README's fail-back by hand (the winner promoted, the old primary its
secondary), both nodes stopped cleanly and started again in their *first* roles, as a
tired operator types the README's first commands.  It was accepted, then every checkpoint
of the secondary was ignored, so the pair could never fail over again; and had the winner
had another secondary meanwhile, the old primary's disk copied over its writes (a user
trial lost a checkpointed write so).  Now the old primary's start as the primary is
refused, changing nothing, and the roles the nodes had last run.  Only ``repdisk``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from typing import Any

import pytest

from tests.helpers.folder import (
    REPDISK,
    MiB,
    controller,
    kill9,
    node,
    qemu_io,
    repdisk,
    wait,
)

pytestmark = pytest.mark.timeout(180)


def checkpoint(folder: str, primary: str, secondary: str) -> None:
    """The README's checkpoint by hand: the primary's barrier and hold, the secondary's,
    the primary's resume."""
    for sock, cmd in ((primary, "checkpoint"), (secondary, "checkpoint"), (primary, "resume")):
        assert repdisk(folder, "ctl", sock, cmd) == "ok\n", (sock, cmd)


def replicating(folder: str) -> None:
    """pri (p.img) and sec (s.img) by hand, replication started (secondary first)."""
    for disk in ("p.img", "s.img"):
        subprocess.run(["truncate", "-s", str(16 * MiB), os.path.join(folder, disk)], check=True)
    node(folder, "secondary", "s.img", "sec")
    node(folder, "primary", "p.img", "pri", "--secondary",
         f"nbd+unix:///replica?socket={folder}/sec.sock")
    repdisk(folder, "ctl", "sec.qmp", "start", "mode=secondary")
    repdisk(folder, "ctl", "pri.qmp", "start", "mode=primary")


def failed_back_and_stopped(folder: str) -> None:
    """pri (p.img) and sec (s.img) by hand, 0x11 in the first MiB checkpointed, sec failed
    over, then the README's fail-back: p.img the winner's secondary, sec promoted, 0x22 in
    the second MiB checkpointed; both stopped cleanly (primary first)."""
    replicating(folder)
    qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x11 0 1M")
    checkpoint(folder, "pri.qmp", "sec.qmp")
    repdisk(folder, "ctl", "sec.qmp", "failover")
    deadline = time.monotonic() + 15                      # pri's probe finds the winner
    while not json.loads(repdisk(folder, "ctl", "pri.qmp", "status", "--json"))["fenced"]:
        assert time.monotonic() < deadline, "pri did not fence itself"
        time.sleep(0.2)
    ignored = subprocess.run([REPDISK, "ctl", "pri.qmp", "checkpoint"], cwd=folder,
                             capture_output=True, text=True, timeout=60)
    assert ignored.returncode == 3 and ignored.stdout.startswith(
        "ignored  this primary was fenced (") and ignored.stdout.endswith(
        "): its replication is over; restart its disk as the winner's secondary (repdisk "
        "secondary --disk ...), in the winner's epoch\n"), ignored   # not "repdisk primary"
    repdisk(folder, "down", "pri.qmp")
    started = subprocess.run([REPDISK, "secondary", "--disk", "p.img", "--control", "pri.qmp",
                              "--nbd-socket", "pri.sock", "--background"], cwd=folder,
                             capture_output=True, text=True, timeout=60)
    assert (started.returncode, started.stderr) == (0, ""), started   # the README's output:
    assert started.stdout.startswith("repdisk secondary: serving (pid ")  # no FENCED line
    repdisk(folder, "ctl", "pri.qmp", "start", "mode=secondary")
    repdisk(folder, "ctl", "sec.qmp", "replication-promote",
            f"secondary=nbd+unix:///replica?socket={folder}/pri.sock")
    repdisk(folder, "ctl", "sec.qmp", "start", "mode=primary")
    checkpoint(folder, "sec.qmp", "pri.qmp")
    qemu_io(folder, f"nbd+unix:///?socket={folder}/sec.sock", "write -P 0x22 1M 1M")
    checkpoint(folder, "sec.qmp", "pri.qmp")
    repdisk(folder, "down", "sec.qmp", "pri.qmp")
    node(folder, "secondary", "s.img", "sec")                 # the first roles again
    node(folder, "primary", "p.img", "pri", "--secondary",
         f"nbd+unix:///replica?socket={folder}/sec.sock", "--timeout", "0.5s",
         "--isolation-timeout", "0.6s")


REFUSED = ("this node was last a secondary (epoch 1) and won no failover: a node that was "
           "the primary since may hold writes this disk lacks, and this primary would copy "
           "over them; start that node as the primary (the one last a primary, in the highest "
           "epoch: repdisk status of each), or, if this disk holds the newest data, start "
           "this one with epoch=2")


def roles_now(folder: str) -> None:
    """Both stopped, then started in the roles they had last: s.img (the promoted winner)
    the primary, p.img its secondary."""
    repdisk(folder, "down", "pri.qmp", "sec.qmp")
    node(folder, "secondary", "p.img", "pri")
    node(folder, "primary", "s.img", "sec", "--secondary",
         f"nbd+unix:///replica?socket={folder}/pri.sock", "--timeout", "0.5s",
         "--isolation-timeout", "0.6s")


def expected(folder: str, third: bytes) -> None:
    """p.img after its failover: the two checkpointed MiB, then ``third``."""
    with open(os.path.join(folder, "p.img"), "rb") as f:
        assert f.read(3 * MiB) == b"\x11" * MiB + b"\x22" * MiB + third


def stop_all(folder: str) -> None:
    for name in ("ctl", "pri", "sec"):
        with contextlib.suppress(OSError, ValueError):
            kill9(folder, name)


def test_by_hand_the_first_roles_are_refused_and_the_roles_now_run(tmp_path: Any) -> None:
    """p.img, last a secondary of epoch 1, may not be its primary: s.img may have had
    another secondary since, whose writes a primary p.img would copy over (a user trial
    lost a checkpointed write so).  The refusal changes nothing; the roles they had last
    then run, checkpoint and fail over to exactly the last checkpoint."""
    folder = str(tmp_path)
    try:
        failed_back_and_stopped(folder)
        repdisk(folder, "ctl", "sec.qmp", "start", "mode=secondary")
        bad = subprocess.run([REPDISK, "ctl", "pri.qmp", "start", "mode=primary"], cwd=folder,
                             capture_output=True, text=True, timeout=60)
        assert (bad.returncode, bad.stdout, bad.stderr) == (
            1, "", f"repdisk: GenericError: epoch: {REFUSED}\n")
        q = json.loads(repdisk(folder, "ctl", "pri.qmp", "status", "--json"))
        assert (q["epoch"], q["disks"][0]["stage"]) == (1, "none")
        roles_now(folder)          # s.img was the primary of epoch 1: it may be again
        repdisk(folder, "ctl", "pri.qmp", "start", "mode=secondary")
        repdisk(folder, "ctl", "sec.qmp", "start", "mode=primary")
        checkpoint(folder, "sec.qmp", "pri.qmp")
        q = json.loads(repdisk(folder, "ctl", "pri.qmp", "status", "--json"))
        assert (q["failed-over"], q["disks"][0]["consistent"]) == (False, True)
        qemu_io(folder, f"nbd+unix:///?socket={folder}/sec.sock", "write -P 0x33 2M 1M")
        repdisk(folder, "ctl", "pri.qmp", "failover")
        expected(folder, bytes(MiB))                # 0x33 came after the checkpoint
    finally:
        stop_all(folder)


def test_a_controller_of_the_first_roles_says_why_and_of_the_roles_now_runs(
        tmp_path: Any) -> None:
    folder = str(tmp_path)
    try:
        failed_back_and_stopped(folder)
        controller(folder)
        q = wait(folder, lambda q: REFUSED in (q.get("error") or ""), "the refused start")
        assert q["state"] == "starting", q
        kill9(folder, "ctl")
        roles_now(folder)
        controller(folder)                  # its options name the first roles: it adopts
        wait(folder, lambda q: q["state"] == "running", "running pair")
        qemu_io(folder, f"nbd+unix:///?socket={folder}/sec.sock", "write -P 0x33 2M 1M")
        repdisk(folder, "ctl", "ctl.qmp", "checkpoint")
        kill9(folder, "sec")
        wait(folder, lambda q: q["state"] == "failed-over", "failover")
        expected(folder, b"\x33" * MiB)
    finally:
        stop_all(folder)


def test_an_old_primary_restarted_as_a_secondary_does_not_fail_over_alone(
        tmp_path: Any) -> None:
    """After a failover, the old primary's disk restarted and started as a secondary in its
    own epoch, with no primary: a checkpoint by hand (QEMU's semantics) made it consistent,
    and its failover made a second winner of epoch 1 beside the first, both serving
    writes (a user trial).  The failover is refused, changing nothing."""
    folder = str(tmp_path)
    try:
        replicating(folder)
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x22 0 1M")
        checkpoint(folder, "pri.qmp", "sec.qmp")
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x33 0 1M")
        repdisk(folder, "ctl", "sec.qmp", "failover")
        repdisk(folder, "down", "pri.qmp")
        node(folder, "secondary", "p.img", "pri")
        repdisk(folder, "ctl", "pri.qmp", "start", "mode=secondary")
        repdisk(folder, "ctl", "pri.qmp", "checkpoint")
        bad = subprocess.run([REPDISK, "ctl", "pri.qmp", "failover"], cwd=folder,
                             capture_output=True, text=True, timeout=60)
        assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", (
            "repdisk: GenericError: epoch: cannot fail over: this node was the primary of "
            "epoch 0 until it restarted as a secondary, and no newer primary has written to "
            "it since: its peer may have failed over already, and a second winner of epoch 1 "
            "would make two writers; start it as the winner's secondary (epoch=1), or as the "
            "primary again\n"))
        q = json.loads(repdisk(folder, "ctl", "pri.qmp", "status", "--json"))
        assert (q["epoch"], q["failed-over"], q["disks"][0]["stage"]) == (0, False, "running")
    finally:
        stop_all(folder)
