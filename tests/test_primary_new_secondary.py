"""A primary's dirty maps say what *one* secondary lacks.  A primary that replicated to A,
then (restarted with another --secondary) to C, then to A again must not trust its maps
for A: they are C's, and A lacks what was written meanwhile (a user trial found the path;
a failover to A lost a checkpointed write).  A primary started with another --secondary
than its maps were made against compares first.  Driven with ``repdisk`` only."""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any

import pytest

from tests.helpers.folder import MiB, kill9, node, qemu_io, repdisk

pytestmark = pytest.mark.timeout(180)


def checkpoint(folder: str, secondary: str) -> None:
    for sock, cmd in (("pri.qmp", "checkpoint"), (f"{secondary}.qmp", "checkpoint"),
                      ("pri.qmp", "resume")):
        assert repdisk(folder, "ctl", sock, cmd) == "ok\n"


def pair(folder: str, secondary: str) -> None:
    """pri (p.img) replicating to the secondary ``secondary`` (its disk SECONDARY.img,
    socket SECONDARY.sock), both started."""
    node(folder, "secondary", f"{secondary}.img", secondary)
    node(folder, "primary", "p.img", "pri", "--secondary",
         f"nbd+unix:///replica?socket={folder}/{secondary}.sock")
    repdisk(folder, "ctl", f"{secondary}.qmp", "start", "mode=secondary")
    repdisk(folder, "ctl", "pri.qmp", "start", "mode=primary")


def test_a_primary_back_with_its_first_secondary_copies_what_the_other_got(
        tmp_path: Any) -> None:
    folder = str(tmp_path)
    for disk in ("p.img", "a.img", "c.img"):
        subprocess.run(["truncate", "-s", str(16 * MiB), os.path.join(folder, disk)],
                       check=True)
    try:
        pair(folder, "a")
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x11 0 1M")
        checkpoint(folder, "a")
        repdisk(folder, "down", "pri.qmp", "a.qmp")            # clean: nothing unsent
        pair(folder, "c")                                      # another secondary
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x31 2M 1M")
        checkpoint(folder, "c")
        repdisk(folder, "down", "pri.qmp", "c.qmp")
        pair(folder, "a")                                      # the first one again
        checkpoint(folder, "a")
        repdisk(folder, "ctl", "a.qmp", "failover")
        with open(os.path.join(folder, "a.img"), "rb") as f:
            assert f.read(3 * MiB) == b"\x11" * MiB + bytes(MiB) + b"\x31" * MiB
        with open(os.path.join(folder, "pri.log")) as log:
            assert "compares the disks before copying" in log.read()
    finally:
        for name in ("pri", "a", "c"):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)
