"""The protected guest's QEMU monitor, as the controller reaches it: directly, or via libvirt.

The controller pauses the guest around each checkpoint (QMP ``stop``/``cont``) and may save
its state (``migrate`` to a file, :func:`migrate_to_file`).  Both need QEMU's monitor:

- a bare QEMU: its QMP socket (``repdisk controller --qmp GUEST.qmp``), a
  :class:`repdisk.qmp.protocol.QMPClient`;
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
import os
import shlex
from collections.abc import Mapping
from typing import Any, Protocol

from repdisk.errors import ConfigError, ControlError
from repdisk.qmp.protocol import QMPClient

try:        # python3-libvirt: needed only for --libvirt-domain (check() says so)
    import libvirt
    import libvirt_qemu
except ImportError:
    HAVE_LIBVIRT = False
else:
    HAVE_LIBVIRT = True

DEFAULT_URI = "qemu:///system"
FD_NAME = "repdisk-vmstate"    # QEMU's name of the state file's descriptor


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
            libvirt_uri: str = DEFAULT_URI) -> Monitor:
    """The guest's monitor: libvirt's passthrough for a domain, else its QMP socket."""
    if libvirt_domain:
        return LibvirtMonitor(libvirt_domain, libvirt_uri)
    assert qmp
    return QMPClient(timeout=60.0).connect(qmp)
