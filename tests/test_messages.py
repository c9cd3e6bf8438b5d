"""Messages that once sent users the wrong way (issue 15, item 6), checked as a user sees
them: nodes started with ``repdisk ... --background``, driven with ``repdisk ctl``, and the
exact one line that says what is wrong and what to do."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from repdisk.cli import nodeproc
from tests.helpers.commands import REPDISK, run
from tests.helpers.nodes import MiB, make_disk

SIZE = 8 * MiB


class Folder:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, name: str) -> str:
        return os.path.join(self.path, name)

    def repdisk(self, *argv: str) -> tuple[int, str, str]:
        result = run([REPDISK, *argv], self.path, timeout=60)
        return result.returncode, result.stdout, result.stderr


@pytest.fixture
def folder(tmp_path) -> Iterator[Folder]:
    f = Folder(str(tmp_path))
    for name in ("p.img", "s.img", "a.img", "b.img", "c.img", "d.img"):
        make_disk(f(name), SIZE)
    try:
        yield f
    finally:
        for pid in ("p.pid", "s.pid"):
            nodeproc.stop_pidfile(f(pid))


def secondary(f: Folder, *disks: str) -> None:
    args = [a for d in disks for a in ("--disk", d)]
    code, out, err = f.repdisk("secondary", *args, "--control", "s.qmp", "--nbd-socket",
                               "s.sock", "--background", "--pidfile", "s.pid")
    assert code == 0, err


def primary(f: Folder, uri: str, *disks: str) -> tuple[int, str, str]:
    args = [a for d in disks for a in ("--disk", d)]
    return f.repdisk("primary", *args, "--control", "p.qmp", "--nbd-socket", "p.sock",
                     "--secondary", uri, "--background", "--pidfile", "p.pid")


def test_primary_started_before_its_secondary_says_it_is_not_started(folder: Folder) -> None:
    secondary(folder, "s.img")
    uri = f"nbd+unix:///replica?socket={folder('s.sock')}"
    assert primary(folder, uri, "p.img")[0] == 0
    code, out, err = folder.repdisk("ctl", "p.qmp", "start", "mode=primary")
    assert (code, out) == (1, "")
    assert err == (f"repdisk: GenericError: disk0: start failed: the secondary {uri} "
                   "is not started yet: start it first (repdisk ctl SECONDARY-CONTROL start "
                   "mode=secondary), then this primary; 0 bytes wait to be copied\n")
    # The refusal changed nothing: the link is not degraded, no error is kept, and in
    # the right order the pair starts.
    disk = json.loads(folder.repdisk("ctl", "--json", "p.qmp", "query-replication")[1])["disks"][0]
    assert (disk["stage"], disk["degraded"], disk["error"]) == ("none", False, None)
    assert folder.repdisk("ctl", "s.qmp", "start", "mode=secondary")[:2] == (0, "ok\n")
    assert folder.repdisk("ctl", "p.qmp", "start", "mode=primary")[:2] == (0, "ok\n")


@pytest.mark.parametrize("export,named", [
    ("", "the default export '' (its 'active' view)"),
    ("active", "the export 'active'"),
])
def test_secondary_uri_without_replica_is_refused_at_start_up(folder: Folder, export: str,
                                                              named: str) -> None:
    secondary(folder, "s.img")
    uri = f"nbd+unix:///{export}?socket={folder('s.sock')}"
    code, out, err = primary(folder, uri, "p.img")
    assert code != 0 and out == ""
    assert err == (f"repdisk: error: node exited: nbdkit: repdisk: error: secondary: {uri} "
                   f"names {named} of the secondary; the primary writes to its replica export "
                   "'replica' (or 'replica/NAME' for one disk of a group): use "
                   f"nbd+unix:///replica?socket={folder('s.sock')}\n")
    assert not os.path.exists(folder("p.pid"))


def test_mismatched_disk_names_in_a_group_list_both_sets(folder: Folder) -> None:
    secondary(folder, "a:a.img", "b:b.img")
    uri = f"nbd+unix:///replica?socket={folder('s.sock')}"
    code, out, err = primary(folder, uri, "root:c.img", "data:d.img")
    assert code != 0 and out == ""
    assert err == ("repdisk: error: node exited: nbdkit: repdisk: error: secondary: the disk "
                   f"names differ: this primary has data, root; the secondary {uri} has a, b; "
                   "give both nodes the same names (--disk NAME:PATH)\n")
    # With the same names it starts.
    nodeproc.stop_pidfile(folder("s.pid"))
    secondary(folder, "root:a.img", "data:b.img")
    assert primary(folder, uri, "root:c.img", "data:d.img")[0] == 0
