"""A secondary serves one primary disk: a second primary given its URI by mistake (another
disk's) is refused, in any epoch, and says why; restarted, the secondary pairs with it, and
finds its disk new to that primary, which compares before copying.  Driven with the
``repdisk`` command only."""

from __future__ import annotations

import re

from repdisk.cli import nodeproc
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


def test_a_second_primary_is_refused_and_takes_nothing_over(cli_pair: Pair) -> None:
    pri, sec, guest = replicating_pair(cli_pair)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", guest)
    checkpoint(cli_pair, pri, sec)

    make_disk(cli_pair.path("other.img"), SIZE)
    replica = f"nbd+unix:///replica?socket={cli_pair.path('sec.sock')}"
    cli_pair.repdisk("primary", "--disk", "other.img", "--control", "other.qmp",
                     "--nbd-socket", "other.sock", "--secondary", replica, "--background")
    other = cli_pair.path("other.qmp")
    try:
        for epoch in ([], ["epoch=3"]):               # a newer epoch takes nothing over
            bad = cli_pair.repdisk("ctl", other, "start", "mode=primary", *epoch, ok=False)
            assert re.fullmatch(
                rf"repdisk: GenericError: disk0: start failed: the secondary "
                rf"{re.escape(replica)} refused this primary: refusing a second primary "
                r"\(disk ([0-9a-f]{16})\): this secondary replicates the primary of disk "
                r"(?!\1)[0-9a-f]{16} \(a secondary serves one primary disk\); give the "
                r"primary of disk \1 its own secondary, or restart this secondary \(its "
                r"controller stopped first, if one runs its pair\) to pair it with that "
                r"primary\n", bad.stderr), bad.stderr
        # the pair goes on as it was: replicating, nothing to resync, checkpoints
        qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 1M", guest)
        assert cli_pair.repdisk("ctl", pri, "resync").stdout == "bytes  0.0 MiB\n"
        checkpoint(cli_pair, pri, sec)
        assert read_file(cli_pair.path("sec.img")) == read_file(cli_pair.path("pri.img"))

        # as the refusal says: restart the secondary and it pairs with the other primary,
        # whose copy compares the disks (the secondary holds the first primary's data)
        nodeproc.stop_pidfile(cli_pair.path("pri.pid"))
        kill_secondary(cli_pair)
        cli_pair.repdisk(*SEC, "--disk", "sec.img")
        assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
        assert cli_pair.repdisk("ctl", other, "start", "mode=primary").stdout == "ok\n"
        assert cli_pair.repdisk("ctl", other, "resync").stdout == "bytes  0.0 MiB\n"
        checkpoint(cli_pair, other, sec)
        assert read_file(cli_pair.path("sec.img")) == bytes(SIZE)   # the other disk's
        with open(cli_pair.path("other.qmp.log"), encoding="utf-8") as f:
            assert "compared with the secondary in" in f.read()
    finally:
        nodeproc.stop_pidfile(cli_pair.path("other.qmp.pid"))
    assert read_file(cli_pair.path("pri.img"))[:2 * MiB] == b"\x11" * MiB + b"\x22" * MiB
