"""Nothing stops two users of one disk, unless it is locked (issue 15, item 2).

A node takes QEMU's own image locks (imagelock.lock_image: shared OFD locks on bytes 100+perm
and 200+perm, as block/file-posix.c does) on its disk, each overlay and its bitmap, and a
lock file next to its state file.  Checked as a user meets them: ``repdisk ... --background``
and QEMU's tools, each refusal one line naming the holder, and nothing changed by it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from repdisk.cli import nodeproc
from tests.helpers.commands import REPDISK, run
from tests.helpers.nodes import MiB, make_disk

SIZE = 8 * MiB
REFUSED = ("repdisk: error: node exited: nbdkit: repdisk: error: {key}: {path} is in use by "
           "{holder}: stop it first (two writers would corrupt it)\n")


class Folder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.pids: list[str] = []

    def __call__(self, name: str) -> str:
        return os.path.join(self.path, name)

    def node(self, role: str, name: str, *args: str) -> subprocess.CompletedProcess:
        result = run([REPDISK, role, *args, "--control", f"{name}.qmp", "--nbd-socket",
                      f"{name}.sock", "--background", "--pidfile", f"{name}.pid"], self.path)
        self.pids.append(self(f"{name}.pid"))
        return result

    def pid(self, name: str) -> int:
        with open(self(f"{name}.pid")) as f:
            return int(f.read())


@pytest.fixture
def folder(tmp_path) -> Iterator[Folder]:
    f = Folder(str(tmp_path))
    for name in ("s.img", "p.img", "other.img"):
        make_disk(f(name), SIZE, fill=0x11)
    try:
        yield f
    finally:
        for pid in f.pids:
            nodeproc.stop_pidfile(pid)


def qemu_io_write(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4k", path],
                          capture_output=True, text=True, timeout=30)


def digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_second_secondary_on_the_same_disk_is_refused(folder: Folder) -> None:
    assert folder.node("secondary", "s1", "--disk", "s.img").returncode == 0
    before = {n: digest(folder(n)) for n in ("s.img", "s.img.hidden", "s.img.hidden.bitmap")}
    second = folder.node("secondary", "s2", "--disk", "s.img")
    assert second.returncode == 1 and second.stdout == ""
    holder = f"repdisk node (pid {folder.pid('s1')}, control s1.qmp)"
    assert second.stderr == REFUSED.format(key="disk", path="s.img", holder=holder)
    assert {n: digest(folder(n)) for n in before} == before
    assert not os.path.exists(folder("s2.sock"))


def test_a_second_primary_on_the_same_disk_is_refused(folder: Folder) -> None:
    assert folder.node("secondary", "s1", "--disk", "s.img").returncode == 0
    uri = f"nbd+unix:///replica?socket={folder('s1.sock')}"
    assert folder.node("primary", "p1", "--disk", "p.img", "--secondary", uri).returncode == 0
    second = folder.node("primary", "p2", "--disk", "p.img", "--secondary", uri)
    holder = f"repdisk node (pid {folder.pid('p1')}, control p1.qmp)"
    assert second.stderr == REFUSED.format(key="disk", path="p.img", holder=holder)


def test_two_nodes_given_one_state_file_are_refused(folder: Folder) -> None:
    assert folder.node("secondary", "s1", "--disk", "s.img").returncode == 0
    second = folder.node("secondary", "s2", "--disk", "other.img", "--state", "s.img.state")
    holder = f"repdisk node (pid {folder.pid('s1')}, control s1.qmp)"
    assert second.stderr == REFUSED.format(key="state", path="s.img.state", holder=holder)


def test_qemu_io_cannot_write_a_served_image_or_its_overlays(folder: Folder) -> None:
    assert folder.node("secondary", "s1", "--disk", "s.img").returncode == 0
    uri = f"nbd+unix:///replica?socket={folder('s1.sock')}"
    assert folder.node("primary", "p1", "--disk", "p.img", "--secondary", uri).returncode == 0
    files = ["p.img", "s.img", "s.img.hidden", "s.img.hidden.bitmap", "s.img.active",
             "s.img.active.bitmap"]
    before = {n: digest(folder(n)) for n in files}
    for name in files:
        result = qemu_io_write(folder(name))
        assert result.returncode != 0, name
        assert 'Failed to get "write" lock' in result.stderr, result.stderr
    assert {n: digest(folder(n)) for n in files} == before
    for pid in folder.pids:                      # stopped: the files are free again
        nodeproc.stop_pidfile(pid)
    assert qemu_io_write(folder("s.img")).returncode == 0


def test_a_node_honours_a_qemu_tool_holding_the_image(folder: Folder) -> None:
    sock = folder("qnbd.sock")
    qnbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "--socket", sock, folder("s.img")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and qnbd.poll() is None
            time.sleep(0.02)
        refused = folder.node("secondary", "s1", "--disk", "s.img")
        assert refused.returncode == 1
        assert refused.stderr == REFUSED.format(key="disk", path="s.img",
                                                holder=f"qemu-nbd (pid {qnbd.pid})")
    finally:
        qnbd.kill()
        qnbd.wait()
    assert folder.node("secondary", "s1", "--disk", "s.img").returncode == 0
    assert re.fullmatch(r"\d+", str(folder.pid("s1")))
