"""A failover's winner whose node process restarts before it is promoted (kill -9, a
crash, a restart by systemd) serves its disk as it did before: a guest booted on its
``active`` export keeps its disk, and the node can still be promoted.  Driven with the
``repdisk`` command only."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from tests.helpers.cli import SEC, Pair, checkpoint, kill_secondary, replicating_pair
from tests.helpers.commands import qemu, run
from tests.helpers.nodes import MiB, read_file


def test_a_restarted_winner_serves_its_disk_and_can_still_be_promoted(cli_pair: Pair) -> None:
    pri, sec, guest = replicating_pair(cli_pair)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", guest)
    checkpoint(cli_pair, pri, sec)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M", guest)    # after the checkpoint
    os.kill(int(Path(cli_pair.path("pri.pid")).read_text()), signal.SIGKILL)
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    active = f"nbd+unix:///active?socket={cli_pair.path('sec.sock')}"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x33 2M 1M", active)  # the guest, moved here

    kill_secondary(cli_pair)                                       # the winner's node crashes
    cli_pair.repdisk(*SEC, "--disk", "sec.img")
    assert re.match(r"secondary +disk0 +done +epoch 1 +consistent ",
                    cli_pair.repdisk("status", sec).stdout)
    qemu("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x33 2M 1M",
         "-c", "write -P 0x44 4M 1M", "-c", "flush", active)
    again = cli_pair.repdisk("ctl", sec, "start", "mode=secondary", ok=False)
    assert again.returncode == 1 and "won the failover into epoch 1" in again.stderr, again

    # Fail back: A (killed: its 0x22 may be unsent, so it needs the winner's epoch) returns
    # as B's secondary; B, promoted, compares the disks and copies what differs to it.
    cli_pair.repdisk("secondary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                     "pri.sock", "--background", "--pidfile", "pri.pid")
    assert cli_pair.repdisk("ctl", pri, "start", "mode=secondary", "epoch=1").stdout == "ok\n"
    cli_pair.repdisk("ctl", sec, "replication-promote",
                     f"secondary=nbd+unix:///replica?socket={cli_pair.path('pri.sock')}")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=primary").stdout == "ok\n"
    checkpoint(cli_pair, sec, pri)
    want = b"\x11" * MiB + bytes(MiB) + b"\x33" * MiB + bytes(MiB) + b"\x44" * MiB
    assert read_file(cli_pair.path("sec.img"))[:5 * MiB] == want
    assert read_file(cli_pair.path("pri.img")) == read_file(cli_pair.path("sec.img"))
    assert run(["qemu-io", "-f", "raw", "-c", "read -P 0x44 4M 1M",
                f"nbd+unix:///?socket={cli_pair.path('sec.sock')}"], cli_pair.folder
               ).returncode == 0

    # B, promoted since, crashes and is restarted with the command it was first started
    # with: it is the last primary now, not a winner whose replication is over.
    kill_secondary(cli_pair)
    cli_pair.repdisk(*SEC, "--disk", "sec.img")
    failover = cli_pair.repdisk("ctl", sec, "failover", ok=False)
    assert (failover.returncode, failover.stdout) == (1, ""), failover
    assert "replication is not running" in failover.stderr, failover
    start = cli_pair.repdisk("ctl", sec, "start", "mode=secondary", ok=False)
    assert start.returncode == 1 and "this node was the primary of epoch 1 and did not stop " \
        "cleanly" in start.stderr, start


def test_a_promotion_by_hand_to_a_wrong_uri_changes_nothing(cli_pair: Pair) -> None:
    """`replication-promote` by hand probes its new secondary first, as the controller's
    does: the winner's own replica export, or a socket nothing serves, is refused and the
    winner stays as it was (it used to become a primary that could not start)."""
    pri, sec, _ = replicating_pair(cli_pair)
    checkpoint(cli_pair, pri, sec)
    os.kill(int(Path(cli_pair.path("pri.pid")).read_text()), signal.SIGKILL)
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    before = read_file(cli_pair.path("sec.img.state"))
    own = f"nbd+unix:///replica?socket={cli_pair.path('sec.sock')}"
    nowhere = f"nbd+unix:///replica?socket={cli_pair.path('nowhere.sock')}"
    for uri, why in ((own, "is this node's own replica export"),
                     (nowhere, "start the new secondary first, or fix the URI")):
        bad = cli_pair.repdisk("ctl", sec, "replication-promote", f"secondary={uri}", ok=False)
        assert bad.returncode == 1 and why in bad.stderr, bad
        assert read_file(cli_pair.path("sec.img.state")) == before
    assert re.match(r"secondary +disk0 +done +epoch 1 ", cli_pair.repdisk("status", sec).stdout)
