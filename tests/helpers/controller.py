"""Helpers for the controller tests: a pair, a controlled link, a writer with an exact model."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import nbd

from repdisk.controller.config import ControllerConfig
from repdisk.controller.controller import Controller
from tests.helpers.nodes import MiB, NodeProc, Nodes, make_disk

# Short timings: every rule holds (isolation < heartbeat-timeout; hold = timeout/2 covers a
# secondary checkpoint) while a failover still takes about a second.
TIMEOUT = "1s"
ISOLATION = "0.6s"
HEARTBEAT = 0.1
HEARTBEAT_TIMEOUT = 1.2


class LinkProxy:
    """A Unix-socket relay the test controls: pass, cut (reset and refuse), or hang.

    ``cut_after`` cuts the link once that many bytes went from client to server.
    """

    def __init__(self, path: str, target: str) -> None:
        self.path, self.target = path, target
        self.mode = "pass"
        self.sent = 0
        self.cut_after: int | None = None
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            try:
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.connect(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b, count in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, count), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                while self.mode == "hang":
                    time.sleep(0.01)
                if self.mode == "cut":
                    break
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
                        if self.cut_after is not None and self.sent >= self.cut_after:
                            self.cut_after = None
                            self._cut_locked()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _cut_locked(self) -> None:
        self.mode = "cut"
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._conns = []

    def cut(self) -> None:
        with self._lock:
            self._cut_locked()

    def hang(self) -> None:
        self.mode = "hang"

    def heal(self) -> None:
        self.mode = "pass"

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


def restart(nodes: Nodes, node: NodeProc) -> None:
    """Forget a killed node and remove its stale NBD socket, so it can be started again."""
    node.kill()
    if node in nodes.started:
        nodes.started.remove(node)
    if node.listen.socket and os.path.exists(node.listen.socket):
        os.unlink(node.listen.socket)


def nbd_proxy_uri(path: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={path}"


@dataclass
class Pair:
    nodes: Nodes
    folder: str
    size: int
    pri_disk: str
    sec_disk: str
    sec: NodeProc
    pri: NodeProc
    link: LinkProxy | None = None
    ctl_link: LinkProxy | None = None    # the controller's path to the primary's control
    controllers: list[Controller] = field(default_factory=list)

    def controller(self, **kw) -> Controller:
        primary = kw.pop("primary", self.ctl_link.path if self.ctl_link else self.pri.control)
        cfg = ControllerConfig(primary=primary, secondary=kw.pop("secondary", self.sec.control),
                               interval=kw.pop("interval", 3600.0), heartbeat=HEARTBEAT,
                               heartbeat_timeout=HEARTBEAT_TIMEOUT, **kw)
        ctl = Controller(cfg)
        self.controllers.append(ctl)
        return ctl

    def restart_secondary(self) -> NodeProc:
        """A new secondary process on the same disk and sockets (kill -9 left them stale)."""
        restart(self.nodes, self.sec)
        self.sec = self.nodes.secondary(self.sec_disk, "sec")
        return self.sec

    def close(self) -> None:
        for ctl in self.controllers:
            ctl.close()
        for proxy in (self.link, self.ctl_link):
            if proxy:
                proxy.close()


def make_pair(nodes: Nodes, size: int = 16 * MiB, proxy: bool = False, ctl_proxy: bool = False,
              pri_fill: int | None = None, sec_fill: int | None = None,
              **primary_keys: str) -> Pair:
    folder = nodes.folder
    pri_disk = make_disk(os.path.join(folder, "pri.img"), size, pri_fill)
    sec_disk = make_disk(os.path.join(folder, "sec.img"), size, sec_fill)
    sec = nodes.secondary(sec_disk, "sec")
    link = None
    uri = sec.uri("replica")
    if proxy:
        link = LinkProxy(os.path.join(folder, "link.sock"), sec.listen.socket)
        uri = nbd_proxy_uri(link.path, "replica")
    keys = {"timeout": TIMEOUT, "isolation_timeout": ISOLATION, **primary_keys}
    pri = nodes.start("primary", "pri", [("disk", pri_disk), ("secondary", uri)]
                      + [(k.replace("_", "-"), v) for k, v in keys.items()])
    ctl_link = LinkProxy(os.path.join(folder, "pctl.sock"), pri.control) if ctl_proxy else None
    return Pair(nodes, folder, size, pri_disk, sec_disk, sec, pri, link, ctl_link)


def read_export(uri: str, size: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        out = bytearray()
        for off in range(0, size, 4 * MiB):
            out += h.pread(min(4 * MiB, size - off), off)
        return bytes(out)
    finally:
        h.shutdown()


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Writer:
    """Random writes through the primary's export from several threads, with an exact model.

    Thread i writes only inside stripe i (its first ``span`` bytes), one write at a time,
    so the model (every
    acknowledged write applied in order) is exactly what the disk holds whenever the
    writers are paused.  ``pause()`` returns once no write is in flight.
    """

    def __init__(self, uri: str, size: int, threads: int = 3, seed: int = 0,
                 max_len: int = 64 << 10, stop_on_error: bool = True,
                 span: int | None = None) -> None:
        self.uri, self.size = uri, size
        self.model = bytearray(size)
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.writes = 0
        self.max_len = max_len
        self.stop_on_error = stop_on_error
        self._cond = threading.Condition()
        self._paused = False
        self._active = 0
        self._stop = threading.Event()
        stripe = size // threads
        used = min(stripe, span or stripe)  # each thread writes only the start of its stripe
        self._threads = [threading.Thread(target=self._run, args=(i * stripe, used, seed + i),
                                          daemon=True) for i in range(threads)]

    def start(self, model: bytes | None = None) -> Writer:
        if model is not None:
            self.model[:] = model
        for t in self._threads:
            t.start()
        return self

    def _run(self, base: int, stripe: int, seed: int) -> None:
        rng = random.Random(seed)
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
        except nbd.Error as err:
            self.errors.append(str(err))
            return
        while not self._stop.is_set():
            with self._cond:
                while self._paused and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    break
                self._active += 1
            try:
                length = rng.randrange(1, self.max_len // 512 + 1) * 512
                off = base + rng.randrange(0, (stripe - length) // 512 + 1) * 512
                data = rng.randbytes(length)
                t0 = time.monotonic()
                try:
                    h.pwrite(data, off)
                except nbd.Error as err:
                    self.errors.append(f"write at {off}: {err}")
                    if self.stop_on_error:
                        return
                    continue
                self.latencies.append(time.monotonic() - t0)
                self.model[off:off + length] = data
                self.writes += 1
            finally:
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()
        with contextlib.suppress(nbd.Error):
            h.shutdown()

    def pause(self) -> bytes:
        """Stop new writes, wait for those in flight; the model, which is now the disk."""
        with self._cond:
            self._paused = True
            while self._active:
                self._cond.wait()
            return bytes(self.model)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self) -> None:
        self._stop.set()
        self.resume()
        for t in self._threads:
            t.join(timeout=10)


def run_in_thread(ctl: Controller) -> threading.Thread:
    t = threading.Thread(target=ctl.run, daemon=True)
    t.start()
    return t


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def step_until(ctl: Controller, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ctl.state != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"controller is {ctl.state}, not {state}; events: "
                                 f"{list(ctl.events)[-5:]}")
        ctl.step()
        time.sleep(HEARTBEAT)


def events(ctl: Controller, name: str) -> list[dict]:
    return [e["data"] for e in ctl.events if e["event"] == name]


def bare_qemu(qmp: str, *extra: str) -> subprocess.Popen:
    """A QEMU with no machine and no devices, its monitor at ``qmp`` (the caller kills it):
    enough for stop, cont, query-status and a migration to another (``-incoming``)."""
    return subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{qmp},server=on,wait=off", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class BareGuest:
    """A :func:`bare_qemu` standing for a controller's guest, its monitor at ``qmp``."""
    qmp: str
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = bare_qemu(self.qmp)
        wait_for(lambda: os.path.exists(self.qmp), 10, "QEMU's QMP socket")

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def controlled_pair_with_guest(nodes: Nodes, folder: str) -> Iterator[tuple[Pair, Controller,
                                                                            BareGuest]]:
    """A pair, a :class:`BareGuest` and a controller started with ``--qmp`` at it; all of
    them stopped at the end."""
    pair = make_pair(nodes)
    guest = BareGuest(os.path.join(folder, "guest.qmp"))
    try:
        guest.start()
        ctl = pair.controller(qmp=guest.qmp, control=os.path.join(folder, "c.qmp"))
        ctl.start()
        yield pair, ctl, guest
    finally:
        guest.kill()
        pair.close()
