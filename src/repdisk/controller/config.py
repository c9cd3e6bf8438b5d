"""The controller's settings (``repdisk controller``'s options) and their checks."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from repdisk import tls
from repdisk.controller.guest import DEFAULT_URI as LIBVIRT_URI
from repdisk.controller.guest import check as check_guest
from repdisk.controller.syncplan import SYNC_MODES
from repdisk.errors import ConfigError
from repdisk.replication.resync import GRANULARITY
from repdisk.uri import tcp_address


@dataclass
class ControllerConfig:
    primary: str                        # control sockets
    secondary: str
    control: str | None = None       # the controller's own control socket
    interval: float = 5.0               # seconds between checkpoints
    heartbeat: float = 1.0
    heartbeat_timeout: float = 6.0     # above the primary's timeout (5s) and isolation (3s)
    qmp: str | None = None           # the primary guest's QMP socket
    libvirt_domain: str | None = None   # or its libvirt domain (guest.py)
    libvirt_uri: str = LIBVIRT_URI
    freeze: bool = False                # fsfreeze through the guest agent instead of stop/cont
    qga: str | None = None           # the guest agent's socket (default: QMP path + .qga)
    vm_state: str | None = None      # folder for the guest's state at each checkpoint
    on_failover: str | None = None   # shell command run after a failover
    on_switchover: str | None = None  # shell command run after a switchover
    initial_sync: str = "checksum"
    metrics_file: str | None = None
    granularity: int = GRANULARITY
    command_timeout: float = 3600.0     # long node commands: copies, failover commits
    auto_failover: bool = True
    tls: str | None = None           # certificates for nodes reached at HOST:PORT
    insecure: bool = False              # plain TCP to nodes / on control_tcp
    control_tcp: tuple[str, int] | None = None   # the controller's own TCP control port
    control_tls: str | None = None   # its certificate directory

    def check(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat:
            raise ConfigError("heartbeat-timeout", f"{self.heartbeat_timeout:g}s must exceed "
                                                   f"the heartbeat ({self.heartbeat:g}s)")
        if self.initial_sync not in SYNC_MODES:
            raise ConfigError("initial-sync", f"unknown mode {self.initial_sync!r}: use "
                                              f"{', '.join(SYNC_MODES)}")
        if self.freeze and not (self.qga or self.qmp):
            raise ConfigError("freeze", "needs the guest agent's socket: give --qga (or --qmp, "
                                        "whose path + '.qga' is then used)")
        check_guest(self.qmp, self.libvirt_domain)
        if self.vm_state and (not (self.qmp or self.libvirt_domain) or self.freeze):
            raise ConfigError("vm-state", "needs --qmp (or --libvirt-domain) and no --freeze: "
                                          "the guest must be stopped while its state is saved")
        if same_address(self.primary, self.secondary):
            raise ConfigError("secondary", f"{self.secondary} is the same node as --primary: "
                                           "give the other node's control socket")
        for role, address in (("primary", self.primary), ("secondary", self.secondary)):
            if tcp_address(address) and not self.tls and not self.insecure:
                raise ConfigError(role, f"{address} is a TCP control port: give --tls DIR "
                                        "(client certificates), or --insecure")
        if self.control_tcp and not self.control_tls:
            host, port = self.control_tcp
            tls.check_control_plain("control-tcp", f"{host}:{port}", self.insecure)

    @property
    def ident(self) -> str:
        """This controller's name in the nodes' leases: stable across its restarts (host and
        control socket), so a restarted controller takes its pair back at once, while
        another controller is refused until the lease lapses."""
        if self.control:
            where = os.path.abspath(self.control)
        elif self.control_tcp:
            where = "tcp:{}:{}".format(*self.control_tcp)
        else:
            where = f"pid {os.getpid()}"
        return f"{socket.gethostname()}:{where}"

    @property
    def lease(self) -> float:
        """How long a node refuses other controllers after this one's last command: longer
        than any gap between two of its commands (its copies heartbeat both nodes)."""
        return max(2 * self.heartbeat_timeout, 5.0)


def same_address(a: str, b: str) -> bool:
    """Whether two control addresses name one node: the same HOST:PORT, or one socket file."""
    if tcp_address(a) or tcp_address(b):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)

