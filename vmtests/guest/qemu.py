"""Run the test guest in qemu-system-x86_64 and watch its serial console.

One :class:`GuestVM` is one QEMU process: the cached kernel and initramfs, ``-m 256``, one
or two virtio-blk disks (files or NBD exports, as ``-blockdev`` nodes ``disk0``, ``disk1``
that QMP commands can name), the serial console on QEMU's stdout (a thread copies it into a
log file and a buffer that :meth:`GuestVM.wait_for` searches), a QMP socket, ``-no-reboot``
(a guest poweroff or panic ends the process) and optionally ``-incoming``.

QEMU dies with the test in every case: :meth:`GuestVM.close` (also ``with``) SIGKILLs it and
the kernel delivers SIGKILL to it if the thread that started it dies (PR_SET_PDEATHSIG).

The accelerator is KVM only when a probe boot under KVM reaches the initramfs within
``KVM_PROBE_TIMEOUT`` s: on some hosts /dev/kvm exists but guests hang under it. The verdict
is cached per host boot and kernel; ``REPDISK_VM_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlparse

from .build import CACHE_DIR, Guest, cache_lock, ensure_guest

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
KVM_PROBE_TIMEOUT = 10.0  # a working KVM reaches the initramfs in about a second
KERNEL_ARGS = "console=ttyS0 panic=-1"
PR_SET_PDEATHSIG = 1
# A complete line only: a guest killed mid-line leaves "REPDISK-RECORD 3" of "...34".
RECORD_RE = re.compile(r"^REPDISK-RECORD (\d+)\r?\n", re.M)
_accel_verdict: dict[str, str] = {}


class QemuError(RuntimeError):
    """QEMU failed, exited, or its guest did not print what was awaited."""


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def nbd_uri(socket_path: Path | str, export: str = "") -> str:
    """The NBD URI of an export on a Unix socket, as :class:`Drive` and qemu-img accept it."""
    return f"nbd+unix:///{export}?socket={socket_path}"


@dataclass(frozen=True)
class Drive:
    """A guest disk: a raw image file, or an NBD URI (``nbd+unix:///EXPORT?socket=PATH``)."""

    target: str | Path
    read_only: bool = False

    def blockdev(self, node_name: str) -> dict[str, Any]:
        """The ``-blockdev`` options of this disk (JSON, so paths need no comma escaping)."""
        target = str(self.target)
        if target.startswith("nbd"):
            uri = urlparse(target)
            sockets = parse_qs(uri.query).get("socket")
            if uri.scheme != "nbd+unix" or not sockets:
                raise ValueError(f"drive {target}: only nbd+unix:///EXPORT?socket=PATH "
                                 f"is supported")
            node: dict[str, Any] = {"driver": "nbd", "server": {"type": "unix", "path": sockets[0]},
                                    "export": uri.path.lstrip("/")}
        else:
            node = {"driver": "raw", "file": {"driver": "file", "filename": target}}
        return {"node-name": node_name, "read-only": self.read_only, **node}


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def kernel_args(workload: str = "idle", records: int = 0, interval: float = 0,
                extra: str = "") -> str:
    """The kernel command line: console, panic policy and the repdisk.* workload parameters."""
    args = f"{KERNEL_ARGS} repdisk.workload={workload} repdisk.records={records}"
    if interval:
        args += f" repdisk.interval={interval:g}"
    return f"{args} {extra}".strip()


def qemu_command(guest: Guest, accel: str, append: str, drives: Sequence[Drive] = (),
                 memory_mb: int = 256) -> list[str]:
    """The QEMU arguments shared by the probe and the test VMs (serial on stdout)."""
    cmd = [QEMU, "-accel", accel, "-m", str(memory_mb), "-smp", "1", "-nodefaults",
           "-display", "none", "-serial", "stdio", "-no-reboot",
           "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs), "-append", append]
    for i, drive in enumerate(drives):
        cmd += ["-blockdev", json.dumps(drive.blockdev(f"disk{i}")),
                "-device", f"virtio-blk-pci,drive=disk{i},id=vd{i}"]
    return cmd


def kvm_probe(guest: Guest) -> bool:
    """Boot the initramfs's probe under KVM; True if it printed its marker and powered off."""
    cmd = qemu_command(guest, "kvm", f"{KERNEL_ARGS} repdisk.probe=1")
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=KVM_PROBE_TIMEOUT, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        log.warning("kvm probe: no guest output within %gs, using tcg", KVM_PROBE_TIMEOUT)
        return False
    ok = proc.returncode == 0 and b"REPDISK-PROBE-OK" in proc.stdout
    if not ok:
        log.warning("kvm probe failed (exit %d): %s", proc.returncode, proc.stderr[-500:])
    return ok


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def choose_accel(guest: Guest, cache: Path = CACHE_DIR) -> str:
    """"kvm" if a probe boot under KVM works on this host boot, else "tcg" (cached)."""
    forced = os.environ.get("REPDISK_VM_ACCEL")
    if forced:
        return forced
    key = f"{host_boot_id()} {guest.kernel_version}"
    if key in _accel_verdict:
        return _accel_verdict[key]
    verdict_file = cache / "accel.json"
    with cache_lock(cache):  # one probe, however many test processes start at once
        try:
            cached = json.loads(verdict_file.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("key") != key:
            usable = os.access("/dev/kvm", os.R_OK | os.W_OK) and kvm_probe(guest)
            cached = {"key": key, "accel": "kvm" if usable else "tcg"}
            verdict_file.write_text(json.dumps(cached))
    _accel_verdict[key] = cached["accel"]
    return cached["accel"]


class QmpClient:
    """A minimal synchronous QMP client (commands in order; events are kept in ``events``)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError as err:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QemuError(f"qmp socket {path}: cannot connect: {err}") from err
                time.sleep(0.05)
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        self.receive()  # greeting
        self.execute("qmp_capabilities")

    def receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise QemuError("qmp: connection closed by QEMU")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; returns its ``return`` value, raises QemuError on an error reply."""
        self.next_id += 1
        msg = {"execute": command, "arguments": arguments, "id": self.next_id}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self.receive()
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == self.next_id:
                if "error" in reply:
                    raise QemuError(f"qmp {command}: {reply['error'].get('desc', reply['error'])}")
                return reply.get("return")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class GuestVM:
    """One QEMU process running the test guest; use as a context manager.

    ``drives`` become /dev/vda (root filesystem + raw region) and, if given, /dev/vdb (the
    raw region); ``workload``/``records``/``interval`` go to the guest's kernel command line
    (see guest-init.sh); ``incoming`` is passed to ``-incoming`` (e.g. "defer").
    """

    def __init__(self, drives: Sequence[Drive | str | Path], *, workload: str = "idle",
                 records: int = 0, interval: float = 0, log_path: Path | str | None = None,
                 guest: Guest | None = None, accel: str | None = None, memory_mb: int = 256,
                 incoming: str | None = None, extra_args: Sequence[str] = (),
                 extra_append: str = "") -> None:
        self.guest = guest or ensure_guest()
        self.accel = accel or choose_accel(self.guest)
        self.drives = [d if isinstance(d, Drive) else Drive(d) for d in drives]
        self.sockdir = Path(tempfile.mkdtemp(prefix="repdisk-vm-"))  # short: sun_path limit
        self.qmp_path = self.sockdir / "qmp.sock"
        self.log_path = Path(log_path) if log_path else self.sockdir / "console.log"
        self.cmd = qemu_command(self.guest, self.accel,
                                kernel_args(workload, records, interval, extra_append),
                                self.drives, memory_mb)
        self.cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra_args]
        if incoming:
            self.cmd += ["-incoming", incoming]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._console: list[str] = []
        self._text = ""
        self._eof = False
        self._cond = threading.Condition()
        # (wall-clock time the host read it, N) for each "REPDISK-RECORD N" line, in order.
        self.record_arrivals: list[tuple[float, int]] = []
        self._reader: threading.Thread | None = None
        self._qmp: QmpClient | None = None
        self.stderr: Any = None

    def start(self) -> GuestVM:
        """Start QEMU and the console reader thread."""
        log.info("starting %s", " ".join(self.cmd))
        self.started_at = time.monotonic()
        self.stderr = open(self.log_path.with_suffix(".stderr"), "wb")  # noqa: SIM115 (QEMU writes it; close() closes it)
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, preexec_fn=die_with_parent)
        self._reader = threading.Thread(target=self._read_console, daemon=True,
                                        name=f"console-{self.proc.pid}")
        self._reader.start()
        return self

    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = ""  # the console's last, unfinished line
        with open(self.log_path, "wb") as logf:
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                arrived = time.time()
                logf.write(chunk)
                logf.flush()
                text = decoder.decode(chunk)
                *lines, partial = (partial + text).split("\n")
                arrivals = [(arrived, int(m.group(1))) for line in lines
                            if (m := RECORD_RE.match(line + "\n"))]
                with self._cond:
                    self._console.append(text)
                    self.record_arrivals += arrivals
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        with self._cond:
            if len(self._console) > 1:
                self._console[:] = ["".join(self._console)]
            return self._console[0] if self._console else ""

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float,
                 since: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` (multiline) in the console from offset ``since``.

        Raises QemuError if QEMU's output ends or ``timeout`` s pass without a match.
        """
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console
            found = regex.search(text, since)
            if found:
                return found
            with self._cond:
                if self._eof and len(self.console) == len(text):
                    raise QemuError(f"guest exited before printing {regex.pattern!r}:\n"
                                    f"{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QemuError(f"guest did not print {regex.pattern!r} within "
                                    f"{timeout:g}s:\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def wait_for_record(self, seq: int, timeout: float) -> int:
        """Wait until the console announced a record numbered ``seq`` or more; return it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.console
            last = self.last_record(text)
            if last >= seq:
                return last
            self.wait_for(RECORD_RE, max(deadline - time.monotonic(), 0.0), len(text))

    def last_record(self, text: str | None = None) -> int:
        """The highest record number the console (or ``text``) announced, 0 if none."""
        text = self.console if text is None else text
        return max((int(n) for n in RECORD_RE.findall(text)), default=0)

    def records_before(self, wall: float) -> int:
        """The highest record whose console line the host had read before ``wall``
        (``time.time()``), 0 if none: the guest printed it before then."""
        with self._cond:
            return max((n for t, n in self.record_arrivals if t < wall), default=0)

    def tail(self, chars: int = 3000) -> str:
        stderr = self.log_path.with_suffix(".stderr")
        errors = stderr.read_text(errors="replace") if stderr.exists() else ""
        return self.console[-chars:] + (f"\n[qemu stderr]\n{errors[-chars:]}" if errors else "")

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on this VM's monitor (connecting on first use)."""
        if self._qmp is None:
            self._qmp = QmpClient(self.qmp_path)
        return self._qmp.execute(command, **arguments)

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit (e.g. after the guest powered off); return its exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise QemuError(f"qemu (pid {self.proc.pid}) still running after {timeout:g}s:\n"
                            f"{self.tail()}") from err

    def kill(self) -> None:
        """SIGKILL QEMU, as a host crash would stop it, and reap it."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit over QMP; SIGKILL it if it is still there after ``timeout`` s."""
        if self.proc and self.proc.poll() is None:
            try:
                self.qmp("quit")
            except (QemuError, OSError) as err:
                log.info("qmp quit: %s", err)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("qemu %d ignored quit for %gs; killing it", self.proc.pid, timeout)
        self.close()

    def close(self) -> None:
        """Kill QEMU if it runs, stop the reader, remove the sockets; safe to call twice."""
        self.kill()
        if self._reader:
            self._reader.join(5)
        if self._qmp:
            self._qmp.close()
            self._qmp = None
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if self.stderr:
            self.stderr.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def __enter__(self) -> GuestVM:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
