"""Resource files: one TOML file per replicated resource, in a directory (``/etc/repdisk``).

A resource is one pair (a consistency group of disks) and its controller.  The file's name
is the resource's name (``web.toml`` -> ``web``)::

    [primary]
    host = "alpha"                        # default: this host (see ``this_host``)
    disk = "/var/lib/repdisk/web.img"     # or a list: ["root:/a.img", "data:/b.img"]
    control = "/run/repdisk/web-pri.qmp"
    nbd-socket = "/run/repdisk/web-pri.sock"   # or nbd-address = "10.0.0.1:10809"
    write-mode = "async"                  # any primary key of `repdisk primary --help`

    [secondary]
    host = "beta"
    disk = "/var/lib/repdisk/web.img"
    control = "/run/repdisk/web-sec.qmp"
    nbd-address = "10.0.0.2:10809"
    tls = "x509:/etc/repdisk/tls"         # the NBD listener's TLS (repdisk secondary --tls)

    [controller]                          # optional; runs on the primary's host by default
    control = "/run/repdisk/web-ctrl.qmp" # default: the primary's control + ".ctrl.qmp"
    interval = "5s"                       # and any option of `repdisk controller --help`

The primary's ``secondary`` key is made from the secondary's listener (its ``replica``
export), so the two cannot disagree.  :func:`load_dir` reads every file of the directory
and checks each one (unknown keys, values, as the nodes themselves would) and all of them
together (two resources on one socket or port, a disk used twice on a host, a missing
peer); the first mistake raises :class:`ResourceError` naming the file, the line and the
key, before anything is started.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from repdisk.cli import controllercmd
from repdisk.errors import ConfigError, RepdiskError
from repdisk.node import config as cfgmod
from repdisk.units import parse_duration
from repdisk.uri import parse_address

DEFAULT_DIR = "/etc/repdisk"
SUFFIX = ".toml"
ROLES = (cfgmod.SECONDARY, cfgmod.PRIMARY)   # start order; stop order is the reverse
#: Keys of a node section besides the node keys of config.KEYS for its role.
LISTEN_KEYS = ("host", "nbd-socket", "nbd-address", "tls", "threads")
#: Options of `repdisk controller` a [controller] section may give (beside host, control).
CONTROLLER_KEYS = ("host", "control", "interval", "heartbeat", "heartbeat-timeout", "qmp",
                   "freeze", "qga", "vm-state", "on-failover", "on-switchover", "initial-sync",
                   "checkpoint-only", "metrics-file", "tls", "insecure", "libvirt-domain",
                   "libvirt-uri", "control-tcp", "control-tls")
SECTIONS = ("primary", "secondary", "controller")
#: Keys whose values are paths, by section kind: each must be absolute (``up``, ``down`` and
#: ``status`` run from any folder, systemd's from ``/``).
NODE_PATHS = ("disk", "control", "nbd-socket", "state", "active", "hidden", "tls",
              "secondary-tls", "control-tls")
CONTROLLER_PATHS = ("control", "tls", "control-tls", "qmp", "qga", "vm-state", "metrics-file")


class ResourceError(RepdiskError):
    """A mistake in a resource file: ``path:line: key: message``."""

    def __init__(self, path: str, line: int, key: str, message: str) -> None:
        super().__init__(f"{path}:{line}: {key}: {message}")
        self.path, self.line, self.key = path, line, key


def this_host() -> str:
    """The name a resource file's ``host`` is compared with: the short host name."""
    return socket.gethostname().split(".")[0]


@dataclass
class Node:
    """One node of a resource: its role, host, plugin keys and NBD listener."""
    role: str
    host: str
    keys: list[tuple[str, str]]
    control: str
    nbd_socket: str | None = None
    nbd_address: tuple[str, int] | None = None
    tls: str | None = None
    threads: int | None = None

    @property
    def pidfile(self) -> str:
        return self.control + ".pid"

    @property
    def log(self) -> str:
        return self.control + ".log"

    @property
    def disk_paths(self) -> list[str]:
        """The paths of its ``disk`` keys (``[NAME:]PATH``), read as the node reads them."""
        return [cfgmod.parse_disk(v, 0).path for k, v in self.keys if k == "disk"]

    @property
    def control_address(self) -> str:
        """How the controller reaches this node: its control-tcp port if it has one, else
        its control socket (same host)."""
        return dict(self.keys).get("control-tcp") or self.control

    def replica_uri(self) -> str:
        if self.nbd_socket:
            return f"nbd+unix:///replica?socket={os.path.abspath(self.nbd_socket)}"
        assert self.nbd_address is not None
        host, port = self.nbd_address
        scheme = "nbds" if self.tls else "nbd"
        return f"{scheme}://{host}:{port}/replica"


@dataclass
class Controller:
    host: str
    control: str
    options: dict[str, str] = field(default_factory=dict)
    #: With no ``control`` key: the default socket it has with the sections the other way
    #: round, and that socket's host.  A controller there is this resource's, left running
    #: by a swap of the sections while the resource was up.
    swapped: tuple[str, str] | None = None

    @property
    def pidfile(self) -> str:
        return self.control + ".pid"

    @property
    def log(self) -> str:
        return self.control + ".log"


@dataclass
class Resource:
    name: str
    path: str
    nodes: dict[str, Node]          # by role
    controller: Controller

    def local_nodes(self, host: str) -> list[Node]:
        """This host's nodes, in start order (secondary first)."""
        return [self.nodes[r] for r in ROLES if self.nodes[r].host == host]


class _Lines:
    """Where a key is written in a TOML file (tomllib keeps no positions)."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self._where: dict[tuple[str, str], int] = {}
        self._tables: dict[str, int] = {}
        table = ""
        for n, line in enumerate(text.splitlines(), 1):
            m = re.match(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]", line)
            if m:
                table = m.group(1)
                self._tables.setdefault(table, n)
                continue
            m = re.match(r"\s*\"?([A-Za-z0-9_-]+)\"?\s*=", line)
            if m:
                self._where.setdefault((table, m.group(1)), n)

    def error(self, table: str, key: str, message: str) -> ResourceError:
        line = self._where.get((table, key)) or self._tables.get(table) or 1
        return ResourceError(self.path, line, f"{table}.{key}" if table and key else
                             (key or table), message)


def _text(lines: _Lines, table: str, key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value
    raise lines.error(table, key, f"expected a string, got {type(value).__name__} {value!r}")


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    """`` (did you mean KNOWN?)`` for a misspelt key, or nothing."""
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _section_taking(key: str, sections: Sequence[str]) -> str | None:
    """The first of ``sections`` that takes ``key`` (a section a misplaced key belongs in),
    or None."""
    for section in sections:
        if key in CONTROLLER_KEYS if section == "controller" else \
                any(k.name == key and section in k.roles for k in cfgmod.KEYS):
            return section
    return None


def _check_absolute(lines: _Lines, table: str, key: str, value: str) -> None:
    """Refuse a relative path: it would name another file from another folder."""
    path = value
    if key == "disk" and re.match(r"^[A-Za-z0-9_-]+:", value):
        path = value.split(":", 1)[1]                 # NAME:PATH
    elif key.endswith("tls") and value.startswith(("x509:", "psk:")):
        path = value.split(":", 2)[1]                 # x509:DIR, psk:FILE[:USER]
    elif key.endswith("tls") and value == "off":
        return
    if not path.startswith("/"):
        raise lines.error(table, key, f"{path!r} is a relative path: give it from / "
                                      "(repdisk up, down and status run from any folder)")


def resource_name(path: str) -> str:
    """The resource a file of the config folder describes: its name without ``.toml``."""
    return os.path.basename(path)[:-len(SUFFIX)]


def load_file(path: str, host: str | None = None) -> Resource:
    """Read and check one resource file (keys, values; the disks of this host's nodes)."""
    host = host or this_host()
    name = resource_name(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ResourceError(path, 0, "file", f"cannot read it: {err.strerror}") from err
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"line (\d+)", str(err))
        raise ResourceError(path, int(m.group(1)) if m else 1, "syntax",
                            f"not valid TOML: {err}") from None
    lines = _Lines(path, text)
    if not cfgmod.NAME_RE.match(name):
        raise lines.error("", "file", f"the file name {name!r} is not a resource name "
                                      "(letters, digits, '-', '_')")
    for key, value in doc.items():
        if key not in SECTIONS or not isinstance(value, dict):
            raise lines.error(key if isinstance(value, dict) else "", key,
                              f"unknown {'section' if isinstance(value, dict) else 'key'}"
                              f"{_did_you_mean(key, SECTIONS)}; a resource file has the "
                              f"sections {', '.join(SECTIONS)}")
    for section, table in doc.items():      # in the file's order: the first one is said
        paths = NODE_PATHS if section in (cfgmod.PRIMARY, cfgmod.SECONDARY) else \
            CONTROLLER_PATHS
        for key, value in table.items():
            for one in (value if key == "disk" and isinstance(value, list) else [value]):
                if key in paths:
                    _check_absolute(lines, section, key, _text(lines, section, key, one))
    for role in (cfgmod.PRIMARY, cfgmod.SECONDARY):
        if role not in doc:
            raise lines.error("", role, f"missing [{role}] section: a resource needs both "
                                        "nodes (its peer is missing)")
    secondary = _node(lines, cfgmod.SECONDARY, doc[cfgmod.SECONDARY], host, None)
    primary = _node(lines, cfgmod.PRIMARY, doc[cfgmod.PRIMARY], host, secondary)
    controller = _controller(lines, doc.get("controller", {}), primary, secondary)
    return Resource(name, path, {cfgmod.PRIMARY: primary, cfgmod.SECONDARY: secondary},
                    controller)


def _node(lines: _Lines, role: str, table: dict[str, Any], host: str,
          secondary: Node | None) -> Node:
    allowed = [k.name for k in cfgmod.KEYS if role in k.roles
               and k.name not in ("role", "secondary")]
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed and key not in LISTEN_KEYS:
            other = cfgmod.PRIMARY if role == cfgmod.SECONDARY else cfgmod.SECONDARY
            owner = _section_taking(key, (other, "controller"))
            if owner == other:
                raise lines.error(role, key, f"is a [{other}] key: move it to [{other}] (a "
                                             f"{other}'s keys move with its role when the "
                                             "sections are swapped)")
            if owner is not None:
                raise lines.error(role, key, f"is a [{owner}] key: move it to [{owner}]")
            known = [*LISTEN_KEYS, *allowed]
            raise lines.error(role, key, f"unknown key{_did_you_mean(key, known)}; a [{role}] "
                                         f"section takes {', '.join(known)}")
        values[key] = value
    for key in ("disk", "control"):
        if key not in values:
            raise lines.error(role, key, f"is required in [{role}]")
    if ("nbd-socket" in values) == ("nbd-address" in values):
        raise lines.error(role, "nbd-socket", "give exactly one of nbd-socket (a Unix socket) "
                                              "and nbd-address (HOST:PORT)")
    node_host = _text(lines, role, "host", values.pop("host", host))
    disks = values.pop("disk")
    disk_list = disks if isinstance(disks, list) else [disks]
    keys = [("role", role)]
    keys += [("disk", _text(lines, role, "disk", d)) for d in disk_list]
    listen = {k: values.pop(k) for k in LISTEN_KEYS if k in values}
    keys += [(k, _text(lines, role, k, v)) for k, v in values.items()]
    node = Node(role, node_host, keys, _text(lines, role, "control", values["control"]))
    if "nbd-socket" in listen:
        node.nbd_socket = _text(lines, role, "nbd-socket", listen["nbd-socket"])
    else:
        text = _text(lines, role, "nbd-address", listen["nbd-address"])
        try:
            node.nbd_address = parse_address("nbd-address", text)
        except ConfigError as err:
            raise lines.error(role, "nbd-address", str(err).split(": ", 1)[-1]) from None
    if "tls" in listen:
        node.tls = _text(lines, role, "tls", listen["tls"])
    if "threads" in listen:
        node.threads = int(_text(lines, role, "threads", listen["threads"]))
    if secondary is not None:
        node.keys.append(("secondary", secondary.replica_uri()))
    if node_host == host:
        _check_keys(lines, role, node)
    return node


def _check_keys(lines: _Lines, role: str, node: Node) -> None:
    """The node's own checks (as `repdisk ROLE` would make them), on this host only: the
    disks exist here."""
    try:
        cfgmod.NodeConfig.from_keys(node.keys)
    except ConfigError as err:
        key = err.key if err.key != "secondary" else "nbd-socket"
        raise lines.error(role, key, str(err).split(": ", 1)[-1]) from None


def _controller(lines: _Lines, table: dict[str, Any], primary: Node,
                secondary: Node) -> Controller:
    for key in table:
        if key not in CONTROLLER_KEYS:
            owner = _section_taking(key, (cfgmod.PRIMARY, cfgmod.SECONDARY))
            if owner is not None:
                raise lines.error("controller", key, f"is a [{owner}] key: move it to "
                                                     f"[{owner}]")
            raise lines.error("controller", key,
                              f"unknown key{_did_you_mean(key, CONTROLLER_KEYS)}; a "
                              f"[controller] section takes {', '.join(CONTROLLER_KEYS)}")
    options = {k: _text(lines, "controller", k, v) for k, v in table.items()
               if k not in ("host", "control")}
    control = _text(lines, "controller", "control",
                    table.get("control", _default_control(primary)))
    host = _text(lines, "controller", "host", table.get("host", primary.host))
    swapped = None if "control" in table else (_default_control(secondary),
                                               _text(lines, "controller", "host",
                                                     table.get("host", secondary.host)))
    try:
        cfg = controllercmd.check_options(primary.control_address, secondary.control_address,
                                          control, options)
    except ConfigError as err:
        raise lines.error("controller", err.key, str(err).split(": ", 1)[-1]) from None
    _check_timing(lines, primary, cfg.heartbeat_timeout)
    return Controller(host, control, options, swapped)


def _default_control(primary: Node) -> str:
    """A controller's socket when its section gives none: beside its primary's."""
    return primary.control.removesuffix(".qmp") + ".ctrl.qmp"


def _check_timing(lines: _Lines, primary: Node, limit: float) -> None:
    """The controller's timing rule (it refuses to run a primary that breaks it), before
    anything starts: the primary's timeout and isolation-timeout below heartbeat-timeout."""
    keys = dict(primary.keys)
    for key in ("timeout", "isolation-timeout"):
        try:
            value = parse_duration(key, keys.get(key, cfgmod.default(key)))
        except ConfigError as err:
            raise lines.error("primary", key, str(err).split(": ", 1)[-1]) from None
        if value >= limit:
            raise lines.error(
                "primary", key, f"{value:g}s must be below the controller's heartbeat-timeout "
                                f"({limit:g}s), or an isolated primary could still acknowledge "
                                f"writes after a failover: give [primary] {key} less, or "
                                f"[controller] heartbeat-timeout = \"{value + 1:g}s\"")


def load_dir(folder: str, host: str | None = None,
             broken: list[ResourceError] | None = None) -> dict[str, Resource]:
    """Every resource file of ``folder``, each checked, then all checked together.

    With a ``broken`` list (what only reads, ``repdisk status``), a file that fails its
    own checks is skipped and its error appended there, and the check of all together
    is not made; without one (``up``, ``down``) the first mistake is raised."""
    host = host or this_host()
    if not os.path.isdir(folder):
        raise RepdiskError(f"{folder} is not a directory: create it and put one NAME.toml "
                           "per resource there, or give --config-dir DIR")
    resources = {}
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(SUFFIX):
            try:
                res = load_file(os.path.join(folder, entry), host)
            except ResourceError as err:
                if broken is None:
                    raise
                broken.append(err)
                continue
            resources[res.name] = res
    if broken is None:
        _check_together(resources)
    return resources


def _check_together(resources: dict[str, Resource]) -> None:
    """No two nodes or controllers on one socket or port, no disk used twice on a host."""
    seen: dict[tuple[str, str], tuple[Resource, str, str]] = {}

    def claim(res: Resource, host: str, what: str, table: str, key: str) -> None:
        ident = (host, what)
        other = seen.get(ident)
        if other is not None:
            o_res, o_table, o_key = other
            raise _Lines(res.path, _read(res.path)).error(
                table, key, f"{what.replace(':', ' ', 1)} is also used by {o_res.path} "
                            f"([{o_table}] {o_key}); each resource needs its own")
        seen[ident] = (res, table, key)

    for res in resources.values():
        for role, node in res.nodes.items():
            claim(res, node.host, f"socket:{os.path.abspath(node.control)}", role, "control")
            if node.nbd_socket:
                claim(res, node.host, f"socket:{os.path.abspath(node.nbd_socket)}", role,
                      "nbd-socket")
            else:
                assert node.nbd_address is not None
                claim(res, node.host, f"port:{node.nbd_address[1]}", role, "nbd-address")
            for path in node.disk_paths:
                claim(res, node.host, f"disk:{os.path.realpath(path)}", role, "disk")
            for key, value in node.keys:
                if key == "control-tcp":
                    claim(res, node.host, f"port:{value.rsplit(':', 1)[-1]}", role, key)
        claim(res, res.controller.host,
              f"socket:{os.path.abspath(res.controller.control)}", "controller", "control")


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def select(resources: dict[str, Resource], names: list[str], folder: str) -> list[Resource]:
    """The resources named (``all`` or none: every one), in name order."""
    if not names or names == ["all"]:
        if not resources and os.path.isdir(folder) and not any(
                entry.endswith(SUFFIX) for entry in os.listdir(folder)):
            raise RepdiskError(f"no resources in {folder}: put one NAME.toml per resource "
                               "there (see the README), or give --config-dir DIR")
        return [resources[n] for n in sorted(resources)]
    missing = [n for n in names if n not in resources]
    if missing:
        raise RepdiskError(f"no resource named {', '.join(missing)} in {folder} (it has "
                           f"{', '.join(sorted(resources)) or 'none'})")
    return [resources[n] for n in names]
