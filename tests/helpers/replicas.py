"""Replicas built in-process: a ``SecondaryReplica`` over a fresh disk, and the nbdkit
secondary (``batchserver.py``: a replica export with its batch twin) that a ``PrimaryReplica``
forwards to (the ``primary_factory`` and ``secondary_factory`` fixtures in tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from repdisk.block.device import BlockDevice
from repdisk.block.rawimage import RawImage
from repdisk.replication.primary import PrimaryReplica
from repdisk.replication.secondary import SecondaryReplica
from tests.helpers.commands import sigstop

KiB = 1024


# -- a secondary in-process ----------------------------------------------------------------

def make_replica(directory: Path | str, size: int, cluster_size: int = 4 * KiB,
                 fill: bytes | None = None, events: Any = None,
                 name: str = "disk0") -> SecondaryReplica:
    """A secondary over a fresh ``size``-byte disk holding ``fill`` (zeros if None)."""
    path = os.path.join(directory, f"{name}.img")
    with RawImage.create(path, size) as disk:
        if fill is not None:
            disk.pwrite(fill, 0)
    # Progress events are checked on their own (test_failover_progress...); the event lists
    # that tests compare exactly hold the state events only.
    kwargs = {} if events is None else {
        "events": lambda n, d: n.endswith("_PROGRESS") or events.append((n, d))}
    return SecondaryReplica.open(name, path, cluster_size=cluster_size, **kwargs)


def read(dev: BlockDevice, offset: int = 0, length: int | None = None) -> bytes:
    """Every byte of ``[offset, offset+length)`` (to the end by default) of ``dev``."""
    length = dev.size - offset if length is None else length
    buf = bytearray(length)
    dev.pread_into(memoryview(buf), offset)
    return bytes(buf)


def pattern(size: int, seed: int = 7) -> bytes:
    """Non-repeating-per-cluster content, so a byte copied from the wrong place shows."""
    return bytes((i * seed + i // 4093) % 251 for i in range(size))


# -- an nbdkit secondary for a PrimaryReplica ---------------------------------------------

BATCH_SERVER = Path(__file__).with_name("batchserver.py")   # nbdkit python BATCH_SERVER file=IMG


class Secondary:
    """nbdkit serving ``path`` on a Unix socket (tests/helpers/batchserver.py: plain and batched, as
    a secondary's replica export); can be killed, hung, restarted."""

    def __init__(self, directory: Path, name: str, size: int, fill: int | None = None,
                 filters: tuple[str, ...] = ()) -> None:
        self.filters = filters  # e.g. ("--filter=delay", "delay-write=50ms")
        self.path = directory / f"{name}.img"
        self.sock = directory / f"{name}.sock"
        self.pidfile = directory / f"{name}.pid"
        with open(self.path, "wb") as f:
            f.truncate(size)
            if fill is not None:
                f.write(bytes([fill]) * size)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        for p in (self.sock, self.pidfile):
            p.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "-P", str(self.pidfile),
             *[f for f in self.filters if f.startswith("--")], "python", str(BATCH_SERVER),
             f"file={self.path}",
             *[f for f in self.filters if not f.startswith("--")]], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.pidfile.exists() or not self.pidfile.read_text().strip():
            assert self.proc.poll() is None, "nbdkit exited at start-up"
            assert time.monotonic() < deadline, "nbdkit did not become ready"
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        assert self.proc is not None
        sigstop(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def read(self) -> bytes:
        return self.path.read_bytes()


def read_local(rep: PrimaryReplica) -> bytes:
    buf = bytearray(rep.view.size)
    rep.view.pread_into(memoryview(buf), 0)
    return bytes(buf)

