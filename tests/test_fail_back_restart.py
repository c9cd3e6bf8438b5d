"""After the README's fail-back by hand (the winner promoted, the old primary its
secondary), both nodes stopped cleanly and started again in their *first* roles, as a
tired operator types the README's first commands: the disks are equal and nothing is
unsent, so the pair runs and is protected (it was accepted, then every checkpoint of the
secondary was ignored as "took over in a failover", and a controller refused it as the
winner of a failover, so it could never fail over again).  Only the ``repdisk`` command."""

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


def failed_back_and_stopped(folder: str) -> None:
    """pri (p.img) and sec (s.img) by hand, 0x11 in the first MiB checkpointed, sec failed
    over, then the README's fail-back: p.img the winner's secondary, sec promoted, 0x22 in
    the second MiB checkpointed; both stopped cleanly (primary first)."""
    for disk in ("p.img", "s.img"):
        subprocess.run(["truncate", "-s", str(16 * MiB), os.path.join(folder, disk)], check=True)
    node(folder, "secondary", "s.img", "sec")
    node(folder, "primary", "p.img", "pri", "--secondary",
         f"nbd+unix:///replica?socket={folder}/sec.sock")
    repdisk(folder, "ctl", "sec.qmp", "start", "mode=secondary")
    repdisk(folder, "ctl", "pri.qmp", "start", "mode=primary")
    qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x11 0 1M")
    checkpoint(folder, "pri.qmp", "sec.qmp")
    repdisk(folder, "ctl", "sec.qmp", "failover")
    deadline = time.monotonic() + 15                      # pri's probe finds the winner
    while not json.loads(repdisk(folder, "ctl", "pri.qmp", "status", "--json"))["fenced"]:
        assert time.monotonic() < deadline, "pri did not fence itself"
        time.sleep(0.2)
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


def expected(folder: str, third: bytes) -> None:
    """sec's disk after its failover: the two checkpointed MiB, then ``third``."""
    with open(os.path.join(folder, "s.img"), "rb") as f:
        assert f.read(3 * MiB) == b"\x11" * MiB + b"\x22" * MiB + third


def stop_all(folder: str) -> None:
    for name in ("ctl", "pri", "sec"):
        with contextlib.suppress(OSError, ValueError):
            kill9(folder, name)


def test_by_hand_the_pair_in_its_first_roles_checkpoints_and_fails_over(
        tmp_path: Any) -> None:
    folder = str(tmp_path)
    try:
        failed_back_and_stopped(folder)
        repdisk(folder, "ctl", "sec.qmp", "start", "mode=secondary")
        repdisk(folder, "ctl", "pri.qmp", "start", "mode=primary")
        checkpoint(folder, "pri.qmp", "sec.qmp")
        q = json.loads(repdisk(folder, "ctl", "sec.qmp", "status", "--json"))
        assert (q["failed-over"], q["disks"][0]["consistent"]) == (False, True)
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x33 2M 1M")
        repdisk(folder, "ctl", "sec.qmp", "failover")
        expected(folder, bytes(MiB))                # 0x33 came after the checkpoint
    finally:
        stop_all(folder)


def test_a_controller_runs_the_pair_in_its_first_roles(tmp_path: Any) -> None:
    folder = str(tmp_path)
    try:
        failed_back_and_stopped(folder)
        controller(folder)                  # it starts both nodes, not refuses the secondary
        wait(folder, lambda q: q["state"] == "running", "running pair")
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x33 2M 1M")
        repdisk(folder, "ctl", "ctl.qmp", "checkpoint")
        kill9(folder, "pri")
        wait(folder, lambda q: q["state"] == "failed-over", "failover")
        expected(folder, b"\x33" * MiB)
    finally:
        stop_all(folder)
