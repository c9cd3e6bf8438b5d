"""``repdisk up|down [NAME|all]`` and ``repdisk status`` of resources: this host's part of
each resource in the config directory (resources.py), like ``drbdadm up all``.

``up`` reads and checks *every* resource file first: any mistake is refused before a
single process starts, so a bad file never changes what is running.  Then, per resource,
it starts this host's nodes (secondary first; each detached, ``CONTROL.pid`` and
``CONTROL.log`` next to its control socket) and, where this host runs it, the controller,
which starts replication once both nodes answer (the other host's node may come later).
What already runs is left alone.  ``down`` stops the controller, then the node that is
the primary now, then the other; it leaves no process.  ``status`` prints each resource's
lines.  Given control sockets instead of names, ``down`` stops what serves each, as
``status`` shows each.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from repdisk.block.imagelock import lock_image
from repdisk.cli import controllercmd, nodeproc, resources
from repdisk.cli.nodeproc import PLUGIN
from repdisk.cli.resources import Node, Resource
from repdisk.cli.status import entry_lines, protector, status_entry
from repdisk.controller import pairfile
from repdisk.errors import BlockIOError, RepdiskError
from repdisk.node.config import NAME_RE, NodeConfig, parse_disk
from repdisk.node.state import NodeState
from repdisk.qmp.server import gone
from repdisk.tls import TLSSpec
from repdisk.uri import tcp_address


def add_parsers(sub: Any) -> None:
    """The ``up`` and ``down`` subcommands (``status`` lives in cli.py and calls status())."""
    for name, func, what in (("up", _up, "start"), ("down", _down, "stop")):
        p = sub.add_parser(name, help=f"{what} this host's nodes and controllers of resources "
                                      "from their config files",
                           description=f"{what.capitalize()} this host's part of each named "
                                       "resource (all: every file in the config directory).")
        p.add_argument("names", nargs="*", metavar="NAME|all" + ("|CONTROL" if name == "down"
                                                                  else ""),
                       help="resources (default all)" + (
                           "; or the control sockets of nodes and controllers started by "
                           "hand, stopped in the order given, each waited for"
                           if name == "down" else ""))
        add_config_dir(p)
        p.set_defaults(func=func, verb=name)


def add_config_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", default=resources.DEFAULT_DIR, metavar="DIR",
                   help=f"one NAME.toml per resource (default {resources.DEFAULT_DIR})")


def _check_names(args: argparse.Namespace) -> None:
    """Refuse, saying what to give instead, a resource file's path and ``all`` among names."""
    for arg in args.names:
        if arg.endswith(resources.SUFFIX) and os.path.isfile(arg):
            folder = os.path.dirname(os.path.abspath(arg))
            raise RepdiskError(f"{arg} is a resource file: give its name and its folder, "
                               f"repdisk {args.verb} {resources.resource_name(arg)} "
                               f"--config-dir {folder}")
    if "all" in args.names and len(args.names) > 1:
        raise RepdiskError("all names every resource: give it alone, or only names")


def _load(args: argparse.Namespace) -> list[Resource]:
    found = resources.load_dir(args.config_dir)
    return resources.select(found, args.names, args.config_dir)


def _up(args: argparse.Namespace) -> int:
    _check_names(args)
    for res in _load(args):          # every file is checked before anything starts
        with one_at_a_time(res):
            started = up(res)
        print(f"{res.name}: {', '.join(started) if started else 'already up'}")
    return 0


@contextlib.contextmanager
def one_at_a_time(res: Resource) -> Iterator[None]:
    """Hold ``res``'s file locked (``flock``, until the file closes or the process ends)
    while this process starts or stops its parts: a second ``up`` or ``down`` of the
    resource waits, then sees what the first one did (else both start the same node, and
    the one whose start fails stops the node of the other)."""
    with open(res.path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _down(args: argparse.Namespace) -> int:
    _check_names(args)
    if args.names and not all(is_resource_name(a) for a in args.names):
        # Control sockets: every one checked before any is stopped, then in the order given.
        for control, found in [(c, nodeproc.serving(c)) for c in args.names]:
            entry = status_entry(control) if found and found.what == "node" else None
            warning = stop_warning(entry["query"]) if entry and entry["kind"] == "node" else None
            if warning:
                print(f"{control}: warning: {warning}", file=sys.stderr)
            print(f"{control}: {found.stop()}" if found else
                  f"{control}: nothing serves it (stopped already, or not its path)")
        return 0
    if not os.path.isdir(args.config_dir):
        what = (f"nothing named {', '.join(args.names)} (no such control socket here)"
                if args.names and args.names != ["all"] else "no resources to stop")
        raise RepdiskError(f"{what}: {args.config_dir} is not a directory; give "
                           "the control sockets of nodes or controllers started by hand "
                           "(repdisk down CONTROL...), or --config-dir DIR")
    for res in _load(args):
        with one_at_a_time(res):
            stopped = down(res)
        print(f"{res.name}: stopped {', '.join(stopped) if stopped else 'nothing (not running)'}")
    return 0


def stop_warning(q: dict[str, Any]) -> str | None:
    """What stopping the node whose ``query-replication`` is ``q`` makes its controller do,
    if a controller protects its replicating pair (its lease is fresh, the node is not
    fenced and a disk runs); else None."""
    where = protector(q)
    if where is None:
        return None
    role = q.get("role")
    then = ("a failover to the last checkpoint" if role == "primary" else
            "the pair runs unprotected until this node is back")
    return (f"controller {where} protects this node's pair and takes its stop as the {role}'s "
            f"loss ({then}); to stop the pair instead, stop the controller first "
            f"(repdisk down {where})")


def up(res: Resource, host: str | None = None) -> list[str]:
    """Start what of ``res`` runs on this host and is not running; what was started.  A
    failure stops what this call started and raises."""
    host = host or resources.this_host()
    stray = stray_controller(res, host)
    if stray is not None:
        raise RepdiskError(f"{res.name}: its controller still runs at {stray.control}, its "
                           f"socket before {res.path}'s sections were swapped: take the "
                           f"resource down first (repdisk down {res.name} stops it too), "
                           "and give [controller] a control key so that it keeps one socket")
    running = {node.role: _node_runs(res, node) for node in res.local_nodes(host)}
    for node in res.local_nodes(host):
        if not running[node.role]:      # a running node is not started again: not judged
            _check_free(res, node)      # before anything starts
            _check_role(res, node)
    started: list[str] = []
    try:
        for node in res.local_nodes(host):
            if not running[node.role]:
                _start_node(node)
                started.append(node.role)
        if res.controller.host == host and not _running(res.controller.pidfile):
            _start_controller(res)
            started.append("controller")
    except BaseException:
        _stop(res, host, started)
        raise
    return started


def _check_free(res: Resource, node: Node) -> None:
    """Refuse to start a node on a disk that another process serves (another resource's
    node, a QEMU), naming it, before its state file is judged: that state is the other
    node's.  The locks are QEMU's (imagelock), taken and dropped at once."""
    for path in node.disk_paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue                    # the node's own start says what is wrong
        try:
            lock_image(fd, path)
        except BlockIOError as err:
            raise RepdiskError(f"{res.name}: [{node.role}] disk {err.strerror}") from None
        finally:
            os.close(fd)


def _check_role(res: Resource, node: Node) -> None:
    """Refuse to start as the primary a node whose state says the file's sections no
    longer make it one, after a failover, promotion or switchover: one last a secondary
    that did not win a failover (and was not that epoch's primary), or one fenced (it lost
    a failover).  Every other start is the node's and the controller's to judge (a
    failover's winner may take its disk as it is; an old primary may come back as the
    winner's secondary)."""
    try:
        state = NodeState.load(NodeConfig.from_keys(node.keys).state)
    except RepdiskError:
        return                          # the node's own start says what is wrong
    if node.role == "primary" and state.fenced:
        why = f"was fenced: {state.fenced}"
    elif node.role == "primary" and state.role == "secondary" and not state.failed_over \
            and state.primary_of != state.epoch:
        why = f"was last a secondary (epoch {state.epoch})"
    else:
        return
    running = any(_running(n.pidfile) for n in res.nodes.values()) \
        or _running(res.controller.pidfile)
    raise RepdiskError(
        f"{res.name}: the node of [primary] {why}, so the roles changed since {res.path} "
        "was written: "
        + ("take the resource down, " if running else "")
        + "swap its [primary] and [secondary] sections so that each names the role its "
        "node has now, then run up again")


def down(res: Resource, host: str | None = None) -> list[str]:
    """Stop what of ``res`` runs on this host: the controller, then each node, the one that
    is the primary now first (the roles may have changed since the file was written), a
    node that joined the pair by a promotion too; what was."""
    host = host or resources.this_host()
    for node in res.local_nodes(host):   # another resource's node is refused, before a stop
        _node_runs(res, node)
    joined = joined_nodes(res, host)     # the controller's pair file outlives the controller
    stopped = _stop(res, host, ["controller"])
    stray = stray_controller(res, host)
    if stray is not None:
        stray.stop()
        stopped.append(f"the controller at {stray.control} (the sections were swapped "
                       "while it ran)")
    nodes: list[tuple[str, str, Callable[[], bool]]] = [
        (node.role, node.control, functools.partial(_stop_node, node))
        for node in reversed(res.local_nodes(host))]
    nodes += [(f"{control} (its {role} since a promotion)", control,
               functools.partial(_stop_joined, res, control)) for role, control in joined]
    nodes.sort(key=lambda item: _role_now(item[1]) != "primary")   # stable: file order next
    return stopped + [what for what, _, stop in nodes if stop()]


def stray_controller(res: Resource, host: str) -> nodeproc.Serving | None:
    """A controller of ``res`` at the socket it had before its file's sections were swapped
    (the file gives no ``control``), still running on this host: ``down`` stops it, ``up``
    refuses to start a second one beside it."""
    if res.controller.swapped is None:
        return None
    control, where = res.controller.swapped
    if where != host or control == res.controller.control:
        return None
    try:
        found = nodeproc.serving(control)
    except RepdiskError:
        return None                      # not a repdisk controller: not this resource's
    return found if found is not None and found.what == "controller" else None


def _role_now(control: str) -> str | None:
    """The role the node at ``control`` says it has (None: it does not answer)."""
    if gone(control):
        return None
    entry = status_entry(control)
    return entry["query"].get("role") if entry["kind"] == "node" else None


def _stop_node(node: Node) -> bool:
    """Stop a node of the file by its pid file; remove its sockets; whether it ran."""
    ran = nodeproc.stop_pidfile(node.pidfile)
    for path in (node.control, node.nbd_socket):
        if path:
            _unlink_if_gone(path)
    return ran


def _stop_joined(res: Resource, control: str) -> bool:
    """Stop what serves ``control`` (a node the file does not name); whether one did."""
    try:
        found = nodeproc.serving(control)
    except RepdiskError as err:          # not a repdisk node any more: left alone, said
        print(f"{res.name}: {err}", file=sys.stderr)
        return False
    if found is None:
        return False
    nbd_socket = _unix_listener(found.pid)
    found.stop()
    if nbd_socket is not None:              # as _stop_node removes a file node's
        _unlink_if_gone(nbd_socket)
    return True


def _unix_listener(pid: int) -> str | None:
    """The Unix socket nbdkit's ``-U`` gave the node ``pid`` (from its cwd), if any."""
    try:
        proc = psutil.Process(pid)
        cmdline, cwd = proc.cmdline(), proc.cwd()
    except psutil.Error:
        return None
    at = cmdline.index("-U") if "-U" in cmdline else -1
    return os.path.join(cwd, cmdline[at + 1]) if 0 <= at < len(cmdline) - 1 else None


def joined_nodes(res: Resource, host: str) -> list[tuple[str, str]]:
    """The nodes that a promotion made part of the pair and that the resource file does not
    name, on this host: (role now, control socket), from the pair file of the resource's
    controller (when it runs here), while the file's sections name the pair's first nodes,
    in their order or swapped.  With no ``control`` key in [controller], a swap moves the
    controller's socket: a controller still running at the old one (``stray_controller``)
    has the pair file that is true now; else the file at the socket the sections give."""
    first = (res.nodes["primary"].control_address, res.nodes["secondary"].control_address)
    stray = stray_controller(res, host)
    sockets = [stray.control] if stray is not None else []
    sockets += [control for control, where in ((res.controller.control, res.controller.host),
                                               res.controller.swapped or ("", ""))
                if where == host]
    files = [control + ".pair" for control in sockets if os.path.exists(control + ".pair")]
    now = pairfile.recall(files[0], first, any_order=True) if files else None
    if now is None:
        return []
    named = {n.control_address for n in res.nodes.values()}
    return [(role, control) for role, control in zip(("primary", "secondary"), now, strict=True)
            if control not in named and tcp_address(control) is None]


def _stop(res: Resource, host: str, which: list[str]) -> list[str]:
    stopped = []
    if "controller" in which and res.controller.host == host:
        if _stop_controller(res.controller.pidfile) or _stop_served(res.controller.control):
            stopped.append("controller")
        _unlink_if_gone(res.controller.control)
    return stopped + [node.role for node in reversed(res.local_nodes(host))
                      if node.role in which and _stop_node(node)]


def _stop_served(control: str) -> bool:
    """Stop a controller that serves ``control`` though its pid file does not name it (the
    file was lost); whether one did.  Without this its socket would be removed under it,
    and the next ``up`` would start a second controller on the pair."""
    try:
        found = nodeproc.serving(control)
    except RepdiskError:
        return False
    if found is None or found.what != "controller":
        return False
    found.stop()
    return True


def _unlink_if_gone(path: str) -> None:
    """Remove the socket file at ``path`` if nothing listens on it any more."""
    if gone(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _listen(node: Node) -> nodeproc.Listen:
    tls = TLSSpec.parse("tls", node.tls) if node.tls else None
    if node.nbd_socket:
        return nodeproc.Listen(socket=node.nbd_socket, tls=tls)
    assert node.nbd_address is not None
    insecure = dict(node.keys).get("insecure", "no") in ("yes", "true", "on", "1")
    return nodeproc.Listen(port=node.nbd_address[1], address=node.nbd_address[0], tls=tls,
                           insecure=insecure)


def _start_node(node: Node) -> None:
    listen = _listen(node)
    listen.check()
    for path in (node.control, node.nbd_socket):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cmd = nodeproc.nbdkit_command(PLUGIN, node.keys, listen, threads=node.threads)
    nodeproc.start_background(cmd, node.pidfile, node.log, node.control, listen)


def _start_controller(res: Resource) -> None:
    c = res.controller
    argv = [sys.executable, "-m", "repdisk.cli.main", "controller",
            "--primary", res.nodes["primary"].control_address,
            "--secondary", res.nodes["secondary"].control_address,
            "--control", c.control, "--background", "--pidfile", c.pidfile, "--log", c.log,
            *controllercmd.options_argv(c.options)]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().removeprefix("repdisk: error: ")
        raise RepdiskError(f"{res.name}: the controller did not start: {said}")


def _pid_in(pidfile: str) -> int | None:
    """The pid a pid file names, or None if there is none to read."""
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _running(pidfile: str) -> bool:
    pid = _pid_in(pidfile)
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _node_runs(res: Resource, node: Node) -> bool:
    """Whether the node of ``node``'s pid file runs.  A pid file naming a process that is
    no repdisk node (a pid reused since) is no node; one naming a repdisk node or
    controller of other disks, whose socket the file's ``control`` names too (a copied
    file), is refused: nothing of this resource may start or stop it."""
    pid = _pid_in(node.pidfile)
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline, cwd = proc.cmdline(), proc.cwd()
    except psutil.Error:
        return False
    kind = nodeproc.process_kind(cmdline)
    if kind == "controller":
        raise RepdiskError(f"{res.name}: [{node.role}] control {node.control} is the socket "
                           f"of a controller (pid {pid}), not of a node: give [{node.role}] "
                           "a control socket of its own; nothing was started or stopped")
    if kind != "node":
        return False
    mine = {os.path.realpath(path) for path in node.disk_paths}
    theirs = {os.path.realpath(os.path.join(cwd, parse_disk(arg[5:], 0).path))
              for arg in cmdline if arg.startswith("disk=")}
    if theirs != mine:
        raise RepdiskError(f"{res.name}: [{node.role}] control {node.control} is served by "
                           f"pid {pid}, a node of {', '.join(sorted(theirs))}, not of "
                           f"{', '.join(sorted(mine))}: another resource's node? Give "
                           f"[{node.role}] a control socket of its own; nothing was started "
                           "or stopped")
    return True


def _stop_controller(pidfile: str) -> bool:
    """SIGTERM the controller named by the pid file (if it is one); True if it ran."""
    pid = _pid_in(pidfile)
    if pid is None:
        return False
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        cmdline = []
    stopped = nodeproc.process_kind(cmdline) == "controller" and nodeproc.stop_pid(pid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    return stopped


def is_resource_name(arg: str) -> bool:
    """A resource name (or ``all``), not a socket path or HOST:PORT."""
    return bool(NAME_RE.match(arg)) and not os.path.exists(arg)


def status(names: list[str], config_dir: str, as_json: bool = False) -> int:
    """One block per resource: its name and the lines of what this host runs of it; a
    file with a mistake is one line (the others are still shown), status 1.  ``as_json``:
    one object instead, by resource: ``path``, and by part (``controller``, a role, a node
    that joined by a promotion) what ``repdisk status --json`` says of a socket, or
    ``{"kind": "down"}``."""
    broken: list[resources.ResourceError] = []
    found = resources.load_dir(config_dir, broken=broken)
    host = resources.this_host()
    named = set(names) - {"all"}
    shown = [err for err in broken if not named or resources.resource_name(err.path) in named]
    for err in shown:
        print(f"repdisk: error: {err}", file=sys.stderr)
    ok = not shown
    wanted = [n for n in names if n not in {resources.resource_name(err.path) for err in broken}]
    if names and not wanted and named:
        return 1                        # every resource named has a mistake, said above
    report: dict[str, Any] = {}
    for res in resources.select(found, wanted, config_dir):
        parts = report[res.name] = {"path": res.path}
        if not as_json:
            print(f"{res.name} ({res.path})")
        nodes = {node.role: node for node in res.local_nodes(host)}
        for key, label, sock in _parts(res, host):
            if key in nodes and (foreign := _foreign(res, nodes[key])):
                parts[key] = {"kind": "foreign", "socket": sock, "error": foreign}
                ok = False
                if not as_json:
                    print(f"  {label}: {foreign}")
                continue
            part = parts[key] = ({"kind": "down"} if gone(sock) else status_entry(sock))
            part["socket"] = sock
            ok = ok and part["kind"] not in ("down", "unreachable")
            if not as_json:
                lines = [f"{label}: down"] if part["kind"] == "down" else \
                    entry_lines(label, part)
                if key not in ("controller", *resources.ROLES) and part["kind"] != "down":
                    lines.insert(0, f"{label}:")   # what the file does not name
                elif key in resources.ROLES and part["kind"] == "node" and \
                        part["query"].get("role") != key:      # the roles changed since
                    lines.insert(0, f"[{key}] {sock}, a {part['query'].get('role')} now:")
                print("\n".join(f"  {line}" for line in lines))
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if ok else 1


def _foreign(res: Resource, node: Node) -> str | None:
    """Why the process at ``node``'s pid file is not this resource's node (_node_runs), or
    None if it is, or none runs."""
    try:
        _node_runs(res, node)
    except RepdiskError as err:
        return str(err).removeprefix(f"{res.name}: ")
    return None


def _parts(res: Resource, host: str) -> list[tuple[str, str, str]]:
    """What of ``res`` runs on this host, as ``status`` shows it: (key in its JSON, label
    for people, control socket).  Beside the file's controller and nodes: a node that
    joined the pair by a promotion (``joined-ROLE``), a controller left at its socket from
    before the sections were swapped (``swapped-controller``)."""
    parts = [("controller", "controller", res.controller.control)] \
        if res.controller.host == host else []
    parts += [(n.role, n.role, n.control) for n in res.local_nodes(host)]
    parts += [(f"joined-{role}", f"{role} since a promotion ({control})", control)
              for role, control in joined_nodes(res, host)]
    stray = stray_controller(res, host)
    if stray is not None:
        parts.append(("swapped-controller", f"controller at {stray.control}, from before the "
                      f"sections were swapped (repdisk down {res.name} stops it)",
                      stray.control))
    return parts
