"""A controller restarted with its first options finds the nodes that replaced them.

The failure matrix says: restart the controller on the same sockets.  After a failover and
a promotion of a node on a *new* control socket (the issue 14 reproduction's ``old.qmp``),
the options' ``--primary`` is dead and the pair is the winner plus that new node; the
controller's pair file (``CONTROL.pair``) remembers it.  Only the ``repdisk`` command is
used, as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from typing import Any

import pytest

from tests.helpers.folder import MiB, controller, kill9, node, qemu_io, repdisk, wait

pytestmark = pytest.mark.timeout(180)


def failed_over_pair(folder: str, size: int) -> None:
    """pri (p.img) and sec (s.img) under a controller, 0x11 in the first 4 MiB
    checkpointed, then pri killed: the controller failed over to sec (epoch 2)."""
    for disk in ("p.img", "s.img"):
        subprocess.run(["truncate", "-s", str(size), os.path.join(folder, disk)], check=True)
    node(folder, "secondary", "s.img", "sec")
    node(folder, "primary", "p.img", "pri", "--secondary",
         f"nbd+unix:///replica?socket={folder}/sec.sock", "--timeout", "0.5s",
         "--isolation-timeout", "0.6s")
    controller(folder)
    wait(folder, lambda q: q["state"] == "running", "running pair")
    qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x11 0 4M")
    repdisk(folder, "ctl", "ctl.qmp", "replication-do-checkpoint")
    kill9(folder, "pri")
    wait(folder, lambda q: q["state"] == "failed-over", "failover")


def test_restart_with_the_first_options_runs_the_pair_as_it_is_now(tmp_path: Any) -> None:
    folder = str(tmp_path)
    try:
        failed_over_pair(folder, 32 * MiB)
        node(folder, "secondary", "p.img", "old")          # a new control socket
        os.mkdir(os.path.join(folder, "sub"))              # typed relative to another folder
        repdisk(os.path.join(folder, "sub"), "ctl", "../ctl.qmp", "controller-promote",
                "secondary=../old.qmp", "uri=nbd+unix:///replica?socket=../old.sock")
        wait(folder, lambda q: q["state"] == "running", "protected pair")
        with open(os.path.join(folder, "ctl.qmp.pair")) as f:
            assert json.load(f) == {"options": ["pri.qmp", "sec.qmp"], "primary": "sec.qmp",
                                    "secondary": f"{folder}/old.qmp", "write_mode": "sync",
                                    "max_lag": 256 * MiB}

        kill9(folder, "ctl")
        controller(folder)                                   # the first options again
        q = wait(folder, lambda q: q["state"] == "running" and q["nodes"]["secondary"]["ok"],
                 "the pair adopted")
        assert (q["nodes"]["primary"]["socket"], q["nodes"]["secondary"]["socket"]) == \
            ("sec.qmp", f"{folder}/old.qmp")
        assert q["epoch"] == 2
        with open(os.path.join(folder, "ctl.log")) as f:
            assert "the pair changed since these options were first given: sec.qmp is its " \
                "primary node now" in f.read()
        # It runs the pair: a write after its next checkpoint is on both disks.
        qemu_io(folder, f"nbd+unix:///?socket={folder}/sec.sock", "write -P 0x22 0 1M")
        t = time.time()
        wait(folder, lambda q: any(c["time"] - c["duration"] > t
                                   for c in q["last_checkpoints"]), "a checkpoint")
        with open(os.path.join(folder, "p.img"), "rb") as f:
            assert f.read(MiB) == b"\x22" * MiB
    finally:
        for name in ("ctl", "pri", "sec", "old"):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)


def test_a_controller_restarted_during_its_start_waits_for_the_start_under_way(
        tmp_path: Any) -> None:
    """kill -9 of a controller while the primary's start copies: the node's start goes on,
    and the next controller waits for it instead of starting again (which failed with
    "replication is running or done ..."), then protects."""
    folder = str(tmp_path)
    with open(os.path.join(folder, "p.img"), "wb") as f:
        f.write(os.urandom(16 * MiB))
    subprocess.run(["truncate", "-s", str(16 * MiB), os.path.join(folder, "s.img")], check=True)
    try:
        node(folder, "secondary", "s.img", "sec")
        node(folder, "primary", "p.img", "pri", "--secondary",
             f"nbd+unix:///replica?socket={folder}/sec.sock", "--timeout", "0.5s",
             "--isolation-timeout", "0.6s", "--resync-rate", "4M")
        controller(folder)
        wait(folder, lambda q: (q.get("progress") or {}).get("done", 0) > 0, "a copy under way")
        kill9(folder, "ctl")
        controller(folder)
        wait(folder, lambda q: q["state"] == "running", "the pair protected")
        with open(os.path.join(folder, "ctl.log")) as f:
            log = f.read().split("control socket listening")[-1]     # the second controller
        assert "pri.qmp: a start is under way on the primary (asked for before this " \
               "controller): waiting for it" in log
        assert "WARNING" not in log.replace("WARNING repdisk.controller.controller: pri.qmp: "
                                            "a start is under way", ""), log
        with open(os.path.join(folder, "p.img"), "rb") as p, \
                open(os.path.join(folder, "s.img"), "rb") as s:
            assert p.read() == s.read()
    finally:
        for name in ("ctl", "pri", "sec"):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)


def test_a_winner_failed_back_by_hand_is_adopted_without_a_restart(tmp_path: Any) -> None:
    """The controller failed over; the operator follows the README's fail-back by hand
    (the old primary's disk as the winner's secondary, ``replication-promote``) instead of
    controller-promote.  The running controller adopts the pair as the nodes describe it
    at a heartbeat, with no restart: the roles swap, its pair file records them, and a new
    write reaches both disks, which are equal."""
    folder = str(tmp_path)
    try:
        failed_over_pair(folder, 16 * MiB)
        node(folder, "secondary", "p.img", "pri")                  # the README's steps
        repdisk(folder, "ctl", "pri.qmp", "start", "mode=secondary", "epoch=2")   # killed
        repdisk(folder, "ctl", "sec.qmp", "replication-promote",     # below heartbeat-timeout
                f"secondary=nbd+unix:///replica?socket={folder}/pri.sock", "timeout=0.5s",
                "isolation-timeout=0.6s")
        q = wait(folder, lambda q: q["state"] == "running" and q["nodes"]["secondary"]["ok"],
                 "the pair adopted")
        assert (q["nodes"]["primary"]["socket"], q["nodes"]["secondary"]["socket"]) == \
            ("sec.qmp", "pri.qmp")
        with open(os.path.join(folder, "ctl.qmp.pair")) as f:
            assert json.load(f)["primary"] == "sec.qmp"
        qemu_io(folder, f"nbd+unix:///?socket={folder}/sec.sock", "write -P 0x22 4M 1M")
        t = time.time()
        wait(folder, lambda q: any(c["time"] - c["duration"] > t
                                   for c in q["last_checkpoints"]), "a checkpoint")
        with open(os.path.join(folder, "p.img"), "rb") as p, \
                open(os.path.join(folder, "s.img"), "rb") as s:
            a = p.read()
            assert a == s.read()
        assert a[:5 * MiB] == b"\x11" * (4 * MiB) + b"\x22" * MiB
    finally:
        for name in ("ctl", "pri", "sec"):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)
