"""A secondary restarted on a disk that is new to it (replaced, its state file lost, or a
group's disks swapped) gets compared, not just the primary's dirty map: its checkpointed
data must survive a failover.  Driven with the ``repdisk`` command only."""

from __future__ import annotations

import os

import pytest

from tests.helpers.cli import (
    SEC,
    SIZE,
    Pair,
    checkpoint,
    kill_secondary,
    replicating_pair,
)
from tests.helpers.commands import qemu
from tests.helpers.nodes import MiB, make_disk, read_file


@pytest.mark.parametrize("how", ["replaced", "state lost"])
def test_a_secondary_restarted_on_a_new_disk_is_compared(cli_pair: Pair, how: str) -> None:
    pri, sec, guest = replicating_pair(cli_pair)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", guest)
    checkpoint(cli_pair, pri, sec)                      # the secondary holds 0x11

    kill_secondary(cli_pair)
    os.unlink(cli_pair.path("sec.img"))                 # a new, empty disk in its place
    make_disk(cli_pair.path("sec.img"), SIZE)
    if how == "state lost":
        os.unlink(cli_pair.path("sec.img.state"))
    cli_pair.repdisk(*SEC, "--disk", "sec.img")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 6M 1M", guest)    # dirty meanwhile
    # the 4 MiB the new disk lacks, found by comparing, and the 1 MiB in the dirty map
    assert cli_pair.repdisk("ctl", pri, "resync").stdout == "bytes  5.0 MiB\n"
    checkpoint(cli_pair, pri, sec)

    expect = b"\x11" * (4 * MiB) + bytes(2 * MiB) + b"\x22" * MiB + bytes(SIZE - 7 * MiB)
    assert read_file(cli_pair.path("sec.img")) == expect
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    active = f"nbd+unix:///active?socket={cli_pair.path('sec.sock')}"
    qemu("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 4M", "-c", "read -P 0x22 6M 1M",
         active)


def test_a_secondary_restarted_on_the_same_disk_copies_only_what_is_dirty(
        cli_pair: Pair) -> None:
    """The record of which file was synced is what spares a restart the comparison."""
    pri, sec, guest = replicating_pair(cli_pair)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", guest)
    checkpoint(cli_pair, pri, sec)
    kill_secondary(cli_pair)
    cli_pair.repdisk(*SEC, "--disk", "sec.img")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 6M 1M", guest)
    assert cli_pair.repdisk("ctl", pri, "resync").stdout == "bytes  1.0 MiB\n"
    with open(cli_pair.path("pri.log"), encoding="utf-8") as f:
        said = f.read()
    # compared at the first start only (the secondary's disk was new to it then)
    assert said.count("says its disk is new to it") == 1, said


def test_a_secondary_restarted_with_its_group_disks_swapped_is_compared(
        cli_pair: Pair) -> None:
    """Two disks of a group given the other way round (a:b's file, b:a's) are each new to
    the disk they now are: both are compared, and a failover finds each disk's own data."""
    for name in ("pri-a", "pri-b", "sec-a", "sec-b"):
        make_disk(cli_pair.path(f"{name}.img"), SIZE)
    sec_disks = ("--disk", "a:sec-a.img", "--disk", "b:sec-b.img")
    cli_pair.repdisk(*SEC, *sec_disks)
    cli_pair.repdisk("primary", "--disk", "a:pri-a.img", "--disk", "b:pri-b.img",
                     "--control", "pri.qmp", "--nbd-socket", "pri.sock", "--secondary",
                     f"nbd+unix:///replica?socket={cli_pair.path('sec.sock')}",
                     "--background", "--pidfile", "pri.pid")
    pri, sec = cli_pair.path("pri.qmp"), cli_pair.path("sec.qmp")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    assert cli_pair.repdisk("ctl", pri, "start", "mode=primary").stdout == "ok\n"
    for disk, pattern in (("a", "0x11"), ("b", "0x22")):
        qemu("qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 2M",
             f"nbd+unix:///{disk}?socket={cli_pair.path('pri.sock')}")
    checkpoint(cli_pair, pri, sec)

    kill_secondary(cli_pair)
    cli_pair.repdisk(*SEC, "--disk", "a:sec-b.img", "--disk", "b:sec-a.img")
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    # each disk differs in its 2 MiB; the dirty maps are empty
    assert cli_pair.repdisk("ctl", pri, "resync").stdout == "bytes  4.0 MiB\n"
    checkpoint(cli_pair, pri, sec)
    assert read_file(cli_pair.path("sec-b.img"))[:2 * MiB] == b"\x11" * (2 * MiB)   # a's now
    assert read_file(cli_pair.path("sec-a.img"))[:2 * MiB] == b"\x22" * (2 * MiB)   # b's now
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    for disk, pattern in (("a", "0x11"), ("b", "0x22")):
        qemu("qemu-io", "-f", "raw", "-c", f"read -P {pattern} 0 2M",
             f"nbd+unix:///active/{disk}?socket={cli_pair.path('sec.sock')}")
