"""The protected guest's QEMU monitor, as the controller reaches it: directly, or via libvirt.

The controller pauses the guest around each checkpoint (QMP ``stop``/``cont``) and may save
its state (``migrate`` to a file, bare QEMU only: libvirt's seccomp sandbox kills a QEMU
that forks for ``exec:``).  Both need QEMU's monitor:

- a bare QEMU: its QMP socket (``repdisk controller --qmp GUEST.qmp``), a
  :class:`repdisk.qmp.QMPClient`;
- a guest run by libvirt, which owns the QMP socket (``--libvirt-domain NAME
  [--libvirt-uri URI]``): :class:`LibvirtMonitor` sends the same QMP commands through
  libvirt's monitor passthrough (``virDomainQemuMonitorCommand``, what ``virsh
  qemu-monitor-command`` does), over one libvirt connection kept open.

Both answer ``execute(name, arguments)`` with the command's ``return`` value and raise
ControlError for an error, so the controller's pause and save code is one path for both
(see :func:`connect`).  Passthrough rather than ``virsh suspend/resume``: no second way to
stop and continue a guest next to the QMP one the controller has.  libvirt follows QEMU's STOP/RESUME events, so
``virsh domstate`` shows the guest paused during a checkpoint; it logs the domain as
tainted (``custom-monitor``) once, which is harmless.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Protocol

from .errors import ConfigError, ControlError

DEFAULT_URI = "qemu:///system"


class Monitor(Protocol):
    """What the controller needs of a guest's monitor."""

    def execute(self, name: str, arguments: Optional[Mapping[str, Any]] = None, /) -> Any: ...

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
        import libvirt
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

    def execute(self, name: str, arguments: Optional[Mapping[str, Any]] = None, /) -> Any:
        """Run QMP command ``name``; its ``return`` value, or ControlError."""
        import libvirt
        import libvirt_qemu
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

    def close(self) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:   # a connection whose daemon went away: nothing left to free
                pass


def check(qmp: Optional[str], libvirt_domain: Optional[str]) -> None:
    """One way to reach the guest's monitor, not two; python3-libvirt for libvirt."""
    if qmp and libvirt_domain:
        raise ConfigError("libvirt-domain", "libvirt owns that guest's monitor: give "
                                            "--libvirt-domain or --qmp, not both")
    if libvirt_domain:
        try:
            import libvirt  # noqa: F401
        except ImportError:
            raise ConfigError("libvirt-domain", "needs the libvirt Python module: apt-get "
                                                "install python3-libvirt") from None


def connect(qmp: Optional[str], libvirt_domain: Optional[str],
            libvirt_uri: str = DEFAULT_URI) -> Monitor:
    """The guest's monitor: libvirt's passthrough for a domain, else its QMP socket."""
    if libvirt_domain:
        return LibvirtMonitor(libvirt_domain, libvirt_uri)
    from .qmp import QMPClient
    assert qmp
    return QMPClient(timeout=60.0).connect(qmp)
