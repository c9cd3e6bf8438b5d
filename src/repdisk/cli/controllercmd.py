"""``repdisk controller``: its options, and running the controller in the foreground or
detached (``--background``: started again with ``setsid``, ready once its socket answers).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from repdisk import detach, tls
from repdisk.controller import controller
from repdisk.controller.config import ControllerConfig
from repdisk.controller.guest import DEFAULT_URI as LIBVIRT_URI
from repdisk.controller.peer import LEASE_REFUSED, ControllerRefused
from repdisk.controller.syncplan import SYNC_MODES
from repdisk.errors import ConfigError, ControlError, RepdiskError
from repdisk.node.config import check_folder
from repdisk.qmp.client import NotAControlSocket, QMPClient
from repdisk.qmp.server import remove_stale_socket
from repdisk.units import parse_duration
from repdisk.uri import parse_address, tcp_address

log = logging.getLogger(__name__)


def add_parsers(sub: Any) -> None:
    """Add ``repdisk controller`` to the subcommands ``sub``."""
    # The module docstring's first paragraphs are a user's; the rest is for developers.
    user_part = "\n\n".join((controller.__doc__ or "").split("\n\n")[:2])
    p = sub.add_parser("controller", help="run the controller of a pair",
                       description=user_part + "\n\nWhat it does when a node, a link or "
                       "it fails: docs/failure-matrix.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--primary", required=True, metavar="PRI.qmp|HOST:PORT",
                   help="primary's control socket or control-tcp port")
    p.add_argument("--secondary", required=True, metavar="SEC.qmp|HOST:PORT",
                   help="secondary's control socket or control-tcp port")
    p.add_argument("--control", required=True, metavar="CTRL.qmp",
                   help="the controller's own control socket")
    p.add_argument("--tls", metavar="DIR", help="certificates (repdisk tls ca) for nodes given "
                                               "as HOST:PORT: a client certificate and the CA")
    p.add_argument("--control-tcp", metavar="HOST:PORT",
                   help="also serve the controller's control on TCP (needs --control-tls)")
    p.add_argument("--control-tls", metavar="x509:DIR",
                   help="certificates for --control-tcp; clients need one from the same CA")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain TCP to nodes and on --control-tcp")
    p.add_argument("--interval", default="5s", help="checkpoint interval (default 5s)")
    p.add_argument("--heartbeat", default="1s", help="heartbeat interval (default 1s)")
    p.add_argument("--heartbeat-timeout", default="6s",
                   help="silence that makes a node lost (default 6s; must exceed the "
                        "primary's isolation-timeout and timeout: checked at start-up)")
    p.add_argument("--qmp", metavar="GUEST.qmp", help="the primary guest's QMP socket: stop and "
                                                      "cont it around each checkpoint")
    p.add_argument("--libvirt-domain", metavar="NAME",
                   help="instead of --qmp: the guest is libvirt domain NAME, stopped, "
                        "continued (and saved, with --vm-state) through libvirt's QEMU "
                        "monitor passthrough")
    p.add_argument("--libvirt-uri", metavar="URI", default=LIBVIRT_URI,
                   help=f"libvirt connection of --libvirt-domain (default {LIBVIRT_URI})")
    p.add_argument("--freeze", action="store_true",
                   help="fsfreeze the guest's filesystems (guest agent) instead of stopping it")
    p.add_argument("--qga", metavar="QGA.sock", help="guest agent socket (default GUEST.qmp.qga)")
    p.add_argument("--vm-state", metavar="DIR", help="save the stopped guest's state at each "
                                                     "checkpoint as DIR/vmstate")
    p.add_argument("--on-failover", metavar="COMMAND", help="shell command run after a failover")
    p.add_argument("--on-switchover", metavar="COMMAND",
                   help="shell command run after a switchover (REPDISK_PRIMARY_CONTROL: the "
                        "new primary)")
    p.add_argument("--initial-sync", default="checksum", choices=SYNC_MODES)
    p.add_argument("--checkpoint-only", action="store_true",
                   help="never fail over (a cluster manager such as Pacemaker decides): start, "
                        "resync and checkpoint the pair only")
    p.add_argument("--metrics-file", metavar="PATH", help="write Prometheus metrics here")
    p.add_argument("--log", metavar="FILE", help="log here (default stderr)")
    p.add_argument("--background", action="store_true", help="detach once serving")
    p.add_argument("--pidfile", help="pid file (with --background)")


#: Options that take no value; a config file's [controller] section gives them as yes/no.
FLAGS = ("freeze", "checkpoint-only", "insecure")


def options_argv(options: Mapping[str, str]) -> list[str]:
    """The arguments of ``repdisk controller`` that say what ``options`` (a config file's
    [controller] keys, without ``--``; flags ``yes`` or ``no``) say."""
    argv: list[str] = []
    for key, value in options.items():
        if key in FLAGS:
            argv += [f"--{key}"] if value == "yes" else []
        else:
            argv += [f"--{key}", value]
    return argv


def check_options(primary: str, secondary: str, control: str,
                  options: Mapping[str, str]) -> ControllerConfig:
    """Make the checks ``repdisk controller`` makes of its options before it starts, on
    a config file's [controller] keys, so that ``repdisk up`` refuses a bad value before
    anything starts; the settings they make.  Raises ConfigError naming the key."""
    for key in FLAGS:
        if options.get(key, "no") not in ("yes", "no"):
            raise ConfigError(key, f"{options[key]!r} is not a yes/no value: use yes or no")
    parser = argparse.ArgumentParser(prog="repdisk controller", add_help=False,
                                     exit_on_error=False)
    _add_arguments(parser)
    argv = ["--primary", primary, "--secondary", secondary, "--control", control]
    try:
        args = parser.parse_args(argv + options_argv(options))
    except argparse.ArgumentError as err:
        raise ConfigError((err.argument_name or "controller").split("/")[0].removeprefix("--"),
                          err.message) from None
    cfg = _config(args)
    cfg.check()
    return cfg


def _config(args: argparse.Namespace) -> ControllerConfig:
    return ControllerConfig(
        primary=args.primary, secondary=args.secondary, control=args.control,
        interval=parse_duration("interval", args.interval),
        heartbeat=parse_duration("heartbeat", args.heartbeat),
        heartbeat_timeout=parse_duration("heartbeat-timeout", args.heartbeat_timeout),
        qmp=args.qmp, libvirt_domain=args.libvirt_domain, libvirt_uri=args.libvirt_uri,
        freeze=args.freeze, qga=args.qga, vm_state=args.vm_state,
        on_failover=args.on_failover, on_switchover=args.on_switchover,
        initial_sync=args.initial_sync,
        metrics_file=args.metrics_file, tls=args.tls, insecure=args.insecure,
        auto_failover=not args.checkpoint_only,
        control_tcp=parse_address("control-tcp", args.control_tcp) if args.control_tcp else None,
        control_tls=tls.control_tls_dir("control-tls", args.control_tls or "off", "server"))


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    cfg.check()
    _check_node_sockets(cfg)
    for flag, path in (("--control", args.control), ("--pidfile", args.pidfile),
                       ("--log", args.log)):
        if path:
            check_folder(flag, path)      # one line now, not a detached child's silence
    if args.background:
        return _detach(args)
    # Before adopting (which takes the nodes' leases): a controller already serving this
    # control socket is refused with nothing changed.
    remove_stale_socket(args.control)
    held = None
    if args.log:
        logging.basicConfig(filename=args.log, level=logging.INFO, format=LOG_FORMAT)
    else:
        held = _StartupLog()
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    # The QMP library logs every failed connection at ERROR: a node that is down would fill
    # the log every heartbeat; the controller says once that it is lost (and reminds).
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    ctl = controller.Controller(cfg, serve=False)
    signal.signal(signal.SIGTERM, lambda *_: ctl.stop())
    try:
        try:
            ctl.adopt()
        except ControllerRefused as err:
            if cfg.auto_failover or LEASE_REFUSED not in str(err):
                if held is not None:
                    held.drop()   # on stderr, main's one line says why
                else:
                    log.error("%s", err)
                raise
            # --checkpoint-only (Pacemaker decides the roles): the previous checkpointer's
            # lease lapses soon; wait for it instead of failing the resource.
            log.warning("%s; waiting for its lease to lapse", err)
        except RepdiskError as err:
            log.warning("start: %s; trying again every heartbeat", err)
        if held is not None:
            held.release()
        ctl.serve()
        ctl.run()
    finally:
        ctl.close()
        if args.pidfile:
            _remove_own_pidfile(args.pidfile)
    return 0


def _remove_own_pidfile(path: str) -> None:
    """Remove the pid file at ``path`` if it still names this process: a controller started
    since at the same path (after this one lost its socket) owns it now, and ``down`` finds
    that controller by it."""
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def _check_node_sockets(cfg: ControllerConfig) -> None:
    """Refuse, in one line, a --primary or --secondary that is a file or another server's
    socket (a node's NBD socket); a node that does not answer yet is the run loop's to
    wait for."""
    for role, path in (("primary", cfg.primary), ("secondary", cfg.secondary)):
        if tcp_address(path) or not os.path.exists(path):
            continue
        try:
            QMPClient(timeout=2.0).connect(path, timeout=2.0).close()
        except NotAControlSocket as err:
            raise ConfigError(role, str(err)) from err
        except ControlError:
            pass                          # not answering yet: the run loop waits for it


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StartupLog:
    """A foreground controller logging to stderr: what it logs until it has adopted the
    pair is held back, then shown (``release``), or dropped when it is refused (``drop``),
    so that a refusal is main's one line, not the log's lines before it."""

    def __init__(self) -> None:
        self.stream = logging.StreamHandler()
        self.stream.setFormatter(logging.Formatter(LOG_FORMAT))
        self.buffer = logging.handlers.MemoryHandler(
            100_000, flushLevel=logging.CRITICAL + 1, target=self.stream)
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.addHandler(self.buffer)

    def release(self) -> None:
        root = logging.getLogger()
        root.addHandler(self.stream)
        root.removeHandler(self.buffer)
        self.buffer.flush()

    def drop(self) -> None:
        self.buffer.acquire()
        try:
            self.buffer.buffer.clear()
            self.buffer.setTarget(None)    # nothing reaches stderr any more
        finally:
            self.buffer.release()


def _detach(args: argparse.Namespace) -> int:
    """Start this same command detached (:func:`repdisk.detach.launch`), logging to a file;
    wait for its socket."""
    pidfile = args.pidfile or args.control + ".pid"
    logfile = args.log or pidfile.rsplit(".", 1)[0] + ".log"
    argv = [a for a in sys.argv[1:] if a != "--background"]
    argv += ["--pidfile", pidfile] if not args.pidfile else []
    argv += ["--log", logfile] if not args.log else []
    if _answers(args.control):
        raise ControllerRefused(f"a controller already serves {args.control}: stop it first")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    log_size = os.path.getsize(logfile) if os.path.exists(logfile) else 0
    # The pid file is written before the controller runs, and by it again once it serves.
    detach.launch([sys.executable, "-m", "repdisk.cli.main", *argv], pidfile, os.devnull)
    try:
        detach.wait(detach.watch(pidfile), lambda: _answers(args.control), 20)
    except detach.StartFailed as err:
        if err.exited:
            raise ControllerRefused(_last_error(logfile, log_size) or
                                    f"the controller ended at start-up; see {logfile}") from None
        raise RepdiskError(f"the controller did not start within 20 s; see {logfile}") from None
    with open(pidfile) as f:
        print(f"repdisk controller: running (pid {f.read().strip()}), control "
              f"{args.control}, log {logfile}")
    return 0


def _answers(path: str) -> bool:
    """True if something listens on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def _last_error(logfile: str, since: int) -> str | None:
    """The last ERROR line the log gained after ``since`` bytes, without its prefix."""
    try:
        with open(logfile, encoding="utf-8", errors="replace") as f:
            f.seek(since)
            lines = [ln for ln in f.read().splitlines() if " ERROR " in ln]
    except OSError:
        return None
    return lines[-1].split(": ", 1)[-1] if lines else None

