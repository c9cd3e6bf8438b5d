"""The keys a repdisk node takes, parsed and checked in one place.

One table (``KEYS``) serves the plugin's ``config`` callback, the header of
``nbdplugin/repdisk.py`` (a test keeps the two equal), ``nbdkit ... --dump-plugin``
and ``repdisk primary|secondary --help``.  nbdkit 1.32 cannot show a Python
script's own ``--help`` text, which is why the table is printed elsewhere.

Every mistake is a :class:`ConfigError` naming the key and saying what to do.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

from repdisk.errors import ConfigError
from repdisk.replication.resyncrate import parse as parse_rate
from repdisk.replication.settings import PrimarySettings
from repdisk.sockaccess import SocketAccess, check_control_mode, parse_access
from repdisk.tls import (
    TLSSpec,
    check_control_plain,
    check_plain,
    control_tls_dir,
)
from repdisk.units import parse_duration, parse_size  # the one parser of each (repdisk.units)
from repdisk.uri import parse_address, uri_tcp_host, uses_tls

PRIMARY, SECONDARY = "primary", "secondary"
ROLES = (PRIMARY, SECONDARY)
ISOLATION_POLICIES = ("suspend", "continue")


@dataclass(frozen=True)
class Key:
    name: str
    roles: tuple[str, ...]
    metavar: str
    help: str
    default: str | None = None  # the value taken when the key is not given
    required: bool = False
    repeat: bool = False
    flag: bool = False     # a yes/no key: `repdisk --NAME` without a value means yes
    derived: str | None = None  # a default derived from other keys, as the help shows it


KEYS: tuple[Key, ...] = (
    Key("role", ROLES, "primary|secondary", "which side of the pair this node is", required=True),
    Key("disk", ROLES, "[NAME:]PATH",
        "a disk of the node (a raw file or block device); repeat the key for a consistency "
        "group of several disks. NAME (letters, digits, '-', '_'; default disk0, disk1, ...) "
        "names its exports and must match on both nodes", required=True, repeat=True),
    Key("control", ROLES, "SOCKET",
        "the node's control socket (QMP protocol; mode 0600 unless control-mode)", required=True),
    Key("control-tcp", ROLES, "HOST:PORT",
        "also serve the control protocol on TCP, for a controller on another host; TLS with "
        "client certificates (control-tls) is required, loopback included, unless insecure=yes"),
    Key("control-tls", ROLES, "x509:DIR|off",
        "certificates for control-tcp (repdisk tls ca DIR): the node shows server-cert.pem and "
        "accepts only clients with a certificate signed by ca-cert.pem", default="off"),
    Key("control-group", ROLES, "GROUP",
        "give the control socket to this group (for operators; with control-mode 0660)"),
    Key("control-mode", ROLES, "MODE",
        "the control socket's permission bits, octal; never for every local user", default="0600"),
    Key("socket-owner", ROLES, "USER",
        "give the NBD Unix socket (--nbd-socket) to this user, e.g. the user QEMU runs as"),
    Key("socket-group", ROLES, "GROUP",
        "give the NBD Unix socket to this group, e.g. libvirt-qemu (libvirt's QEMU user on "
        "Debian); with socket-mode 0660 QEMU running as that group can connect"),
    Key("socket-mode", ROLES, "MODE",
        "the NBD Unix socket's permission bits, octal (connecting needs w), e.g. 0660",
        derived="nbdkit's: 0777 minus the umask"),
    Key("state", ROLES, "PATH", "the node's state file (epoch, consistency)",
        derived="first disk + '.state'"),
    Key("secondary", (PRIMARY,), "NBD-URI",
        "the secondary's replica export, e.g. nbd+unix:///replica?socket=/run/sec.sock or "
        "nbd://host:10809/replica; with several disks each disk NAME uses replica/NAME",
        required=True),
    Key("secondary-tls", (PRIMARY,), "psk:FILE[:USER]|x509:DIR|off",
        "credentials for the link to the secondary (the secondary's nbdkit must require the "
        "same: repdisk secondary --tls ...); USER defaults to repdisk. Needed for a TCP "
        "secondary on another host unless insecure=yes", default="off"),
    Key("insecure", ROLES, "yes|no",
        "allow plain, unencrypted TCP: the primary's link to a secondary that is not on "
        "loopback, and control-tcp without control-tls", default="no", flag=True),
    Key("write-mode", (PRIMARY,), "sync|async",
        "sync: a guest write is acknowledged once local and on the secondary; async: once "
        "local, then written back to the secondary from a dirty map (at most max-lag behind)",
        default="sync"),
    Key("timeout", (PRIMARY,), "DURATION",
        "how long the secondary may take to answer before the primary degrades (e.g. 5s, 500ms)",
        default="5s"),
    Key("window", (PRIMARY,), "N", "most requests in flight to the secondary", default="64"),
    Key("max-lag", (PRIMARY,), "SIZE",
        "async mode: most bytes acknowledged to the guest but not yet sent to the secondary; "
        "guest writes wait beyond it (a checkpoint sends what is unsent, so this also bounds "
        "its work)", default="256M"),
    Key("resync-rate", (PRIMARY,), "auto|max|SIZE",
        "how fast a resync (and an initial sync) copies: auto backs off to small pieces at "
        "16M per second while the guest writes and runs at full speed while it does not; "
        "SIZE is a fixed cap in bytes per second (e.g. 100M); max is no limit",
        default="auto"),
    Key("on-isolation", (PRIMARY,), "suspend|continue",
        "what guest writes do once the primary has heard from neither the secondary nor the "
        "controller for isolation-timeout: suspend holds them until one answers (a controller "
        "that failed over meanwhile fences this node: writes then fail); continue is the "
        "explicit opt-in to risk a split brain", default="suspend"),
    Key("isolation-timeout", (PRIMARY,), "DURATION",
        "how long without contact makes the primary isolated; keep it below the controller's "
        "heartbeat-timeout, so an isolated primary stops writing before a failover",
        default="3s"),
    Key("active", (SECONDARY,), "PATH", "the active overlay (one disk only)",
        derived="disk + '.active'"),
    Key("hidden", (SECONDARY,), "PATH", "the hidden overlay (one disk only)",
        derived="disk + '.hidden'"),
    Key("cluster-size", (SECONDARY,), "SIZE",
        "overlay cluster size, a power of two from 512 to 2M (e.g. 64K)", default="64K"),
)
KEY_BY_NAME = {k.name: k for k in KEYS}


def default(key: str) -> str:
    """The key table's default value of ``key`` (the one place defaults are written)."""
    value = KEY_BY_NAME[key].default
    if value is None:
        raise KeyError(f"the key {key} has no default value")
    return value
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def help_text(role: str | None = None) -> str:
    """The key table as text, for one role or both."""
    lines = []
    for k in KEYS:
        if role and role not in k.roles:
            continue
        flags = "required" if k.required else f"default {k.derived or k.default}"
        if k.repeat:
            flags += ", repeatable"
        only = "" if len(k.roles) == 2 else f" [{k.roles[0]} only]"
        lines.append(f"{k.name}={k.metavar}  ({flags}){only}\n    {k.help}")
    return "\n".join(lines)


def parse_bool(key: str, text: str) -> bool:
    if text.lower() in ("yes", "true", "on", "1"):
        return True
    if text.lower() in ("no", "false", "off", "0"):
        return False
    raise ConfigError(key, f"expected yes or no, got {text!r}")


def parse_uint(key: str, text: str, low: int = 1) -> int:
    if not text.strip().isdigit() or int(text) < low:
        raise ConfigError(key, f"expected a whole number >= {low}, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class DiskSpec:
    name: str
    path: str


def parse_disk(text: str, index: int) -> DiskSpec:
    name, sep, path = text.partition(":")
    if not sep or not NAME_RE.match(name):
        name, path = f"disk{index}", text
    if not path:
        raise ConfigError("disk", "empty path: give disk=PATH or disk=NAME:PATH")
    return DiskSpec(name, path)


def check_folder(key: str, path: str) -> None:
    """ConfigError naming ``key`` if the folder that is to hold ``path`` does not exist (a
    socket, state, pid or log file is created there)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(key, f"{path}: the folder {folder} does not exist: create it "
                               f"(mkdir -p {folder}) or choose another path")


def check_disk_file(path: str) -> int:
    """The size of a usable disk, or a ConfigError saying why it is not usable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError("disk", f"{path} is a symbolic link to {os.readlink(path)}, "
                                      "which does not exist: fix the link") from None
        raise ConfigError("disk", f"{path} does not exist: create it first "
                                  f"(e.g. truncate -s 1G {path})") from None
    except OSError as err:
        raise ConfigError("disk", f"cannot stat {path}: {err.strerror}") from err
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError("disk", f"{path} is not a regular file or block device")
    if not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError("disk", f"{path} is not readable and writable by this user")
    size = st.st_size
    if stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
    if size == 0:
        raise ConfigError("disk", f"{path} is empty: give it a size (e.g. truncate -s 1G {path})")
    return size


@dataclass
class NodeConfig:
    """A node's checked keys.  Every setting holds the value given or the key table's
    default, for either role: a secondary keeps a primary's settings (its promotion uses
    them) and a primary a secondary's (its demotion does)."""

    role: str
    disks: list[DiskSpec]
    control: str
    state: str
    insecure: bool
    secondary: str | None = field(init=False)       # primary only: the replica URI
    secondary_tls: TLSSpec | None = field(init=False)
    primary: PrimarySettings = field(init=False)    # what its primary disks are built with
    on_isolation: str = field(init=False)
    isolation_timeout: float = field(init=False)
    active: str | None = field(init=False)          # given for a single disk, else None
    hidden: str | None = field(init=False)
    cluster_size: int = field(init=False)
    control_tcp: tuple[str, int] | None = field(init=False)
    control_tls: str | None = field(init=False)     # certificate directory for control_tcp
    control_access: SocketAccess = field(init=False)
    nbd_socket_access: SocketAccess = field(init=False)   # applied by the plugin (sockaccess)

    @classmethod
    def from_keys(cls, pairs: Iterable[tuple[str, str]]) -> NodeConfig:
        """Check every key and value; the first mistake raises ConfigError."""
        values: dict[str, list[str]] = {}
        for key, value in pairs:
            k = KEY_BY_NAME.get(key)
            if k is None:
                raise ConfigError(key, f"unknown key; known keys: {', '.join(KEY_BY_NAME)}")
            if key in values and not k.repeat:
                raise ConfigError(key, "given twice; give it once")
            values.setdefault(key, []).append(value)
        role = _one(values, "role")
        if role is None or role not in ROLES:
            raise ConfigError("role", f"unknown role {role!r}: use role=primary or role=secondary")
        for key in values:
            if role not in KEY_BY_NAME[key].roles:
                raise ConfigError(key, f"is not a {role} key (it belongs to role="
                                       f"{KEY_BY_NAME[key].roles[0]})")
        for k in KEYS:
            if k.required and role in k.roles and k.name not in values:
                raise ConfigError(k.name, f"is required for role={role} ({k.metavar})")
        disks = [parse_disk(text, i) for i, text in enumerate(values["disk"])]
        _check_disks(disks)
        control = _one(values, "control")
        assert control is not None  # required
        cfg = cls(role=role, disks=disks, control=control,
                  state=_one(values, "state") or disks[0].path + ".state",
                  insecure=parse_bool("insecure", _value(values, "insecure")))
        check_folder("control", cfg.control)
        check_folder("state", cfg.state)
        cfg._control_keys(values)
        cfg._socket_keys(values)
        cfg.secondary, cfg.secondary_tls = None, None
        if role == PRIMARY:
            cfg._link_keys(values)
        cfg._primary_keys(values)
        cfg._secondary_keys(values)
        return cfg

    def overlays(self, disk_path: str) -> tuple[str, str]:
        """The hidden and active overlays' paths of the disk at ``disk_path``."""
        return self.hidden or disk_path + ".hidden", self.active or disk_path + ".active"

    def _control_keys(self, values: dict[str, list[str]]) -> None:
        """control-tcp needs control-tls (or insecure); control-tls alone is a mistake."""
        tcp, tls = _one(values, "control-tcp"), _value(values, "control-tls")
        self.control_tcp, self.control_tls = None, None
        if tcp is None:
            if tls != "off":
                raise ConfigError("control-tls", "is for control-tcp: give control-tcp=HOST:PORT "
                                                 "too, or leave control-tls out")
            return
        self.control_tcp = parse_address("control-tcp", tcp)
        self.control_tls = control_tls_dir("control-tls", tls, "server")
        if self.control_tls is None:
            check_control_plain("control-tcp", tcp, self.insecure)

    def _socket_keys(self, values: dict[str, list[str]]) -> None:
        """Who may connect to the control and NBD sockets (repdisk.sockaccess)."""
        control = parse_access("control", None, _one(values, "control-group"),
                               _value(values, "control-mode"))
        assert control.mode is not None
        check_control_mode("control-mode", control.mode)
        self.control_access = control
        self.nbd_socket_access = parse_access("socket", _one(values, "socket-owner"),
                                              _one(values, "socket-group"),
                                              _one(values, "socket-mode"))

    def _link_keys(self, values: dict[str, list[str]]) -> None:
        """A primary's link: the secondary's replica URI and its credentials."""
        self.secondary = _one(values, "secondary")
        if not re.match(r"^nbds?(\+unix|\+vsock)?://", self.secondary or ""):
            raise ConfigError("secondary", f"{self.secondary!r} is not an NBD URI: use e.g. "
                                           "nbd+unix:///replica?socket=/run/sec.sock")
        _check_replica_export(self.secondary or "")
        self._secondary_tls(_value(values, "secondary-tls"))

    def _primary_keys(self, values: dict[str, list[str]]) -> None:
        self.primary = _primary_settings(values)
        self.on_isolation = _value(values, "on-isolation")
        if self.on_isolation not in ISOLATION_POLICIES:
            raise ConfigError("on-isolation", f"unknown policy {self.on_isolation!r}: use "
                                              "suspend or continue")
        self.isolation_timeout = parse_duration("isolation-timeout",
                                                _value(values, "isolation-timeout"))

    def _secondary_tls(self, text: str) -> None:
        """Fold the link's credentials into the secondary's URI; refuse plain TCP to another
        host unless insecure (see repdisk.tls)."""
        assert self.secondary is not None
        spec = TLSSpec.parse("secondary-tls", text)
        if spec is not None:
            spec.check("secondary-tls", "client")
            self.secondary = spec.client_uri("secondary", self.secondary)
            self.secondary_tls = spec
        host = uri_tcp_host(self.secondary)
        if host is not None and not uses_tls(self.secondary):
            check_plain("secondary", "the secondary", host, self.insecure)

    def _secondary_keys(self, values: dict[str, list[str]]) -> None:
        self.active, self.hidden = _one(values, "active"), _one(values, "hidden")
        if len(self.disks) > 1 and (self.active or self.hidden):
            raise ConfigError("active" if self.active else "hidden",
                              "only for a single disk; with several disks each disk's overlays "
                              "are PATH.active and PATH.hidden")
        size = parse_size("cluster-size", _value(values, "cluster-size"))
        if size < 512 or size > 2 << 20 or size & (size - 1):
            raise ConfigError("cluster-size", f"{size} is not a power of two from 512 to 2M")
        self.cluster_size = size


def _check_replica_export(uri: str) -> None:
    """The primary writes to the secondary's replica export: refuse a URI naming another
    (without ``/replica`` it names the default export, the secondary VM's ``active``)."""
    base = uri.partition("?")[0]
    export = unquote(base.partition("://")[2].partition("/")[2])
    if export == "replica" or export.startswith("replica/"):
        return
    named = f"the export {export!r}" if export else "the default export '' (its 'active' view)"
    example = re.sub(r"^([a-z+]+://[^/?]*)/?[^?]*", r"\1/replica", uri)
    raise ConfigError("secondary", f"{uri} names {named} of the secondary; the primary writes "
                                   f"to its replica export 'replica' (or 'replica/NAME' for one "
                                   f"disk of a group): use {example}")


def _one(values: dict[str, list[str]], key: str) -> str | None:
    got = values.get(key)
    return got[0] if got else None


def primary_settings(**given: str) -> PrimarySettings:
    """A primary disk's settings from key values (``write_mode="async"``: the key's name
    with ``_`` for ``-``), each one not given the key table's default: how library users
    (tests, bench/) build a ``PrimaryReplica`` with the defaults a node has."""
    return _primary_settings({key.replace("_", "-"): [value] for key, value in given.items()})


def _primary_settings(values: dict[str, list[str]]) -> PrimarySettings:
    write_mode = _value(values, "write-mode")
    if write_mode not in ("sync", "async"):
        raise ConfigError("write-mode", f"unknown mode {write_mode!r}: use sync or async")
    max_lag = check_max_lag(parse_size("max-lag", _value(values, "max-lag")))
    return PrimarySettings(write_mode=write_mode,
                           timeout=parse_duration("timeout", _value(values, "timeout")),
                           window=parse_uint("window", _value(values, "window")),
                           max_lag=max_lag,
                           resync_rate=parse_rate("resync-rate", _value(values, "resync-rate")))


def check_max_lag(max_lag: int) -> int:
    """``max-lag`` in bytes, if it is large enough (ConfigError if not)."""
    if max_lag < 1 << 20:
        raise ConfigError("max-lag", f"{max_lag} bytes is too small: use at least 1M")
    return max_lag


def _value(values: dict[str, list[str]], key: str) -> str:
    """The value given for ``key``, else the key table's default."""
    given = _one(values, key)
    return default(key) if given is None else given


def _check_disks(disks: list[DiskSpec]) -> None:
    names = [d.name for d in disks]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("disk", f"two disks are named {name!r}: names must be unique")
    paths = [os.path.realpath(d.path) for d in disks]
    if len(set(paths)) != len(paths):
        raise ConfigError("disk", "the same file is given twice")
    for d in disks:
        check_disk_file(d.path)
