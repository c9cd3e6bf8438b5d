"""A primary whose secondary failed over while it still served (a failover by hand, or a
second promotion by a cluster manager) is superseded: the secondary refuses its writes
(EPERM), and from then on it acknowledges none, so none is acknowledged and then lost.
A secondary that only stopped replicating (no failover) leaves its primary serving.
Driven with the ``repdisk`` command only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import nbd
import pytest

from repdisk.cli import nodeproc
from tests.helpers.cli import Pair, kill_secondary
from tests.helpers.commands import REPDISK, qemu
from tests.helpers.nodes import MiB, read_file


def start_pair(pair: Pair, write_mode: str) -> tuple[str, str, str]:
    """A running pair with 0x11 in its first MiB checkpointed; (pri, sec, guest URI)."""
    pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp", "--nbd-socket",
                 "sec.sock", "--background", "--pidfile", "sec.pid")
    start_primary(pair, write_mode)
    pri, sec = pair.path("pri.qmp"), pair.path("sec.qmp")
    assert pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    assert pair.repdisk("ctl", pri, "start", "mode=primary").stdout == "ok\n"
    guest = f"nbd+unix:///?socket={pair.path('pri.sock')}"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", guest)
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    return pri, sec, guest


def start_primary(pair: Pair, write_mode: str) -> subprocess.CompletedProcess:
    return pair.repdisk("primary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                 "pri.sock", "--secondary", f"nbd+unix:///replica?socket={pair.path('sec.sock')}",
                 "--write-mode", write_mode, "--background", "--pidfile", "pri.pid")


def writes_until_refused(guest: str) -> int:
    """Write (and flush) 64 KiB pieces until one fails with EPERM; how many succeeded
    (a failure other than EPERM fails the test; 20 successes: -1)."""
    h = nbd.NBD()
    h.connect_uri(guest)
    try:
        for i in range(20):
            try:
                h.pwrite(bytes([0x20 + i]) * 65536, 2 * MiB + i * 65536)
                h.flush()
            except nbd.Error as err:
                assert err.errno == "EPERM", err
                return i
            time.sleep(0.05)
        return -1
    finally:
        h.shutdown()


@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_a_primary_whose_secondary_failed_over_acknowledges_no_more_writes(
        cli_pair: Pair, write_mode: str) -> None:
    pri, sec, guest = start_pair(cli_pair, write_mode)
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    acknowledged = writes_until_refused(guest)
    # sync: the first write already; async acknowledges a write once local, and learns of
    # the failover from the refusal of its write-back
    assert acknowledged == 0 if write_mode == "sync" else acknowledged >= 0, acknowledged
    status = cli_pair.repdisk("status", pri).stdout
    assert "FENCED" in status and "won a failover" in status, status


def test_a_secondary_that_only_stopped_replicating_leaves_its_primary_serving(
        cli_pair: Pair) -> None:
    pri, sec, guest = start_pair(cli_pair, "sync")
    assert cli_pair.repdisk("ctl", sec, "stop").stdout == "ok\n"     # no failover
    assert writes_until_refused(guest) == -1
    status = cli_pair.repdisk("status", pri).stdout
    assert "FENCED" not in status and "DEGRADED" in status, status


def test_a_secondary_started_in_a_mistyped_epoch_fences_nobody(cli_pair: Pair) -> None:
    """`start mode=secondary epoch=5` by mistake: the secondary refuses the primary (older
    epoch) and says why, but it wrote nothing in epoch 5, so the primary is not fenced
    (its disk is the newest) and goes on, degraded; moved to epoch 5 it resyncs."""
    pri, sec, guest = start_pair(cli_pair, "sync")
    kill_secondary(cli_pair)
    cli_pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp", "--nbd-socket",
                     "sec.sock", "--background", "--pidfile", "sec.pid")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary", "epoch=5").stdout == "ok\n"
    bad = cli_pair.repdisk("ctl", pri, "resync", ok=False)
    assert bad.stderr.endswith("refused this primary: refusing a primary of epoch 0: this node "
                               "is in epoch 5 (this node was started in that epoch, it won no "
                               "failover in it: if that start's epoch= was a typo, see "
                               "docs/failure-matrix.md, 'a secondary started in a wrong "
                               "epoch')\n"), bad.stderr
    assert writes_until_refused(guest) == -1                       # not fenced
    status = cli_pair.repdisk("status", pri).stdout
    assert "FENCED" not in status and "DEGRADED" in status, status
    # status says what the refused resync said, not what first broke the link
    refusal = bad.stderr.removeprefix("repdisk: GenericError: disk0: ").rstrip("\n")
    assert status.endswith(f"error: {refusal}; writes are kept local and tracked as dirty "
                           "until resync\n"), (status, refusal)
    # a restart asks the secondary's epoch: newer, but it wrote nothing in it
    nodeproc.stop_pidfile(cli_pair.path("pri.pid"))
    start_primary(cli_pair, "sync")
    status = cli_pair.repdisk("status", pri).stdout
    assert "FENCED" not in status and "none" in status, status
    # the way out: the secondary's state holds nothing but the mistaken epoch; moved away,
    # the secondary starts afresh, new to its primary, which compares before it copies
    kill_secondary(cli_pair)
    os.rename(cli_pair.path("sec.img.state"), cli_pair.path("sec.img.state.mistaken"))
    cli_pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp", "--nbd-socket",
                     "sec.sock", "--background", "--pidfile", "sec.pid")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    assert cli_pair.repdisk("ctl", pri, "start", "mode=primary").stdout == "ok\n"
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert cli_pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    assert read_file(cli_pair.path("sec.img")) == read_file(cli_pair.path("pri.img"))


def test_a_failback_by_hand_without_an_epoch_never_leaves_two_writers(cli_pair: Pair) -> None:
    """B fails over (epoch 1); A is restarted as B's secondary with a plain `start
    mode=secondary` (its state still says epoch 0); B, promoted, replicates into it.  A joins
    epoch 1 at B's first session, so a failover of A starts epoch 2, above its writer's, and
    B, refused, fences itself: never two nodes writing in one epoch."""
    pri, sec, _ = start_pair(cli_pair, "sync")                     # A: pri.qmp, B: sec.qmp
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    nodeproc.stop_pidfile(cli_pair.path("pri.pid"))
    cli_pair.repdisk("secondary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                     "pri.sock", "--background", "--pidfile", "pri.pid")
    assert cli_pair.repdisk("ctl", pri, "start", "mode=secondary").stdout == "ok\n"
    cli_pair.repdisk("ctl", sec, "replication-promote",
                     f"secondary=nbd+unix:///replica?socket={cli_pair.path('pri.sock')}")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=primary").stdout == "ok\n"
    for sock, cmd in ((sec, "checkpoint"), (pri, "checkpoint"), (sec, "resume")):
        assert cli_pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    assert "epoch 1" in cli_pair.repdisk("status", pri).stdout
    # durable: written before B's first write reached A's disk
    assert json.loads(read_file(cli_pair.path("pri.img.state")))["epoch"] == 1
    assert cli_pair.repdisk("ctl", pri, "failover").stdout == "ok\n"
    assert re.match(r"secondary +disk0 +done +epoch 2 ", cli_pair.repdisk("status", pri).stdout)
    b_guest = f"nbd+unix:///?socket={cli_pair.path('sec.sock')}"
    assert writes_until_refused(b_guest) == 0                      # sync: refused at once
    status = cli_pair.repdisk("status", sec).stdout
    assert "FENCED" in status and "epoch 2" in status, status


@pytest.mark.parametrize("stop", ["clean", "kill -9"])
def test_a_failback_by_hand_with_a_step_forgotten_leaves_no_two_writers(
        cli_pair: Pair, stop: str) -> None:
    """B fails over (epoch 1); A's disk is restarted as a secondary but not started, and
    B's start as A's primary is refused ("not started yet").  That refusal changes
    nothing on A: A restarted as a primary is fenced by B's newer epoch, not a second
    writer in it.  Started as B's secondary (killed: with B's epoch), A joins epoch 1 and
    the fail-back completes, both disks equal."""
    pri, sec, _ = start_pair(cli_pair, "sync")                     # A: pri.qmp, B: sec.qmp
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    if stop == "clean":
        nodeproc.stop_pidfile(cli_pair.path("pri.pid"))
    else:
        os.kill(int(open(cli_pair.path("pri.pid")).read()), 9)   # noqa: SIM115
        wait_gone(cli_pair.path("pri.qmp"))
    before = read_file(cli_pair.path("pri.img.state"))
    a_secondary = ("secondary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                   "pri.sock", "--background", "--pidfile", "pri.pid")
    cli_pair.repdisk(*a_secondary)
    replica = f"nbd+unix:///replica?socket={cli_pair.path('pri.sock')}"
    cli_pair.repdisk("ctl", sec, "replication-promote", f"secondary={replica}")
    refused = cli_pair.repdisk("ctl", sec, "start", "mode=primary", ok=False)
    assert refused.returncode == 1 and "is not started yet: start it first" in refused.stderr
    assert read_file(cli_pair.path("pri.img.state")) == before     # the refusal moved nothing
    restarted_a_is_fenced_in_epoch_0(cli_pair)
    # The fail-back as it should go: A as B's secondary, started, then B.
    cli_pair.repdisk("down", pri)
    cli_pair.repdisk(*a_secondary)
    start = ["start", "mode=secondary"] + (["epoch=1"] if stop == "kill -9" else [])
    assert cli_pair.repdisk("ctl", pri, *start).stdout == "ok\n"
    assert cli_pair.repdisk("ctl", sec, "start", "mode=primary").stdout == "ok\n"
    for sock, cmd in ((sec, "checkpoint"), (pri, "checkpoint"), (sec, "resume")):
        assert cli_pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    assert re.match(r"secondary +disk0 +running +epoch 1 +consistent",
                    cli_pair.repdisk("status", pri).stdout)
    assert read_file(cli_pair.path("pri.img")) == read_file(cli_pair.path("sec.img"))


def test_a_refused_secondary_start_leaves_the_epoch_it_had(cli_pair: Pair) -> None:
    """B fails over (epoch 1) and writes to A's disk, restarted as a secondary, whose
    start is then typed with the wrong mode and refused.  A multi-step start completes or
    rolls back: A did not join B's epoch, so A restarted as a primary is fenced by it."""
    pri, sec, _ = start_pair(cli_pair, "sync")
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    cli_pair.repdisk("down", pri)
    before = read_file(cli_pair.path("pri.img.state"))
    cli_pair.repdisk("secondary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                     "pri.sock", "--background", "--pidfile", "pri.pid")
    replica = f"nbd+unix:///replica?socket={cli_pair.path('pri.sock')}"
    cli_pair.repdisk("ctl", sec, "replication-promote", f"secondary={replica}")
    refused = cli_pair.repdisk("ctl", sec, "start", "mode=primary", ok=False)
    assert "is not started yet: start it first" in refused.stderr, refused
    wrong = cli_pair.repdisk("ctl", pri, "start", "mode=primary", ok=False)
    assert (wrong.returncode, wrong.stderr) == (1, (
        "repdisk: GenericError: disk0: start failed: the start mode primary does not match "
        "this disk's mode secondary: start this node with mode=secondary, or send "
        "mode=primary to the primary's control socket\n")), wrong
    assert read_file(cli_pair.path("pri.img.state")) == before     # the refusal moved nothing
    restarted_a_is_fenced_in_epoch_0(cli_pair)


def test_a_demoted_primary_restarted_as_a_primary_comes_up_fenced(cli_pair: Pair) -> None:
    """A switchover by hand (demote A, promote B: epoch 1), then A restarted with its usual
    `repdisk primary` command: its state says it was last a secondary, and its --secondary
    writes in a newer epoch, so it serves no write (it would be dropped at the resync)."""
    pri, sec, _ = start_pair(cli_pair, "sync")
    assert cli_pair.repdisk("ctl", pri, "replication-demote").stdout == "ok\n"
    cli_pair.repdisk("ctl", sec, "replication-promote",
                     f"secondary=nbd+unix:///replica?socket={cli_pair.path('pri.sock')}")
    cli_pair.repdisk("down", pri)
    started = start_primary(cli_pair, "sync")
    assert started.stderr.startswith("repdisk primary: FENCED, it takes no write: the node "
                                     "at --secondary "), started.stderr   # said at once
    status = cli_pair.repdisk("status", pri).stdout
    assert "FENCED (the node at --secondary" in status and "is in epoch 1, newer than this " \
        "node's 0" in status, status
    assert writes_until_refused(f"nbd+unix:///?socket={cli_pair.path('pri.sock')}") == 0


def test_a_second_forced_promotion_is_refused(cli_pair: Pair) -> None:
    """`replication-promote force=true` (Pacemaker's, for the pair's last primary) on both
    nodes of a stopped pair: the first takes epoch 1; the second is refused, naming the
    first as the newest, and changes nothing, so never two writers in one epoch."""
    pri, sec, _ = start_pair(cli_pair, "sync")
    cli_pair.repdisk("down", pri, sec)
    for name in ("pri", "sec"):
        cli_pair.repdisk("secondary", "--disk", f"{name}.img", "--control", f"{name}.qmp",
                         "--nbd-socket", f"{name}.sock", "--background", "--pidfile",
                         f"{name}.pid")
    a_replica = f"nbd+unix:///replica?socket={cli_pair.path('pri.sock')}"
    b_replica = f"nbd+unix:///replica?socket={cli_pair.path('sec.sock')}"
    cli_pair.repdisk("ctl", pri, "replication-promote", f"secondary={b_replica}", "force=true")
    before = read_file(cli_pair.path("sec.img.state"))
    bad = cli_pair.repdisk("ctl", sec, "replication-promote", f"secondary={a_replica}",
                           "force=true", ok=False)
    assert (bad.returncode, bad.stderr) == (1, (
        f"repdisk: GenericError: cannot promote by force: the node at {a_replica} writes in "
        "epoch 1, newer than this node's 0: it holds the newest data; start this disk as its "
        "secondary instead\n")), bad
    assert read_file(cli_pair.path("sec.img.state")) == before
    assert re.match(r"secondary +disk0 +none +epoch 0 ", cli_pair.repdisk("status", sec).stdout)


def test_a_degraded_primary_fences_itself_once_a_winner_answers(cli_pair: Pair) -> None:
    """No controller: the secondary B is lost, A goes on alone (degraded), and B's disk
    comes back as the writer of a newer epoch (here forced, as Pacemaker's agent would).
    A, which would otherwise acknowledge writes that the pair will drop until its next
    start, asks its --secondary now and then while degraded and fences itself."""
    pri, sec, guest = start_pair(cli_pair, "sync")
    kill_secondary(cli_pair)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 64k", guest)    # degraded, alone
    assert "DEGRADED" in cli_pair.repdisk("status", pri).stdout
    cli_pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp", "--nbd-socket",
                     "sec.sock", "--background", "--pidfile", "sec.pid")
    cli_pair.repdisk("ctl", sec, "replication-promote", "force=true",
                     f"secondary=nbd+unix:///replica?socket={cli_pair.path('pri.sock')}")
    deadline = time.monotonic() + 15                  # every isolation-timeout (3 s)
    while "FENCED" not in (status := cli_pair.repdisk("status", pri).stdout):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert "is in epoch 1, newer than this node's 0" in status, status
    assert writes_until_refused(guest) == 0


def restarted_a_is_fenced_in_epoch_0(pair: Pair) -> None:
    """A (pri.*) stopped and restarted as a primary: fenced in epoch 0, it takes no write."""
    pair.repdisk("down", pair.path("pri.qmp"))
    start_primary(pair, "sync")
    status = pair.repdisk("status", pair.path("pri.qmp")).stdout
    assert "FENCED" in status and "epoch 0" in status, status
    assert writes_until_refused(f"nbd+unix:///?socket={pair.path('pri.sock')}") == 0


def wait_gone(control: str) -> None:
    """Until nothing serves ``control`` (a killed node's socket stays: it refuses)."""
    deadline = time.monotonic() + 10
    while nodeproc.serving(control) is not None:
        assert time.monotonic() < deadline, f"{control} still served"
        time.sleep(0.05)


def test_a_secondary_checkpoint_without_the_primarys_is_refused(cli_pair: Pair) -> None:
    """`repdisk ctl SEC checkpoint` alone, while the primary's start copies: the disk is
    half a copy, and a checkpoint would make it "consistent" for a failover.  It is
    refused, changing nothing, until a checkpoint of the primary came first with no write
    since; so is one after a guest write."""
    with open(cli_pair.path("pri.img"), "r+b") as f:
        f.write(os.urandom(8 * MiB))
    pri, sec = cli_pair.path("pri.qmp"), cli_pair.path("sec.qmp")
    cli_pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp", "--nbd-socket",
                     "sec.sock", "--background", "--pidfile", "sec.pid")
    cli_pair.repdisk("primary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                     "pri.sock", "--secondary", f"nbd+unix:///replica?socket={cli_pair.path('sec.sock')}",
                     "--resync-rate", "2M", "--background", "--pidfile", "pri.pid")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    starting = subprocess.Popen([REPDISK, "ctl", pri, "start", "mode=primary"],
                                stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)                                            # a quarter of the copy
    refusal = ("repdisk: GenericError: disk0: no checkpoint: the primary wrote since its last "
               "checkpoint (or took none yet: a copy may be under way); checkpoint the primary "
               "first (repdisk ctl PRI checkpoint, then this, then repdisk ctl PRI resume), or "
               "let a controller do it\n")
    lone = cli_pair.repdisk("ctl", sec, "checkpoint", ok=False)
    assert (lone.returncode, lone.stderr) == (1, refusal)
    assert "INCONSISTENT" in cli_pair.repdisk("status", sec).stdout
    assert starting.wait(30) == 0 and starting.stdout.read() == "ok\n"
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert cli_pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    assert "  consistent" in cli_pair.repdisk("status", sec).stdout
    assert read_file(cli_pair.path("sec.img")) == read_file(cli_pair.path("pri.img"))
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64k",
         f"nbd+unix:///?socket={cli_pair.path('pri.sock')}")
    lone = cli_pair.repdisk("ctl", sec, "checkpoint", ok=False)
    assert (lone.returncode, lone.stderr) == (1, refusal)
