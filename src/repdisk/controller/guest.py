"""The protected guest, as the controller reaches it: its QEMU monitor and its guest agent;
:class:`Guest` is what the controller holds.

The controller pauses the guest around each checkpoint (QMP ``stop``/``cont``; with
``--freeze`` it freezes the guest's filesystems through the guest agent instead,
:class:`GuestAgent`), may save its state (``migrate`` to a file, :func:`save_vm_state`) and
moves it in a switchover (:func:`migration_pause`).  All but the freeze need QEMU's monitor:

- a bare QEMU: its QMP socket (``repdisk controller --qmp GUEST.qmp``), a
  :class:`repdisk.qmp.client.QMPClient`;
- a guest run by libvirt, which owns the QMP socket (``--libvirt-domain NAME
  [--libvirt-uri URI]``): :class:`LibvirtMonitor` sends the same QMP commands through
  libvirt's monitor passthrough (``virDomainQemuMonitorCommand``, what ``virsh
  qemu-monitor-command`` does), over one libvirt connection kept open.

Both answer ``execute(name, arguments)`` with the command's ``return`` value and raise
ControlError for an error, so the controller's pause and save code is one path for both
(see :func:`connect`).  Passthrough rather than ``virsh suspend/resume`` + ``virsh save``:
no second way to stop and continue a guest next to the QMP one the controller has, and
``virsh save`` ends the domain, which a checkpoint must not.

The state goes to a file in two ways.  A bare QEMU runs ``cat > FILE`` (``exec:``).  libvirt
starts QEMU with ``-sandbox ...,spawn=deny``, and a QEMU that forks is killed by seccomp
(seen: "shutting down, reason=crashed"); so for a libvirt guest the controller opens the
file itself and hands QEMU the descriptor with the command (``getfd``, through
``virDomainQemuMonitorCommandWithFiles``), then migrates to ``fd:``: QEMU never opens a path,
so it works whichever user QEMU runs as.  libvirt follows QEMU's STOP/RESUME events, so
``virsh domstate`` shows the guest paused during a checkpoint; it logs the domain as
tainted (``custom-monitor``) once, which is harmless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from repdisk.errors import ConfigError, ControlError
from repdisk.qmp.client import QMPClient

try:        # python3-libvirt: needed only for --libvirt-domain (check() says so)
    import libvirt
    import libvirt_qemu
except ImportError:
    HAVE_LIBVIRT = False
else:
    HAVE_LIBVIRT = True

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
FD_NAME = "repdisk-vmstate"    # QEMU's name of the state file's descriptor
#: Migration bandwidth (bytes/s) for saving a stopped guest's state: as fast as it goes.
VM_STATE_BANDWIDTH = 8 << 30


class Monitor(Protocol):
    """What the controller needs of a guest's monitor."""

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None, /) -> Any: ...

    def close(self) -> None: ...


class LibvirtMonitor:
    """QMP commands to the QEMU of libvirt domain ``domain`` at ``uri`` (python3-libvirt).

    The connection is made on first use and dropped after a failure, so a guest that libvirt
    restarted (a new QEMU, the same name) is found again by the next command.
    """

    def __init__(self, domain: str, uri: str = DEFAULT_URI) -> None:
        self.domain, self.uri = domain, uri
        self._conn: Any = None
        self._dom: Any = None

    def _lookup(self) -> Any:
        if self._dom is None:
            try:
                self._conn = self._conn or libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                raise ControlError(f"libvirt {self.uri}: cannot connect: "
                                   f"{err.get_error_message()}; is libvirtd running?") from None
            try:
                self._dom = self._conn.lookupByName(self.domain)
            except libvirt.libvirtError as err:
                raise ControlError(f"libvirt {self.uri}: {err.get_error_message()}: start "
                                   f"the guest, or give its name (virsh list)") from None
        return self._dom

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None, /) -> Any:
        """Run QMP command ``name``; its ``return`` value, or ControlError."""
        cmd: dict[str, Any] = {"execute": name}
        if arguments:
            cmd["arguments"] = dict(arguments)
        dom = self._lookup()
        try:
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0))
        except libvirt.libvirtError as err:
            self.close()
            raise ControlError(f"libvirt domain {self.domain}: {name}: "
                               f"{err.get_error_message()}") from None
        if "error" in reply:
            error = reply["error"]
            raise ControlError(f"libvirt domain {self.domain}: {name}: {error.get('desc')}",
                               error.get("class", "GenericError"))
        return reply.get("return")

    def migrate_to_file(self, path: str) -> None:
        """Start migrating the guest's state into ``path`` (created 0600 by this process),
        through a descriptor passed with ``getfd``: see the module."""
        dom = self._lookup()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            cmd = {"execute": "getfd", "arguments": {"fdname": FD_NAME}}
            reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(dom, json.dumps(cmd), [fd], 0)
        except libvirt.libvirtError as err:
            self.close()
            raise ControlError(f"libvirt domain {self.domain}: getfd: "
                               f"{err.get_error_message()}") from None
        finally:
            os.close(fd)
        if "error" in json.loads(reply):
            raise ControlError(f"libvirt domain {self.domain}: getfd: {reply}")
        self.execute("migrate", {"uri": f"fd:{FD_NAME}"})

    def close(self) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            # A connection whose daemon went away: nothing left to free.
            with contextlib.suppress(Exception):
                conn.close()


def migrate_to_file(monitor: Monitor, path: str) -> None:
    """Start QMP ``migrate`` of the (stopped) guest into the file ``path``; the caller polls
    ``query-migrate``.  See the module for the two ways."""
    if isinstance(monitor, LibvirtMonitor):
        monitor.migrate_to_file(path)
    else:
        monitor.execute("migrate", {"uri": "exec:cat > " + shlex.quote(path)})


def check(qmp: str | None, libvirt_domain: str | None) -> None:
    """One way to reach the guest's monitor, not two; python3-libvirt for libvirt."""
    if qmp and libvirt_domain:
        raise ConfigError("libvirt-domain", "libvirt owns that guest's monitor: give "
                                            "--libvirt-domain or --qmp, not both")
    if libvirt_domain and not HAVE_LIBVIRT:
        raise ConfigError("libvirt-domain", "needs the libvirt Python module: apt-get "
                                            "install python3-libvirt")


def connect(qmp: str | None, libvirt_domain: str | None,
            libvirt_uri: str = DEFAULT_URI, timeout: float = 60.0) -> Monitor:
    """The guest's monitor: libvirt's passthrough for a domain, else its QMP socket, whose
    every call answers within ``timeout`` seconds or fails."""
    if libvirt_domain:
        return LibvirtMonitor(libvirt_domain, libvirt_uri)
    assert qmp
    try:
        return QMPClient(timeout=timeout).connect(qmp, timeout=timeout)
    except ControlError as err:
        raise ControlError(f"guest monitor {qmp} does not answer ({_root_cause(err)}): start "
                           "the guest's QEMU, or give --qmp the socket of its -qmp option",
                           "") from err


def _root_cause(err: BaseException) -> str:
    """The system's word for why a connection failed (the first OSError of the chain), or
    the error's own text."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or getattr(seen, "exc", None)
    return str(err)


class GuestAgent:
    """The QEMU guest agent (JSON lines over its socket), for fsfreeze around checkpoints.

    Each call opens the socket, resynchronizes with ``guest-sync`` (the agent may hold a
    stale reply from an earlier client) and runs one command.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path, self.timeout = path, timeout

    def freeze(self) -> int:
        return int(self.call("guest-fsfreeze-freeze"))

    def thaw(self) -> int:
        return int(self.call("guest-fsfreeze-thaw"))

    def call(self, command: str, args: dict[str, Any] | None = None) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                lines = sock.makefile("rb")
                token = int(time.monotonic_ns() % 2**31)
                self._send(sock, "guest-sync", {"id": token})
                while json.loads(lines.readline() or b"null") != {"return": token}:
                    pass
                self._send(sock, command, args)
                reply = json.loads(lines.readline() or b"null")
        except (OSError, ValueError) as err:
            raise ControlError(f"guest agent {self.path}: {command} failed: {err}; is "
                               "qemu-guest-agent running in the guest?") from err
        if not isinstance(reply, dict) or "return" not in reply:
            desc = (reply or {}).get("error", {}).get("desc", reply)
            raise ControlError(f"guest agent {self.path}: {command} failed: {desc}")
        return reply["return"]

    @staticmethod
    def _send(sock: socket.socket, command: str, args: dict[str, Any] | None) -> None:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        sock.sendall(json.dumps(msg).encode() + b"\n")


def save_vm_state(guest: Monitor, path: str, timeout: float = 300.0) -> int:
    """Save a stopped guest's device and memory state to ``path`` (QMP migrate to a file).

    QEMU throttles a migration to 128 MiB/s by default, which only stretches the pause of
    a guest that is stopped anyway (0.7 s instead of 0.1 s for 90 MiB): lift the limit.
    """
    if os.path.exists(path):
        os.unlink(path)
    guest.execute("migrate-set-parameters", {"max-bandwidth": VM_STATE_BANDWIDTH})
    migrate_to_file(guest, path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = guest.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return os.path.getsize(path)
        if status in ("failed", "cancelled"):
            raise ControlError(f"saving the guest's state to {path} failed: "
                               f"{info.get('error-desc', status)}")
        time.sleep(0.01)
    raise ControlError(f"saving the guest's state to {path} took over {timeout:g}s")


class Guest:
    """The protected guest as the controller handles it: paused around each checkpoint
    (stopped through its monitor, or with ``freeze`` its filesystems frozen through its
    guest agent), its state saved through the monitor, moved by a switchover.

    ``qmp`` or ``libvirt_domain`` reach its monitor (:func:`check` allows one), connected on
    first use and kept until the guest moves or :meth:`close`; with neither and no
    ``freeze`` there is no guest to pause.  ``qga``: the agent's socket (default: the QMP
    path + ``.qga``)."""

    def __init__(self, qmp: str | None, libvirt_domain: str | None,
                 libvirt_uri: str = DEFAULT_URI, freeze: bool = False,
                 qga: str | None = None, timeout: float = 60.0) -> None:
        self.qmp, self.libvirt_domain, self.libvirt_uri = qmp, libvirt_domain, libvirt_uri
        self.freeze, self.qga = freeze, qga
        #: Seconds a monitor call may take: the controller's run loop (its heartbeats, a
        #: failover) waits for a checkpoint's, so a hung QEMU must not hold it for long.
        self.timeout = timeout
        self._monitor: Monitor | None = None

    @property
    def managed(self) -> bool:
        """Whether there is a guest to pause (it runs on the primary's host)."""
        return bool(self.qmp or self.libvirt_domain or self.freeze)

    def monitor(self) -> Monitor:
        """The guest's monitor, connected on first use."""
        if self._monitor is None:
            self._monitor = connect(self.qmp, self.libvirt_domain, self.libvirt_uri,
                                    self.timeout)
        return self._monitor

    def paused(self, body: Callable[[], None]) -> float:
        """Run ``body`` with the guest stopped (or frozen); return how long it was.

        A guest that migrated away (postmigrate) is refused, as continuing it would run
        the guest twice (ControlError); any other is continued afterwards, so that a guest
        a controller killed inside a checkpoint left stopped runs again."""
        if not (self.qmp or self.libvirt_domain) and not self.freeze:
            body()
            return 0.0
        if self.freeze:
            qga = self.qga or (self.qmp + ".qga" if self.qmp else None)
            assert qga is not None, "a freeze needs --qga or --qmp (ControllerConfig.check)"
            agent = GuestAgent(qga)
            t0 = time.monotonic()
            agent.freeze()
            try:
                body()
            finally:
                agent.thaw()
            return time.monotonic() - t0
        status = self._execute("query-status").get("status")
        if status == "postmigrate":
            raise ControlError(f"the guest at {self.qmp or self.libvirt_domain} migrated "
                               "away (postmigrate): restart the controller with --qmp of the "
                               "QEMU it runs in now")
        t0 = time.monotonic()
        self._execute("stop")
        try:
            body()
        finally:
            self._execute("cont")
        return time.monotonic() - t0

    def _execute(self, command: str) -> Any:
        """Run ``command`` on the monitor.  A connection that broke (the guest's QEMU was
        restarted, or its monitor closed ours) is made anew, once: the next QEMU on the
        same socket is the guest now.  One that did not answer in time is not retried."""
        try:
            return self.monitor().execute(command)
        except ControlError as err:
            if isinstance(err.__cause__, TimeoutError):
                raise
            log.warning("guest monitor %s: %s; connecting again", self.qmp or
                        self.libvirt_domain, err)
            self.close()
            return self.monitor().execute(command)

    def moved(self, qmp: str) -> None:
        """The guest runs in the QEMU whose monitor is ``qmp`` now (a switchover moved it)."""
        self.qmp, self.libvirt_domain = qmp, None
        self.close()

    def close(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.close()


def migration_pause(monitor: Callable[[], Monitor], migrate: str,
                    qmp: str) -> Callable[[Callable[[], None]], float]:
    """A switchover's ``pause`` that moves the guest: live-migrate it (its monitor:
    ``monitor()``) to ``migrate``, run the body once QEMU stopped it, resume the new QEMU
    at ``qmp``; the pause returns how long the guest was stopped.  The new QEMU must answer
    at ``qmp`` and wait for a migration before anything changes (raises ControlError)."""
    def pause(body: Callable[[], None]) -> float:
        new = _incoming(qmp)
        try:
            return _migrate(monitor(), migrate, body, new)
        finally:
            new.close()
    return pause


def _incoming(qmp: str) -> QMPClient:
    """The monitor of the QEMU the guest moves to, checked: it answers and waits for an
    incoming migration (raises ControlError, nothing changed)."""
    try:
        new = QMPClient(timeout=30).connect(qmp, timeout=5.0)
    except ControlError as err:
        raise ControlError(f"cannot switch over: the new guest's monitor qmp={qmp} does not "
                           f"answer ({err}); nothing changed") from err
    status = new.execute("query-status").get("status")
    if status != "inmigrate":
        new.close()
        raise ControlError(f"cannot switch over: qmp={qmp} is a QEMU in state {status}, not "
                           "one waiting for the guest (-incoming); give the new QEMU's "
                           "monitor; nothing changed")
    return new


def _migrate(guest: Monitor, migrate: str, body: Callable[[], None], new: QMPClient) -> float:
    """Live-migrate the guest to ``migrate``, run ``body`` once it stopped, resume ``new``;
    how long the guest was stopped."""
    guest.execute("migrate-set-parameters", {"max-bandwidth": VM_STATE_BANDWIDTH})
    guest.execute("migrate", {"uri": migrate})
    stopped = None
    while (status := guest.execute("query-migrate").get("status")) != "completed":
        if status in ("failed", "cancelled"):
            raise ControlError(f"cannot switch over: the guest's migration to "
                               f"{migrate} {status}; nothing changed")
        if stopped is None and not guest.execute("query-status")["running"]:
            stopped = time.monotonic()
        time.sleep(0.002)
    stopped = stopped or time.monotonic()
    body()
    new.execute("cont")
    return time.monotonic() - stopped
