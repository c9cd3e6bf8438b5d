"""A primary whose secondary failed over while it still served (a failover by hand, or a
second promotion by a cluster manager) is superseded: the secondary refuses its writes
(EPERM), and from then on it acknowledges none, so none is acknowledged and then lost.
A secondary that only stopped replicating (no failover) leaves its primary serving.
Driven with the ``repdisk`` command only."""

from __future__ import annotations

import time

import nbd
import pytest

from tests.helpers.cli import Pair
from tests.helpers.commands import qemu
from tests.helpers.nodes import MiB


def start_pair(pair: Pair, write_mode: str) -> tuple[str, str, str]:
    """A running pair with 0x11 in its first MiB checkpointed; (pri, sec, guest URI)."""
    pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp", "--nbd-socket",
                 "sec.sock", "--background", "--pidfile", "sec.pid")
    pair.repdisk("primary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                 "pri.sock", "--secondary", f"nbd+unix:///replica?socket={pair.path('sec.sock')}",
                 "--write-mode", write_mode, "--background", "--pidfile", "pri.pid")
    pri, sec = pair.path("pri.qmp"), pair.path("sec.qmp")
    assert pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    assert pair.repdisk("ctl", pri, "start", "mode=primary").stdout == "ok\n"
    guest = f"nbd+unix:///?socket={pair.path('pri.sock')}"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", guest)
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    return pri, sec, guest


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
