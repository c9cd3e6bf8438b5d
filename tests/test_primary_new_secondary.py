"""A primary's dirty maps say what *one* secondary lacks.  A primary that replicated to A,
then (restarted with another --secondary) to C, then to A again must not trust its maps
for A: they are C's, and A lacks what was written meanwhile (a user trial found the path;
a failover to A lost a checkpointed write).  A secondary's replica export names its disk,
and a primary whose maps are of another disk compares first.  Driven with ``repdisk``
only."""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any

import pytest

from repdisk.replication.link import disk_id_of
from tests.helpers.folder import MiB, kill9, node, qemu_io, repdisk

pytestmark = pytest.mark.timeout(180)


def checkpoint(folder: str, secondary: str) -> None:
    for sock, cmd in (("pri.qmp", "checkpoint"), (f"{secondary}.qmp", "checkpoint"),
                      ("pri.qmp", "resume")):
        assert repdisk(folder, "ctl", sock, cmd) == "ok\n"


def pair(folder: str, disk: str, secondary: str) -> None:
    """pri (p.img) replicating to the secondary ``secondary`` (SECONDARY.qmp and .sock) on
    ``disk``, both started."""
    node(folder, "secondary", disk, secondary)
    node(folder, "primary", "p.img", "pri", "--secondary",
         f"nbd+unix:///replica?socket={folder}/{secondary}.sock")
    repdisk(folder, "ctl", f"{secondary}.qmp", "start", "mode=secondary")
    repdisk(folder, "ctl", "pri.qmp", "start", "mode=primary")


@pytest.mark.parametrize("names", [("a", "c"), ("s", "s")], ids=["two nodes", "one socket"])
def test_a_primary_back_with_its_first_secondary_copies_what_the_other_got(
        tmp_path: Any, names: tuple[str, str]) -> None:
    """A and C as two secondaries of their own, or one after the other behind one socket."""
    folder = str(tmp_path)
    a, c = names
    for disk in ("p.img", "a.img", "c.img"):
        subprocess.run(["truncate", "-s", str(16 * MiB), os.path.join(folder, disk)],
                       check=True)
    try:
        pair(folder, "a.img", a)
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x11 0 1M")
        checkpoint(folder, a)
        repdisk(folder, "down", "pri.qmp", f"{a}.qmp")         # clean: nothing unsent
        pair(folder, "c.img", c)                               # another secondary disk
        qemu_io(folder, f"nbd+unix:///?socket={folder}/pri.sock", "write -P 0x31 2M 1M")
        checkpoint(folder, c)
        repdisk(folder, "down", "pri.qmp", f"{c}.qmp")
        pair(folder, "a.img", a)                               # the first one again
        checkpoint(folder, a)
        repdisk(folder, "ctl", f"{a}.qmp", "failover")
        with open(os.path.join(folder, "a.img"), "rb") as f:
            assert f.read(3 * MiB) == b"\x11" * MiB + bytes(MiB) + b"\x31" * MiB
        with open(os.path.join(folder, "pri.log")) as log:
            assert "serves another disk than the one this primary's dirty map is of" \
                in log.read()
    finally:
        for name in ("pri", a, c):
            with contextlib.suppress(OSError, ValueError):
                kill9(folder, name)


def test_the_disk_name_is_read_from_a_file_s_and_a_device_s_description() -> None:
    """A block device's name is ``dev N``, with a space: it is read whole."""
    head = "repdisk secondary disk disk0 in epoch 1 of node 0a1b: "
    assert disk_id_of(head + "disk-id 9f3c; the primary writes here") == "9f3c"
    assert disk_id_of(head + "disk-id dev 2049; the primary writes here") == "dev 2049"
    assert disk_id_of(head + "the primary writes here") is None
