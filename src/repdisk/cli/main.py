"""The ``repdisk`` command: start nodes, talk to control sockets, run a lab pair.

    repdisk secondary --disk SEC.img --control sec.qmp --nbd-socket sec.sock
    repdisk primary --disk PRI.img --control pri.qmp --nbd-socket pri.sock \\
        --secondary 'nbd+unix:///replica?socket=sec.sock'
    repdisk ctl SOCKET|HOST:PORT COMMAND [KEY=VALUE ...] [--json] [--tls DIR]
    repdisk status SOCKET|HOST:PORT ... [--json] [--tls DIR]
    repdisk up|down|status [NAME|all] [--config-dir /etc/repdisk]
    repdisk down CONTROL ...
    repdisk controller --primary PRI.qmp --secondary SEC.qmp --control CTRL.qmp
    repdisk lab [--dir DIR] [--size 1G] | repdisk lab --down
    repdisk tls psk FILE [--user NAME] | repdisk tls ca DIR --hosts HOST,HOST

The node options are made from the same key table as the plugin's keys
(repdisk.node.config.KEYS), so the two can never disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from repdisk import tls as tlsmod
from repdisk.cli import controllercmd, lab, nodeproc, updown
from repdisk.cli.nodeproc import PLUGIN
from repdisk.cli.status import entry_lines, human, protector, status_entry
from repdisk.errors import ConfigError, ControlError, RepdiskError
from repdisk.node import config as cfgmod
from repdisk.qmp.client import ALIASES, connect, execute, is_controller, resolve
from repdisk.tls import TLSSpec
from repdisk.uri import tcp_address, uri_unix_socket, with_absolute_socket

# -- node commands ----------------------------------------------------------------

def _add_node_parser(sub: Any, role: str) -> None:
    p = sub.add_parser(role, help=f"run a {role} node (nbdkit with the repdisk plugin)",
                       description=f"Run a {role} node. Keys (same as the plugin's):\n\n"
                                   + cfgmod.help_text(role),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for key in cfgmod.KEYS:
        if role in key.roles and key.name != "role" and key.flag:
            p.add_argument(f"--{key.name}", dest=key.name.replace("-", "_"),
                           action="store_const", const="yes", help=argparse.SUPPRESS)
        elif role in key.roles and key.name != "role":
            p.add_argument(f"--{key.name}", metavar=key.metavar, dest=key.name.replace("-", "_"),
                           action="append" if key.repeat else "store", required=key.required,
                           help=argparse.SUPPRESS)
    listen = p.add_mutually_exclusive_group(required=True)
    listen.add_argument("--nbd-socket", metavar="PATH", help="serve NBD on this Unix socket")
    listen.add_argument("--port", type=int, help="serve NBD on this TCP port")
    p.add_argument("--address", default="127.0.0.1", help="TCP address to bind (with --port)")
    p.add_argument("--tls", metavar="psk:FILE|x509:DIR|off",
                   help="require TLS from NBD clients (a TCP listener off loopback needs it, "
                        "or --insecure); x509 also requires a client certificate")
    p.add_argument("--background", action="store_true",
                   help="detach once serving; write --pidfile, log to --log")
    p.add_argument("--pidfile", help="pid file (with --background)")
    p.add_argument("--log", help="log file (default: stderr; with --background: next to the "
                                 "pidfile)")
    p.add_argument("--threads", type=int, default=None,
                   help="nbdkit worker threads per connection (default: by role and write "
                        "mode, see nodeproc.default_threads)")
    p.set_defaults(func=lambda a: _run_node(a, role))


def node_keys(args: argparse.Namespace, role: str) -> list[tuple[str, str]]:
    """The plugin keys for the options given on the command line, in table order."""
    keys = [("role", role)]
    for key in cfgmod.KEYS:
        value = getattr(args, key.name.replace("-", "_"), None)
        if key.name == "role" or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            keys.append((key.name, v))
    return keys


def _run_node(args: argparse.Namespace, role: str) -> int:
    keys = node_keys(args, role)
    _refuse_own_socket_as_secondary(args)
    listen = nodeproc.Listen(socket=args.nbd_socket, port=args.port, address=args.address,
                             tls=TLSSpec.parse("tls", args.tls) if args.tls else None,
                             insecure=args.insecure == "yes")
    cmd = nodeproc.nbdkit_command(PLUGIN, keys, listen, threads=args.threads)
    control = dict(keys)["control"]
    if not args.background:
        os.execvp(cmd[0], cmd)
    pidfile = args.pidfile or control + ".pid"
    pid = nodeproc.start_background(cmd, pidfile, args.log or pidfile[:-4] + ".log", control,
                                    listen)
    print(f"repdisk {role}: serving (pid {pid}), control {control}")
    _say_if_fenced(role, control)
    return 0


def _say_if_fenced(role: str, control: str) -> None:
    """A primary that came up fenced serves, but takes no write: say so at once (an old
    primary restarted after a failover), not only in repdisk status.  Not a secondary: the
    winner's secondary is where a fenced disk goes (the README's fail-back)."""
    if role != cfgmod.PRIMARY:
        return
    try:
        fenced = execute(control, "query-replication", timeout=10.0).get("fenced")
    except RepdiskError:
        return                  # it serves; status says what it can
    if fenced:
        print(f"repdisk {role}: FENCED, it takes no write: {fenced}", file=sys.stderr)


def _refuse_own_socket_as_secondary(args: argparse.Namespace) -> None:
    """A primary whose ``--secondary`` is its own ``--nbd-socket`` would start, and fail
    only at ``start`` with "no export named 'replica'": refuse it before anything starts."""
    secondary = getattr(args, "secondary", None)
    path = uri_unix_socket(secondary) if secondary else None
    if path and args.nbd_socket and os.path.abspath(path) == os.path.abspath(args.nbd_socket):
        raise ConfigError("secondary", f"{secondary} is this node's own --nbd-socket: give "
                                       "the secondary's, e.g. nbd+unix:///replica?socket="
                                       "/path/sec.sock")


# -- control commands ---------------------------------------------------------------

def parse_value(text: str) -> Any:
    """ctl arguments: true/false, integers, JSON values, else the string itself (so ``1G``
    or ``500ms`` goes as text, which the node reads with repdisk.units where the argument
    is a size or a duration: ``ArgSpec.unit``)."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _ctl(args: argparse.Namespace) -> int:
    if tcp_address(args.socket) is None and not os.path.exists(args.socket) and \
            os.path.exists(args.command):
        raise SystemExit(f"repdisk ctl: the control socket comes first: repdisk ctl "
                         f"{args.command} {args.socket} {' '.join(args.args)}".rstrip())
    command_args: dict[str, Any] = {}
    for item in args.args:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"repdisk ctl: argument {item!r} is not KEY=VALUE")
        if key in command_args:
            raise SystemExit(f"repdisk ctl: {key}= is given twice: give it once")
        command_args[key] = parse_value(value)
    _resolve_control_paths(args, command_args)
    if args.command == "failover":
        _refuse_failover_of_a_primary(args)
    try:
        result = execute(args.socket, args.command, command_args,
                         progress=sys.stderr.isatty(), tls=args.tls, insecure=args.insecure)
    except ControlError as err:
        if err.error_class == "GenericError" and \
                ALIASES.get(args.command, (args.command, {}))[0] == "replication-get-error":
            print(str(err))     # the error is the answer (QEMU's get_error), status 1
            return 1
        if err.error_class == "CommandNotFound":
            raise ControlError(f"{err}: {_known_commands(args)}", err.error_class) from None
        hint = _argument_hint(str(err), command_args) or _unexpected_hint(args, str(err))
        if hint:
            raise ControlError(f"{err}: {hint}", err.error_class) from None
        raise
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render(result))
    ignored = isinstance(result, dict) and set(result) == {"ignored"}
    return EXIT_IGNORED if ignored else 0


#: ctl arguments that name a control socket on this host, by command.
CONTROL_PATH_ARGUMENTS = {"controller-promote": ("secondary",)}
#: ctl arguments that are NBD URIs, whose Unix socket is one on this host, by command.
URI_ARGUMENTS = {"controller-promote": ("uri",), "controller-switchover": ("uri", "back-uri")}


def _resolve_control_paths(args: argparse.Namespace, command_args: dict[str, Any]) -> None:
    """A control socket (or an NBD URI's Unix socket) typed relative to the caller's folder
    names it from there, as every
    path on the command line does, not from the controller's own folder (which it would
    otherwise be resolved against, and recorded so in its pair file).  Only for a control
    socket on this host: a HOST:PORT controller's paths are its own host's."""
    for key in CONTROL_PATH_ARGUMENTS.get(args.command, ()):
        if "://" in str(command_args.get(key, "")):
            raise SystemExit(f"repdisk ctl: {key}={command_args[key]} is an NBD URI: {key}= is "
                             "the node's control socket (its --control), the URI goes in uri=")
    for key in URI_ARGUMENTS.get(args.command, ()):
        if key in command_args and "://" not in str(command_args[key]):
            raise SystemExit(f"repdisk ctl: {key}={command_args[key]} is not an NBD URI: give "
                             f"the node's replica export, {key}=nbd+unix:///replica?socket="
                             "NBD-SOCKET (its --nbd-socket) or nbd://HOST:PORT/replica")
    if tcp_address(args.socket) is not None:
        return
    for key in CONTROL_PATH_ARGUMENTS.get(args.command, ()):
        value = command_args.get(key)
        if isinstance(value, str) and value and tcp_address(value) is None:
            command_args[key] = os.path.abspath(value)
    for key in URI_ARGUMENTS.get(args.command, ()):
        value = command_args.get(key)
        if isinstance(value, str):
            command_args[key] = with_absolute_socket(value)


def _refuse_failover_of_a_primary(args: argparse.Namespace) -> None:
    """``ctl PRIMARY failover`` is a slip for the secondary's socket: on a primary it would
    end replication for good (QEMU's stop of a primary), so it is refused, changing nothing.
    ``replication-stop failover=true`` by its name still does what QEMU's does.  On a
    secondary whose pair a controller protects, the failover goes on (failure-matrix.md,
    "A failover made by hand while the controller runs") with a warning of what it does."""
    try:
        q = execute(args.socket, "query-replication", tls=args.tls, insecure=args.insecure,
                    timeout=10.0)
    except ControlError:  # not a node (a controller): the command itself says what is wrong
        return
    if q.get("role") == "primary":
        raise SystemExit(f"repdisk ctl: {args.socket} is a primary; failover is for its "
                         "secondary, once the primary is lost: repdisk ctl SECONDARY-SOCKET "
                         "failover")
    where = protector(q)
    if where is not None:
        print(f"repdisk ctl: warning: controller {where} protects this pair and fails over "
              "by itself once the primary is lost; a failover now fences the primary if it "
              "still runs, and what it wrote since the last checkpoint is rolled back",
              file=sys.stderr)


def _argument_hint(message: str, given: dict[str, Any]) -> str:
    """What to type for a refused argument, in ctl's KEY=VALUE words ("" if nothing to add):
    ``repair=yes`` expects true or false; a missing ``uri`` is added as ``uri=VALUE``, or
    is the misspelt key given (``ur=``)."""
    if message.endswith("expects boolean"):
        return "true or false"
    name = re.fullmatch(r"Parameter '([^']+)' is missing", message)
    if not name:
        return ""
    close = difflib.get_close_matches(name[1], list(given), n=1)
    if close:
        return f"did you mean {name[1]}= (not {close[0]}=)?"
    return f"add {name[1]}=VALUE to the command"


def _unexpected_hint(args: argparse.Namespace, message: str) -> str:
    """What to type for a key the command does not take ("" if nothing to add): the closest
    key it takes, and every key it takes (query-commands names them)."""
    key = re.fullmatch(r"Parameter '([^']+)' is unexpected", message)
    if not key:
        return ""
    try:
        with connect(args.socket, args.tls, args.insecure, timeout=10.0) as client:
            name, fixed = resolve(args.command, {}, is_controller(client))
            known = {c["name"]: c.get("arguments", []) for c in client.execute("query-commands")}
    except RepdiskError:
        return ""
    keys = [k for k in known.get(name, []) if k not in fixed]
    takes = (f"{args.command} takes " + ", ".join(f"{k}=" for k in keys)) if keys \
        else f"{args.command} takes no KEY=VALUE"
    close = difflib.get_close_matches(key[1], keys, n=1)
    return f"did you mean {close[0]}=? ({takes})" if close else takes


def _known_commands(args: argparse.Namespace) -> str:
    """What to type instead of a command the node or controller does not know: the closest
    of the commands it lists (and of ``repdisk ctl``'s aliases), else where the list is."""
    listing = f"repdisk ctl {args.socket} query-commands lists them"
    try:
        known = [c["name"] for c in execute(args.socket, "query-commands", tls=args.tls,
                                            insecure=args.insecure, timeout=10.0)]
    except RepdiskError:
        return listing
    aliases = [alias for alias, (name, _args) in ALIASES.items() if name in known]
    if f"controller-{args.command}" in known:   # a node's alias sent to a controller
        return f"did you mean controller-{args.command}? ({listing})"
    close = difflib.get_close_matches(args.command, known + aliases, n=1, cutoff=0.8)
    return f"did you mean {close[0]}? ({listing})" if close else listing


def render(value: Any, indent: str = "", key: str = "") -> str:
    """A readable table of a QMP result: keys aligned, lists of disks one block each, sizes
    in MiB, seconds and wall-clock times for people (repdisk.cli.status.human); ``--json``
    is exact."""
    if isinstance(value, dict):
        if not value:
            return indent + "ok"
        width = max(len(str(k)) for k in value)
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{indent}{k}:")
                lines.append(render(v, indent + "  ", str(k)))
            else:
                lines.append(f"{indent}{str(k).ljust(width)}  {human(str(k), v)}")
        return "\n".join(lines)
    if isinstance(value, list):  # a flat list inside (e.g. a range [offset, length]): one line
        return "\n".join(render(v, indent, key) if isinstance(v, dict) or _nested(v)
                         else indent + human(key, v) for v in value)
    return indent + human(key, value)


def _nested(v: Any) -> bool:
    return isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)


def _status(args: argparse.Namespace) -> int:
    """Each address in turn; one that does not answer is a line (or, with --json, an
    ``error``) and exit status 1.  Printing is outside the ``try``: a closed stdout is not
    an unreachable node.  Resource names (or none, or all): this host's resources."""
    if all(updown.is_resource_name(a) for a in args.sockets):
        return updown.status(args.sockets, args.config_dir, args.json)
    ok = True
    found: dict[str, dict[str, Any]] = {}
    for sock in args.sockets:
        found[sock] = entry = status_entry(sock, args.tls, args.insecure)
        ok = ok and entry["kind"] != "unreachable"
        if not args.json:
            print("\n".join(entry_lines(sock, entry)), flush=True)
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True))
    return 0 if ok else 1


def _lab(args: argparse.Namespace) -> int:
    if args.down:
        return lab.down(args.dir, expect_lab=True)
    return lab.up(args.dir, args.size, write_mode=args.write_mode)


def _tls(args: argparse.Namespace) -> int:
    if args.what == "psk":
        tlsmod.make_psk(args.path, args.user, force=args.force)
        print(f"repdisk tls: wrote {args.path} (mode 0600, user {args.user}); copy it to both "
              "nodes over a secure channel")
        return 0
    hosts = [h.strip() for h in (args.hosts or "").split(",") if h.strip()]
    files = tlsmod.make_ca(args.path, hosts, days=args.days, force=args.force)
    print(f"repdisk tls: wrote {', '.join(os.path.basename(f) for f in files)} in {args.path}; "
          "move ca-key.pem off the nodes once you have issued what you need")
    return 0


def _add_tls_parser(sub: Any) -> None:
    p = sub.add_parser("tls", help="create TLS credentials for a pair (PSK file or a small CA)",
                       description="repdisk tls psk FILE: a pre-shared key file (USER:HEXKEY, "
                                   "mode 0600) for nbdkit --tls-psk and libnbd.\n"
                                   "repdisk tls ca DIR --hosts A,B: a CA, a server certificate "
                                   "naming every host, and a client certificate, laid out as "
                                   "nbdkit and libnbd expect (also used for control over TCP).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("psk", "ca"))
    p.add_argument("path", metavar="FILE|DIR")
    p.add_argument("--user", default=tlsmod.PSK_USER, help="psk: the identity (default repdisk)")
    p.add_argument("--hosts", help="ca: names or addresses clients use to reach the nodes")
    p.add_argument("--days", type=int, default=3650, help="ca: validity (default 3650)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=_tls)


def _add_client_tls(p: argparse.ArgumentParser) -> None:
    """How ctl and status reach a HOST:PORT control port."""
    p.add_argument("--tls", metavar="DIR", help="for HOST:PORT: certificate directory (repdisk "
                                               "tls ca) with ca-cert.pem and a client certificate")
    p.add_argument("--insecure", action="store_true",
                   help="for HOST:PORT: plain TCP to a port served with insecure=yes")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (status 1) that names the help to
    read, as every other mistake is (main); its subcommands' parsers are of this class."""

    def error(self, message: str) -> NoReturn:
        typo = re.fullmatch(r"argument cmd: invalid choice: '([^']*)' \(choose from (.*)\)",
                            message)
        if typo:  # a mistyped subcommand: the closest one, if any is close
            known = re.findall(r"'([^']*)'", typo[2])
            close = difflib.get_close_matches(typo[1], known, n=1, cutoff=0.6)
            message = f"unknown command '{typo[1]}'" + (f": did you mean {close[0]}?"
                                                        if close else "")
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repdisk", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    parser.set_defaults(subcommands=sub.choices)   # their parsers, for usage mistakes
    _add_node_parser(sub, cfgmod.PRIMARY)
    _add_node_parser(sub, cfgmod.SECONDARY)

    p = sub.add_parser("ctl", help="send one command to a control socket or TCP port")
    p.add_argument("socket", metavar="SOCKET|HOST:PORT")
    p.add_argument("command", help="a QMP command (e.g. query-replication) or an alias: "
                                   + ", ".join(sorted(ALIASES)))
    p.add_argument("args", nargs="*", metavar="KEY=VALUE", default=[])  # optional: a default
    p.add_argument("--json", action="store_true",
                   help="print the result as exact JSON (default: a table in human units)")
    _add_client_tls(p)
    p.set_defaults(func=_ctl)

    p = sub.add_parser("status", help="one line per disk per node, one per controller; with "
                                      "resource names (or none): this host's resources")
    p.add_argument("sockets", nargs="*", metavar="SOCKET|HOST:PORT|NAME|all")
    p.add_argument("--json", action="store_true",
                   help="print {ADDRESS: {kind, query | error}} as JSON (kind: node, "
                        "controller or unreachable; query: what the socket answered)")
    _add_client_tls(p)
    updown.add_config_dir(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("lab", help="bring up (or --down) a working pair in a folder")
    p.add_argument("--dir", default="repdisk-lab", help="the lab folder (default ./repdisk-lab)")
    p.add_argument("--size", default="1G", help="disk size (default 1G)")
    p.add_argument("--write-mode", default="sync", choices=("sync", "async"))
    p.add_argument("--down", action="store_true", help="stop the lab's nodes")
    p.set_defaults(func=_lab)
    _add_tls_parser(sub)

    controllercmd.add_parsers(sub)
    updown.add_parsers(sub)
    return parser


#: Exit status after Ctrl-C, and after stdout was closed (as a C tool killed by SIGINT/SIGPIPE).
EXIT_INTERRUPTED, EXIT_STDOUT_CLOSED = 130, 141
#: ``ctl``: the node answered that it ignored the command (QEMU's rule once replication is
#: over), so nothing was done; the line printed says what to do instead.
EXIT_IGNORED = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand.  Whatever happens, the user sees at most one line from us:

    - a repdisk error: ``repdisk: error: ...`` (or the QMP error class), status 1;
    - a file or folder that cannot be used: ``repdisk: error: PATH: why``, status 1;
    - ``ctl error`` on a node with an error: the error on stdout, status 1;
    - ``ctl`` of a command the node ignored: ``ignored  why``, status 3;
    - stdout closed by its reader (``repdisk status ... | head -1``): nothing, status 141;
    - Ctrl-C, even while a node does not answer: ``repdisk: interrupted``, status 130
      (for ``ctl``, the line says that the command sent may still run).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # entry.py: SIG_DFL while loading
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)     # --help is output too
        if extra:  # the subcommand's own words, and its help to read
            args.subcommands[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except ControlError as err:
        print(f"repdisk: {err.error_class or 'error'}: {err}", file=sys.stderr)
        return 1
    except RepdiskError as err:
        print(f"repdisk: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_STDOUT_CLOSED
    except SystemExit:                           # argparse: --help, or a usage error
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _discard_stdout()
            return EXIT_STDOUT_CLOSED
        raise
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"repdisk: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args is not None and getattr(args, "cmd", None) == "ctl" \
                and not _is_query(args.command):
            _interrupted(f"; {args.command} may still run in {args.socket}: interrupting "
                         "this command does not call it back")
        _interrupted()
        return EXIT_INTERRUPTED   # not reached


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of it cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _is_query(command: str) -> bool:
    """A ``ctl`` command (or alias) that only reads: interrupting it leaves nothing
    running."""
    name = ALIASES.get(command, (command, {}))[0]
    return name.startswith("query-")


def _interrupted(more: str = "") -> None:
    """One line (``more`` appended: a command sent is not called back), then exit at
    once: a control client interrupted mid-call leaves asyncio tasks that would print
    screens of warnings while the interpreter shuts down."""
    sys.stderr.write(f"repdisk: interrupted{more}\n")
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
