"""Shared fixtures: real nbdkit nodes started the way `repdisk` starts them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest

from repdisk.cli import nodeproc
from repdisk.cli.main import PLUGIN
from repdisk.qmp.client import QMPClient

MiB = 1 << 20


@dataclass
class NodeProc:
    """A running node: its process, sockets and log; `ctl` runs a control command."""
    role: str
    proc: subprocess.Popen
    control: str
    listen: nodeproc.Listen
    log: str
    disks: list[str] = field(default_factory=list)

    def uri(self, export: str = "") -> str:
        return self.listen.uri(export)

    def ctl(self, command: str, **args) -> object:
        client = QMPClient(timeout=60).connect(self.control)
        try:
            return client.execute(command, args)
        finally:
            client.close()

    def client(self, export: str = "") -> nbd.NBD:
        h = nbd.NBD()
        h.connect_uri(self.uri(export))
        return h

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def sigstop(proc: subprocess.Popen) -> None:
    """SIGSTOP ``proc`` and wait until the kernel has really stopped it (signals are async)."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    while stat.read_text().rpartition(")")[2].split()[0] != "T":
        time.sleep(0.005)


def on_a_terminal(argv: list[str]) -> str:
    """What ``argv`` prints on a pseudo-terminal (stdout and stderr); it must exit 0."""
    master, slave = os.openpty()
    try:
        proc = subprocess.run(argv, stdin=slave, stdout=slave, stderr=slave, timeout=60)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_disk(path: str, size: int, fill: int | None = None) -> str:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            chunk = bytes([fill]) * MiB
            for _ in range(size // MiB):
                f.write(chunk)
    return path


class Nodes:
    """Starts nodes under a tmp folder and kills every one of them at the end."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.started: list[NodeProc] = []

    def start(self, role: str, name: str, keys: list[tuple[str, str]]) -> NodeProc:
        control = os.path.join(self.folder, f"{name}.qmp")
        listen = nodeproc.Listen(socket=os.path.join(self.folder, f"{name}.sock"))
        log = os.path.join(self.folder, f"{name}.log")
        cmd = nodeproc.nbdkit_command(PLUGIN, [("role", role), ("control", control)] + keys,
                                      listen)
        proc = nodeproc.spawn(cmd, log)
        node = NodeProc(role, proc, control, listen, log,
                        [v.split(":", 1)[-1] for k, v in keys if k == "disk"])
        self.started.append(node)
        try:
            nodeproc.wait_ready(nodeproc.child_alive(proc), control, listen, log)
        except Exception:
            node.kill()
            raise
        return node

    def secondary(self, disk: str, name: str = "sec", **extra: str) -> NodeProc:
        return self.start("secondary", name, [("disk", disk)] + _keys(extra))

    def primary(self, disk: str, secondary: NodeProc, name: str = "pri", **extra: str) -> NodeProc:
        return self.start("primary", name, [("disk", disk), ("secondary", secondary.uri("replica"))]
                          + _keys(extra))

    def close(self) -> None:
        for node in reversed(self.started):
            node.kill()


def _keys(extra: dict[str, str]) -> list[tuple[str, str]]:
    return [(k.replace("_", "-"), v) for k, v in extra.items()]


@pytest.fixture
def nodes(tmp_path) -> Iterator[Nodes]:
    n = Nodes(str(tmp_path))
    try:
        yield n
    finally:
        n.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed cluster scenario (tests/test_pacemaker.py) shows its timeline and folder."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "repdisk_cluster", None)
    if report.failed and cluster is not None:
        report.sections.append(("cluster timeline", f"evidence: {cluster.folder}\n"
                                                    f"{cluster.timeline_text()}"))
