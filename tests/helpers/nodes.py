"""Real nodes (nbdkit + the repdisk plugin) started the way ``repdisk`` starts them, and a
replicating pair of them driven through control commands."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import nbd

from repdisk.cli import nodeproc
from repdisk.cli.nodeproc import PLUGIN
from repdisk.qmp.client import QMPClient
from tests.helpers.netns import Host

MiB = 1 << 20
SIZE = 16 * MiB    # a pair's disks (start_pair)
CHUNK = 16 * MiB   # below libnbd's and nbdkit's 64 MiB request limit


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
        listen = nodeproc.Listen(socket=os.path.join(self.folder, f"{name}.sock"))
        return start_node(self, role, name, keys, listen)

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


def start_node(nodes: Nodes, role: str, name: str, keys: list[tuple[str, str]],
               listen: nodeproc.Listen, host: Host | None = None) -> NodeProc:
    """A repdisk node started as ``repdisk`` starts it, with any listener (TCP, TLS),
    inside ``host``'s namespace if given; ``nodes`` kills it at the end.

    Readiness is probed from inside the namespace, where the listener is reachable.
    """
    control = os.path.join(nodes.folder, f"{name}.qmp")
    log = os.path.join(nodes.folder, f"{name}.log")
    cmd = nodeproc.nbdkit_command(PLUGIN, [("role", role), ("control", control)] + keys, listen)
    proc = nodeproc.spawn(host.cmd(cmd) if host else cmd, log)
    node = NodeProc(role, proc, control, listen, log,
                    [v.split(":", 1)[-1] for k, v in keys if k == "disk"])
    nodes.started.append(node)
    wait = (nodeproc.wait_ready, nodeproc.child_alive(proc), control, listen, log)
    try:
        host.call(*wait) if host else wait[0](*wait[1:])
    except Exception:
        node.kill()
        raise
    return node


def restart(nodes: Nodes, node: NodeProc, keys: list[tuple[str, str]]) -> NodeProc:
    """Start a node again on the same files and sockets (after it was killed)."""
    node.kill()
    name = os.path.basename(node.control)[:-4]
    return start_node(nodes, node.role, name, keys, node.listen)


def kill9(node: NodeProc) -> None:
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()


#: The system calls that write a node's files.
WRITE_SYSCALLS = "copy_file_range,pwrite64,pwritev,pwritev2,fallocate"


@contextlib.contextmanager
def slowed_writes(node: NodeProc, delay_us: int) -> Iterator[None]:
    """Delay every file write of ``node`` (all its threads) by ``delay_us`` with strace's
    fault injection, so that a test's SIGKILL lands inside a long operation instead of
    racing it on a fast machine.  strace stands in for a slow disk, which the test cannot
    order; nothing of repdisk is replaced.  Yields once every thread is attached."""
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(node.proc.pid),
         "-e", f"trace={WRITE_SYSCALLS}", "-e", f"inject={WRITE_SYSCALLS}:delay_exit={delay_us}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_attached(tracer, node.proc.pid)
        yield
    finally:
        tracer.terminate()
        tracer.wait()


def _wait_attached(tracer: subprocess.Popen, pid: int) -> None:
    """Return once strace traces every thread of ``pid`` (its TracerPid says so)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if tracer.poll() is not None:
            raise RuntimeError(f"strace could not attach to {pid}: {tracer.stderr.read()}")
        tasks = os.listdir(f"/proc/{pid}/task")
        if all(_tracer_of(pid, tid) in (tracer.pid, None) for tid in tasks):
            return
        time.sleep(0.02)
    raise RuntimeError(f"strace did not attach to every thread of {pid} in 10s")


def _tracer_of(pid: int, tid: str) -> int | None:
    """The TracerPid of thread ``tid`` (0: none), or None once the thread has ended."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return None


# -- a pair ------------------------------------------------------------------------------------

def start_pair(nodes: Nodes, size: int = SIZE, fill: int | None = None,
               **primary_keys: str) -> tuple[NodeProc, NodeProc]:
    """A secondary, then a primary forwarding to it, both started (secondary first)."""
    sec_disk = make_disk(os.path.join(nodes.folder, "sec.img"), size, fill)
    pri_disk = make_disk(os.path.join(nodes.folder, "pri.img"), size, fill)
    sec = nodes.secondary(sec_disk)
    sec.ctl("replication-start", mode="secondary")
    pri = nodes.primary(pri_disk, sec, **primary_keys)
    pri.ctl("replication-start", mode="primary")
    return pri, sec


def checkpoint(pri: NodeProc, sec: NodeProc) -> None:
    """One pair checkpoint in the order of docs/DESIGN.md: barrier + hold, secondary, resume."""
    pri.ctl("replication-do-checkpoint")
    sec.ctl("replication-get-error")
    sec.ctl("replication-do-checkpoint")
    pri.ctl("replication-resume")


# -- data --------------------------------------------------------------------------------------

def read_all(h: nbd.NBD, size: int | None = None) -> bytes:
    """Every byte of an export, read in chunks."""
    size = h.get_size() if size is None else size
    return b"".join(h.pread(min(CHUNK, size - off), off) for off in range(0, size, CHUNK))


def read_export(node: NodeProc, export: str = "") -> bytes:
    h = node.client(export)
    try:
        return read_all(h)
    finally:
        h.shutdown()


def write(node: NodeProc, data: bytes, offset: int, export: str = "") -> None:
    h = node.client(export)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def raw_session(path: str, export: str) -> socket.socket:
    """A plain socket to the NBD Unix socket ``path``, past the handshake for ``export`` (fixed
    newstyle, NBD_OPT_EXPORT_NAME): requests can be queued on it without waiting for replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    greeting = s.recv(18, socket.MSG_WAITALL)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
    name = export.encode()
    s.sendall(struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)
    s.recv(8 + 2 + 124, socket.MSG_WAITALL)
    return s


#: An NBD request's header: magic, flags, type (0 read, 1 write), handle, offset, length.
REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)
