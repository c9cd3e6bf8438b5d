"""The QMP server: listening sockets, one connection's threads, the command table, events.

A :class:`QMPServer` listens on a Unix socket (created so that nobody can reach it before
it has its mode), on plain TCP, or on TCP for TLS clients only (each handshake on the
connection's own thread, :mod:`repdisk.qmp.tlsrelay`); every connection is a
:class:`~repdisk.qmp.protocol.QMPProtocol` with a reader thread that runs its commands and
a writer thread that sends its replies and events.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import select
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from repdisk import __version__
from repdisk.errors import ControlError
from repdisk.qmp.protocol import CAPABILITIES, MAX_MESSAGE, ArgSpec, Command, QMPProtocol, encode
from repdisk.qmp.tlsrelay import TLSRelay
from repdisk.tls import server_context

log = logging.getLogger(__name__)

#: Most messages (replies + events) queued for one client before it is dropped as not reading.
MAX_QUEUED = 1000
#: Longest path a Unix socket can bind (sun_path is 108 bytes including the NUL).
MAX_UNIX_PATH = 107


# -- transport ----------------------------------------------------------------------------

class _Connection:
    """One client socket: a reader thread that runs its commands, a writer thread that sends.

    Replies and events share one bounded queue, so a command that blocks (a checkpoint) holds
    up only this client's next command, never event delivery to anyone.
    """

    _ids = itertools.count(1)

    def __init__(self, server: QMPServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.protocol = QMPProtocol(server)
        self.subscribed = False   # set after the qmp_capabilities reply is queued
        self.name = f"qmp-{next(self._ids)}"
        self._sock = sock
        self._peer = peer
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._dropped = False
        self._plain = type(sock) is socket.socket   # MSG_NOSIGNAL is not allowed on TLS

    def start(self) -> None:
        """Start the reader thread (greeting, then commands) and the writer thread; once."""
        log.debug("%s: client connected from %s", self.name, self._peer)
        for role, target in (("reader", self._read_loop), ("writer", self._write_loop)):
            threading.Thread(target=target, name=f"{self.name}-{role}", daemon=True).start()

    def post(self, data: bytes) -> None:
        """Queue a message without ever blocking; drop the client if it stopped reading."""
        if self._dropped:
            return
        if self._out.qsize() >= self.server.max_queued:
            self.drop(f"{self._out.qsize()} messages are waiting to be sent; the client is "
                      "not reading")
            return
        self._out.put_nowait(data)

    def drop(self, reason: str | None) -> None:
        """Disconnect the client; its threads notice and exit.  ``reason`` None: quietly."""
        if not self._dropped and reason:
            log.warning("%s: dropping client %s: %s", self.name, self._peer, reason)
        self._dropped = True
        self.subscribed = False
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(how)

    def _read_loop(self) -> None:
        try:
            self.post(self.protocol.greeting())
            while not self.protocol.closed:
                data = self._sock.recv(65536)
                if not data:
                    break
                self.protocol.client_gone = _hung_up(self._sock)
                for reply in self.protocol.replies(data):
                    self.post(reply)
                    if self.protocol.negotiated and not self.subscribed and not self._dropped:
                        self.subscribed = True
        except OSError as err:
            log.debug("%s: read failed: %s", self.name, err)
        finally:
            self.subscribed = False
            self.server._forget(self)
            self._out.put(None)
            log.debug("%s: client %s gone", self.name, self._peer)

    def _write_loop(self) -> None:
        flags = socket.MSG_NOSIGNAL if self._plain else 0
        alive = True
        while (batch := self._next_batch()) is not None:
            if not alive or self._dropped:
                continue        # the client is gone: replies of commands still running vanish
            try:
                self._sock.sendall(batch, flags)
            except OSError as err:
                log.debug("%s: write failed: %s", self.name, err)
                alive = False
                self._shutdown(socket.SHUT_RDWR)   # wakes the reader
        if alive and self.protocol.closed and not self._dropped:
            self._linger()
        self._sock.close()

    def _next_batch(self) -> bytes | None:
        """Everything queued, joined, so a burst of events costs one send; None at the end
        (messages queued before the end are still returned first)."""
        batch: list[bytes] = []
        item = self._out.get()
        while item is not None:
            batch.append(item)
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return b"".join(batch)
        if batch:
            self._out.put(None)   # send what came before the end, then end
            return b"".join(batch)
        return None

    def _linger(self) -> None:
        """Read and discard what the client is still sending, so our last error reaches it
        instead of being destroyed by the reset that closing with unread input causes."""
        self._shutdown(socket.SHUT_WR)
        self._sock.settimeout(2.0)
        try:
            while self._sock.recv(65536):
                pass
        except OSError:
            pass


class _Listener:
    """An accept loop on one listening socket, in its own daemon thread."""

    def __init__(self, server: QMPServer, sock: socket.socket,
                 unlink: tuple[str, int, int] | None = None,
                 adopt: Callable[[socket.socket, str], None] | None = None) -> None:
        self.server = server
        self.sock = sock
        self._unlink = unlink          # (path, st_dev, st_ino) of a socket file we created
        self._adopt = adopt or server._adopt   # takes each accepted socket (must not block)
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"qmp-accept-{sock.fileno()}")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, addr = self.sock.accept()
            except OSError as err:
                if self._closing:
                    return
                log.error("qmp: accept failed: %s; retrying", err)   # e.g. EMFILE
                time.sleep(0.1)
                continue
            conn.settimeout(None)
            self._adopt(conn, str(addr) if addr else "unix")

    def close(self) -> None:
        """Stop accepting, close the socket and remove the socket file if it is still ours;
        connections already accepted go on."""
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes accept() on Linux
        self._thread.join(5.0)
        self.sock.close()
        if self._unlink:
            path, dev, ino = self._unlink
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):   # never remove a successor's socket
                    os.unlink(path)
            except FileNotFoundError:
                pass


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer has closed its side already (a FIN behind the bytes read)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return bool(poller.poll(0))


def nobody_listens(path: str, timeout: float = 1.0) -> bool:
    """Whether nothing listens on the Unix socket ``path``: no file there (nor a folder
    for it), or one that refuses connections (left by a killed server).  Raises OSError
    when it cannot tell."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
            return True
    return False


def gone(path: str, timeout: float = 1.0) -> bool:
    """:func:`nobody_listens`, False when that cannot be told."""
    try:
        return nobody_listens(path, timeout)
    except OSError:
        return False


def remove_stale_socket(path: str, what: str = "control socket") -> None:
    """Remove a socket file nobody listens on (left by a killed server); refuse a live one
    and anything not a socket.  Also used for a node's NBD socket (repdisk.cli.nodeproc)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{what} {path}: the path exists and is not a socket; "
                           "remove it or choose another path")
    try:
        stale = nobody_listens(path)
    except OSError as err:
        raise ControlError(f"{what} {path}: cannot tell whether a server still "
                           f"answers there ({err}); remove it or choose another path") from err
    if not stale:
        raise ControlError(f"{what} {path}: a live server answers there; stop it or "
                           "choose another path")
    log.info("removing stale %s %s", what, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _bind_unix(path: str, mode: int,
               gid: int | None = None) -> tuple[socket.socket, os.stat_result]:
    """A listening socket at ``path`` that nobody could reach before it had ``mode`` (and
    group ``gid``, if given).

    It is bound in a private (0700) directory beside ``path``, chown-ed and chmod-ed, set
    listening, then
    hard-linked into place (link fails if the name was taken meanwhile, unlike rename).
    """
    parent = os.path.dirname(os.path.abspath(path))
    private = tempfile.mkdtemp(prefix=".q", dir=parent)
    tmp = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.chmod(tmp, mode)
        sock.listen(16)
        try:
            os.link(tmp, path)
        except FileExistsError as err:
            raise ControlError(f"control socket {path}: another process created it just now; "
                               "stop it or choose another path") from err
        return sock, os.lstat(path)
    except BaseException:
        sock.close()
        raise
    finally:
        for remove, target in ((os.unlink, tmp), (os.rmdir, private)):
            with contextlib.suppress(OSError):
                remove(target)


# -- server -------------------------------------------------------------------------------

class QMPServer:
    """The command table, event fan-out and listening sockets of one control endpoint."""

    def __init__(self, commands: Iterable[Command], *, name: str = "repdisk",
                 version: str = __version__, max_message: int = MAX_MESSAGE,
                 max_queued: int = MAX_QUEUED) -> None:
        self.name = name
        self.version = version
        self.max_message = max_message
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._commands: dict[str, Command] = {}
        self._clients: set[_Connection] = set()
        self._listeners: list[_Listener] = []
        self._closed = False
        for cmd in (*self._builtins(), *commands):
            self.add_command(cmd)

    # -- commands --

    def _builtins(self) -> list[Command]:
        return [
            Command(CAPABILITIES, _capabilities,
                    {"enable": ArgSpec(list, False, "capabilities to enable (none offered)")},
                    "leave capabilities negotiation mode; required before any other command"),
            Command("query-commands", lambda _: [
                        {"name": n, "arguments": sorted(a for a, spec in c.args.items()
                                                        if not spec.internal)}
                        for n, c in sorted(self._commands.items())],
                    help="list the commands this server accepts (and, beyond QEMU's "
                         "reply, the names of the arguments a user gives them)"),
            Command("query-version", lambda _: self.version_info(),
                    help="the server's version, in QEMU's format"),
        ]

    def add_command(self, cmd: Command) -> None:
        """Register a command; its name must be new.  Safe while clients are connected."""
        with self._lock:
            if cmd.name in self._commands:
                raise ValueError(f"qmp: command {cmd.name} is already registered")
            self._commands = {**self._commands, cmd.name: cmd}   # readers never see a half

    def command(self, name: str) -> Command | None:
        """The command registered as ``name``, or None; safe from any thread."""
        return self._commands.get(name)

    @property
    def commands(self) -> dict[str, Command]:
        """Every registered command by name (for help texts)."""
        return dict(self._commands)

    def version_info(self) -> dict[str, Any]:
        """QEMU's version object: qemu.qmp and qmp-shell read major/minor/micro and package."""
        parts = [int(p) if p.isdigit() else 0 for p in self.version.split(".")[:3]]
        major, minor, micro = parts + [0] * (3 - len(parts))
        return {"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": f"{self.name} {self.version}"}

    # -- events --

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client; never blocks, callable from any thread.

        An event whose data is not JSON is logged and dropped rather than raised, because the
        caller may be an I/O thread that must not fail on account of the control socket.
        """
        ns = time.time_ns()
        msg: dict[str, Any] = {"event": event, "timestamp": {
            "seconds": ns // 1_000_000_000, "microseconds": ns // 1000 % 1_000_000}}
        if data is not None:
            msg["data"] = data
        try:
            wire = encode(msg)
        except (TypeError, ValueError) as err:
            log.error("qmp: event %s dropped: its data is not JSON: %s", event, err)
            return
        with self._lock:
            subscribers = [c for c in self._clients if c.subscribed]
        for conn in subscribers:
            conn.post(wire)

    # -- transports --

    def serve_unix(self, path: str, mode: int = 0o600, gid: int | None = None) -> None:
        """Listen on a Unix socket at ``path`` with permissions ``mode`` (and group ``gid``);
        return once listening.

        A stale socket file is replaced; a path where a server still answers is refused
        (ControlError), as is a path that is not a socket.
        """
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ControlError(f"control socket {path}: the path is longer than the "
                               f"{MAX_UNIX_PATH} bytes a Unix socket allows; choose a shorter one")
        if self._closed:
            raise ControlError(f"qmp: the {self.name} control server is closed")
        remove_stale_socket(path)
        try:
            sock, st = _bind_unix(path, mode, gid)
        except OSError as err:
            # strerror, not err: the error names the private directory of _bind_unix
            raise ControlError(f"control socket {path}: cannot create it in "
                               f"{os.path.dirname(os.path.abspath(path))}: "
                               f"{err.strerror or err}") from err
        self._listen(sock, (path, st.st_dev, st.st_ino))
        log.info("qmp: %s control socket listening on %s", self.name, path)

    def serve_socket(self, sock: socket.socket) -> None:
        """Serve an already-listening plain socket; the server closes it."""
        self._listen(sock, None)

    def serve_tls(self, host: str, port: int, context: ssl.SSLContext) -> tuple[str, int]:
        """Listen on TCP ``host:port`` for TLS clients only; return the bound address.

        ``context`` should require client certificates (:func:`repdisk.tls.server_context`):
        a client that fails the handshake is logged and closed before it can send anything.
        The handshake runs on each connection's own thread, so a client that stalls in it
        holds up nobody else.
        """
        return self.serve_tcp(host, port, context)

    def serve_tcp(self, host: str, port: int,
                  context: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Listen on TCP: TLS clients only with ``context`` (see :meth:`serve_tls`), plain
        without (for an operator who said insecure); return the bound address."""
        try:
            sock = socket.create_server((host, port), backlog=16)
        except OSError as err:
            raise ControlError(f"control on {host}:{port}: cannot listen: {err}") from err
        bound_host, bound_port = sock.getsockname()[:2]
        bound = (str(bound_host), int(bound_port))
        if context is None:
            self._listen(sock, None)
            log.warning("qmp: %s control listening on %s:%d WITHOUT TLS (insecure): anyone "
                        "who reaches it may run any command", self.name, *bound)
            return bound

        def adopt(raw: socket.socket, peer: str) -> None:
            threading.Thread(target=self._adopt_tls, args=(raw, peer, context), daemon=True,
                             name=f"qmp-tls-{peer}").start()

        self._listen(sock, None, adopt)
        log.info("qmp: %s control listening for TLS clients on %s:%d", self.name, *bound)
        return bound

    def _adopt_tls(self, raw: socket.socket, peer: str, context: ssl.SSLContext) -> None:
        """A TLS client's own thread: handshake (or refuse and log), then relay its bytes."""
        accepted = TLSRelay.accept(raw, context, peer)
        if accepted is None:
            return
        relay, app_end = accepted
        self._adopt(app_end, peer)
        relay.run()

    def _listen(self, sock: socket.socket, unlink: tuple[str, int, int] | None,
                adopt: Callable[[socket.socket, str], None] | None = None) -> None:
        """Accept on ``sock`` in a thread of its own; refused (and ``sock`` closed) once the
        server is closed.  ``adopt`` takes each accepted socket (default: serve it)."""
        with self._lock:
            if self._closed:
                sock.close()
                raise ControlError(f"qmp: the {self.name} control server is closed")
            self._listeners.append(_Listener(self, sock, unlink, adopt))

    def _adopt(self, sock: socket.socket, peer: str) -> None:
        """Serve an accepted plain socket as a client; closed at once if the server is."""
        conn = _Connection(self, sock, peer)
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._clients.add(conn)
        conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._clients.discard(conn)

    def close(self) -> None:
        """Stop listening, remove socket files we created, disconnect every client.

        Commands still running finish in their threads; their replies are dropped.
        """
        with self._lock:
            self._closed = True
            listeners, self._listeners = self._listeners, []
            clients = list(self._clients)
        for listener in listeners:
            listener.close()
        for conn in clients:
            conn.drop(None)

    def __enter__(self) -> QMPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_control(server: QMPServer, address: tuple[str, int],
                  folder: str | None) -> tuple[str, int]:
    """Serve a node's or controller's control protocol on TCP ``address``: TLS with client
    certificates of ``folder``'s CA, or plain when ``folder`` is None (the configuration
    checked that the operator said insecure).  Returns the bound address."""
    return server.serve_tcp(*address, server_context(folder) if folder else None)


def _capabilities(args: dict[str, Any]) -> None:
    """qmp_capabilities: no capability is offered, so any requested one is refused."""
    for cap in args.get("enable", []):
        if not isinstance(cap, str):
            raise ControlError("Parameter 'enable' expects array of strings")
        raise ControlError(f"Capability '{cap}' not available")


