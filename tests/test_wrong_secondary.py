"""A controller whose --secondary is one node while the primary replicates into another
(a mistyped controller-promote URI, a primary started with the wrong --secondary): the
controller must never checkpoint, and so never fail over to, a node that holds none of
the primary's writes.  Driven with the ``repdisk`` command only, as a user would (a user
trial lost a checkpointed write both ways)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from typing import Any

import pytest

from tests.helpers.folder import REPDISK, MiB, controller, kill9, node, qemu_io, repdisk, wait

pytestmark = pytest.mark.timeout(180)


def run(folder: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``repdisk ARGV`` in ``folder``, whatever its exit status."""
    return subprocess.run([REPDISK, *argv], cwd=folder, capture_output=True, text=True,
                          timeout=60)


def disks(folder: str, *names: str) -> None:
    for name in names:
        subprocess.run(["truncate", "-s", str(16 * MiB), os.path.join(folder, name)],
                       check=True)


def primary_into_x(folder: str) -> None:
    """Secondaries sec (s.img) and x (x.img), and pri (p.img): a primary whose --secondary
    is x's replica export, where the controller's will be sec."""
    disks(folder, "p.img", "s.img", "x.img")
    node(folder, "secondary", "s.img", "sec")
    node(folder, "secondary", "x.img", "x")
    node(folder, "primary", "p.img", "pri", "--secondary",
         f"nbd+unix:///replica?socket={folder}/x.sock", "--timeout", "0.5s",
         "--isolation-timeout", "0.6s")


def test_a_promotion_to_another_nodes_uri_is_refused_and_changes_nothing(
        tmp_path: Any) -> None:
    """controller-promote secondary=A uri=X's replica export: refused before the winner
    changes (the URI is served by another node than A), the controller still failed-over,
    the winner still done; the right URI then promotes."""
    folder = str(tmp_path)
    disks(folder, "p.img", "s.img", "x.img")
    try:
        node(folder, "secondary", "s.img", "sec")
        node(folder, "primary", "p.img", "pri", "--secondary",
             f"nbd+unix:///replica?socket={folder}/sec.sock", "--timeout", "0.5s",
             "--isolation-timeout", "0.6s")
        controller(folder, "sec.qmp")
        wait(folder, lambda q: q["state"] == "running", "running pair")
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x11 0 4M")
        repdisk(folder, "ctl", "ctl.qmp", "replication-do-checkpoint")
        kill9(folder, "pri")
        wait(folder, lambda q: q["state"] == "failed-over", "failover")
        node(folder, "secondary", "p.img", "pri")
        node(folder, "secondary", "x.img", "x")
        bad = run(folder, "ctl", "ctl.qmp", "controller-promote", "secondary=pri.qmp",
                  f"uri=nbd+unix:///replica?socket={folder}/x.sock")
        assert (bad.returncode, bad.stdout) == (1, "") and bad.stderr.endswith(
            f"cannot promote: nbd+unix:///replica?socket={folder}/x.sock is served by another "
            "node than the new secondary's control socket names: give that node's replica URI "
            "(its --nbd-socket), or the control socket of the node at this URI\n"), bad.stderr
        swapped = run(folder, "ctl", "ctl.qmp", "controller-promote",    # a tired operator
                      f"secondary=nbd+unix:///replica?socket={folder}/pri.sock", "uri=pri.qmp")
        assert (swapped.returncode, swapped.stdout, swapped.stderr) == (1, "", (
            f"repdisk ctl: secondary=nbd+unix:///replica?socket={folder}/pri.sock is an NBD "
            "URI: secondary= is the node's control socket (its --control), the URI goes in "
            "uri=\n"))
        socket_only = run(folder, "ctl", "ctl.qmp", "controller-promote", "secondary=pri.qmp",
                          "uri=pri.sock")
        assert (socket_only.returncode, socket_only.stderr) == (1, (
            "repdisk ctl: uri=pri.sock is not an NBD URI: give the node's replica export, "
            "uri=nbd+unix:///replica?socket=NBD-SOCKET (its --nbd-socket) or "
            "nbd://HOST:PORT/replica\n"))
        q = json.loads(repdisk(folder, "ctl", "ctl.qmp", "status", "--json"))
        assert (q["state"], q["nodes"]["secondary"]["socket"]) == ("failed-over", "sec.qmp")
        winner = json.loads(repdisk(folder, "ctl", "sec.qmp", "status", "--json"))
        assert (winner["role"], winner["disks"][0]["stage"]) == ("secondary", "done")
        repdisk(folder, "ctl", "ctl.qmp", "controller-promote", "secondary=pri.qmp",
                f"uri=nbd+unix:///replica?socket={folder}/pri.sock")
        wait(folder, lambda q: q["state"] == "running", "the pair protected")
    finally:
        for name in ("ctl", "pri", "sec", "x"):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)


def test_a_secondary_no_primary_replicates_into_is_never_checkpointed(tmp_path: Any) -> None:
    """The primary replicates into X while the controller's --secondary is B: the
    controller refuses to checkpoint B, saying what to fix, so B never becomes consistent
    and the controller does not fail over to it when the primary dies: nothing acknowledged
    is handed over as lost."""
    folder = str(tmp_path)
    try:
        primary_into_x(folder)
        repdisk(folder, "ctl", "x.qmp", "start", "mode=secondary")
        repdisk(folder, "ctl", "pri.qmp", "start", "mode=primary")   # replicating into X
        controller(folder, "sec.qmp")
        q = wait(folder, lambda q: "cannot checkpoint" in (q.get("error") or ""),
                 "a refused checkpoint")
        assert q["error"].endswith(
            "cannot checkpoint: the primary pri.qmp does not replicate into sec.qmp now (its "
            "disk disk0 has no primary connected): if it stays so, the primary's --secondary "
            "names another node's replica export; restart the primary with sec.qmp's, or give "
            "this controller that node's control socket"), q["error"]
        status = repdisk(folder, "status", "sec.qmp")
        assert "INCONSISTENT" in status and "no checkpoint" in status, status
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x55 0 1M")
        kill9(folder, "pri")
        time.sleep(3)                                   # heartbeat-timeout 1.2 s, twice over
        q = json.loads(repdisk(folder, "ctl", "ctl.qmp", "status", "--json"))
        assert q["state"] != "failed-over" and q["failover"] is None, q
        sec = json.loads(repdisk(folder, "ctl", "sec.qmp", "status", "--json"))
        assert (sec["disks"][0]["stage"], sec["disks"][0]["consistent"]) == ("running", False)
    finally:
        for name in ("ctl", "pri", "sec", "x"):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)


def test_a_primary_whose_secondary_is_another_node_is_not_started(tmp_path: Any) -> None:
    """The primary's --secondary names X's replica export, the controller's --secondary is
    B: the controller starts B, then the primary's start is refused, changing nothing, and
    says what to fix (it said to start the secondary at X's URI)."""
    folder = str(tmp_path)
    try:
        primary_into_x(folder)
        controller(folder, "sec.qmp")
        q = wait(folder, lambda q: "start refused" in (q.get("error") or ""), "a refused start")
        assert q["error"].endswith(
            f"start refused: --secondary nbd+unix:///replica?socket={folder}/x.sock is served "
            "by another node than the secondary its controller runs: restart this primary with "
            "that node's replica URI, or give the controller the control socket of the node at "
            f"nbd+unix:///replica?socket={folder}/x.sock"), q["error"]
        pri = json.loads(repdisk(folder, "ctl", "pri.qmp", "status", "--json"))
        x = json.loads(repdisk(folder, "ctl", "x.qmp", "status", "--json"))
        assert (pri["disks"][0]["stage"], pri["epoch"], x["disks"][0]["stage"]) == \
            ("none", 0, "none")
        assert json.loads(repdisk(folder, "ctl", "sec.qmp", "status", "--json")
                          )["disks"][0]["stage"] == "running"      # the controller's own
    finally:
        for name in ("ctl", "pri", "sec", "x"):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)
