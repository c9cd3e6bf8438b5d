"""A server for QEMU's QMP wire protocol, so QEMU's own tools drive repdisk's control sockets.

``qemu.qmp.QMPClient``, its legacy ``QEMUMonitorProtocol`` and ``qmp-shell`` work unchanged
against a :class:`QMPServer`, because it speaks exactly what they check: a greeting with
``version.qemu.{major,minor,micro}`` and ``package``; ``qmp_capabilities`` answered with
``return`` before anything else is allowed; replies that echo the request's ``id`` (and carry
none when the request could not be parsed, which ends the client's session, as with QEMU);
events as ``{"event", "data", "timestamp"}`` messages.

Layers, so another transport (TCP, TLS) reuses everything but the socket:

    Command, ArgSpec     what a command is called, what it accepts, what runs it
    QMPProtocol          one connection's state; bytes in -> reply bytes out; no I/O
    _Connection          one socket: a reader thread runs commands (handlers may block),
                         a writer thread sends replies and events from a bounded queue
    QMPServer            the command table, event fan-out, listening sockets
    QMPClient            a blocking client (qemu.qmp's async client on a private loop)

Threads: the server runs only in daemon threads it starts, so it works inside nbdkit's
Python plugin where the main thread belongs to nbdkit.  :meth:`QMPServer.emit` never blocks:
it queues the event for each negotiated client and drops a client whose queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import re
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp import QMPClient as _AsyncQMPClient

from repdisk import __version__
from repdisk.errors import ConfigError, ControlError
from repdisk.units import parse_duration, parse_size
from repdisk.uri import Address, tcp_address

log = logging.getLogger(__name__)

#: Longest JSON text a client may send; longer input is answered with an error and dropped.
MAX_MESSAGE = 1 << 20
#: Most messages (replies + events) queued for one client before it is dropped as not reading.
MAX_QUEUED = 1000
#: Longest path a Unix socket can bind (sun_path is 108 bytes including the NUL).
MAX_UNIX_PATH = 107

NEGOTIATION_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"


# -- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ArgSpec:
    """One argument of a command: its JSON type(s), whether it must be given, a help line.

    ``bool`` accepts only true/false and ``int`` only integers that are not booleans (Python's
    bool is an int; QMP's are different types); ``float`` accepts any JSON number.

    ``unit`` ``"size"`` (an ``int`` of bytes) or ``"duration"`` (a ``float`` of seconds) also
    accepts a string with a unit, read by repdisk.units' one parser: ``"1G"``, ``"500ms"``
    (so ``repdisk ctl SOCK query-digests length=1G`` works as the plugin's keys do).
    """

    type: type | tuple[type, ...]
    required: bool = True
    help: str = ""
    unit: str | None = None


@dataclass(frozen=True)
class Command:
    """A QMP command: ``handler`` gets the validated arguments and returns a JSON-able result.

    A result of ``None`` is sent as ``{}``.  The handler raises ``ControlError`` to report a
    failure with a QMP error class; any other exception becomes a ``GenericError``.
    """

    name: str
    handler: Callable[[dict[str, Any]], Any]
    args: Mapping[str, ArgSpec] = field(default_factory=dict)
    help: str = ""


_TYPE_NAMES: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string",
                                list: "array", dict: "object", type(None): "null"}


def _is_type(value: Any, expected: type) -> bool:
    """isinstance with JSON's types: booleans are not integers, integers are numbers."""
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def check_arguments(cmd: Command, arguments: dict[str, Any]) -> dict[str, Any]:
    """Refuse missing, mistyped and unexpected arguments, in QEMU's order and words; return
    the arguments with sizes and durations given as text converted (``ArgSpec.unit``)."""
    arguments = dict(arguments)
    for name, spec in cmd.args.items():
        if name not in arguments:
            if spec.required:
                raise ControlError(f"Parameter '{name}' is missing")
            continue
        if spec.unit is not None and isinstance(arguments[name], str):
            arguments[name] = _with_unit(name, spec.unit, arguments[name])
        types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
        if not any(_is_type(arguments[name], t) for t in types):
            raise ControlError(f"Parameter '{name}' expects {_type_name(spec.type)}")
    for name in arguments:
        if name not in cmd.args:
            raise ControlError(f"Parameter '{name}' is unexpected")
    return arguments


def _with_unit(name: str, unit: str, text: str) -> int | float:
    """A size or duration argument given as text, through the one parser of its kind."""
    try:
        return parse_size(name, text) if unit == "size" else parse_duration(name, text)
    except ConfigError as err:
        raise ControlError(f"Parameter '{name}': {str(err).removeprefix(name + ': ')}") from None


def _parse_request(msg: Any) -> tuple[str, dict[str, Any]]:
    """The command name and arguments of a request, checked as QEMU's qmp_dispatch does."""
    if not isinstance(msg, dict):
        raise ControlError("QMP input must be a JSON object")
    for key in msg:
        if key not in ("execute", "arguments", "id"):
            raise ControlError(f"QMP input member '{key}' is unexpected")
    if "execute" not in msg:
        raise ControlError("QMP input lacks member 'execute'")
    if not isinstance(msg["execute"], str):
        raise ControlError("QMP input member 'execute' must be a string")
    arguments = msg.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ControlError("QMP input member 'arguments' must be an object")
    return msg["execute"], arguments


# -- JSON framing -------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def decode(raw: bytes) -> Any:
    """Parse one JSON text strictly (no NaN/Infinity, no duplicate keys), as QEMU does."""
    return json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def encode(msg: Mapping[str, Any]) -> bytes:
    """One QMP message on the wire; QEMU ends each with CRLF."""
    return json.dumps(msg, allow_nan=False).encode() + b"\r\n"


_SPECIAL = re.compile(rb'[{}\[\]"\\\n]')


class _Splitter:
    """Cuts a byte stream into JSON texts: a newline ends one, and so does the end of a
    complete top-level object, array or string (so ``{...}{...}`` on one line is two texts).

    QEMU's streamer would also take an object spread over several lines; no client sends one,
    and ending every text at a newline means a typo never leaves a connection waiting.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.overflow = False     # pending input passed the limit: the connection must end
        self._buf = bytearray()
        self._scan = 0            # where scanning resumes in _buf
        self._depth = 0
        self._in_string = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the texts they complete, in order."""
        self._buf += data
        out: list[bytes] = []
        start, pos = 0, self._scan
        m: re.Match[bytes] | None = None
        while not self.overflow and (m := _SPECIAL.search(self._buf, pos)):
            ch, pos = m.group(), m.end()
            if ch == b"\n":
                self._depth, self._in_string = 0, False
                start = self._cut(out, start, pos)
            elif self._in_string:
                if ch == b"\\":                   # the escaped byte is not special...
                    if pos == len(self._buf):
                        pos = m.start()                # (rescan once it has arrived)
                        break
                    if self._buf[pos] != 0x0A:         # ...unless it is a newline
                        pos += 1
                elif ch == b'"':
                    self._in_string = False
                    if self._depth == 0:
                        start = self._cut(out, start, pos)
            elif ch in b'}]':
                self._depth -= 1
                if self._depth <= 0:
                    self._depth = 0
                    start = self._cut(out, start, pos)
            else:                                     # { [ or " opens a value
                if self._depth == 0:
                    start = self._cut(out, start, m.start())  # a scalar before it ends here
                if ch == b'"':
                    self._in_string = True
                else:
                    self._depth += 1
        if m is None:
            pos = len(self._buf)                       # nothing special left: skip it next time
        del self._buf[:start]
        self._scan = pos - start
        if len(self._buf) > self.limit:
            self.overflow = True
        return out

    def _cut(self, out: list[bytes], start: int, end: int) -> int:
        """Emit _buf[start:end] unless blank; return where the next text starts."""
        if end - start > self.limit:
            self.overflow = True
            return start
        text = bytes(self._buf[start:end])
        if text.strip():
            out.append(text)
        return end


# -- protocol (one connection, no I/O) ----------------------------------------------------

_NO_ID = object()


class QMPProtocol:
    """One connection's QMP state machine: feed it received bytes, send what it returns.

    Transport-independent: it neither reads nor writes sockets, so the Unix and TCP/TLS
    transports, and tests, share it.  Commands run synchronously inside :meth:`receive`.
    """

    def __init__(self, server: QMPServer) -> None:
        self._server = server
        self._splitter = _Splitter(server.max_message)
        #: Set once qmp_capabilities succeeded; from then on the client may get events.
        self.negotiated = False
        #: Set when the input broke the protocol beyond repair: send the replies, then hang up.
        self.closed = False

    def greeting(self) -> bytes:
        return encode({"QMP": {"version": self._server.version_info(), "capabilities": []}})

    def receive(self, data: bytes) -> list[bytes]:
        """Accumulate ``data``; run every request it completes; return the replies."""
        return list(self.replies(data))

    def replies(self, data: bytes) -> Iterator[bytes]:
        """Like :meth:`receive`, but yield each reply as soon as its command has run."""
        if self.closed:
            return
        for text in self._splitter.feed(data):
            yield self.handle(text)
        if self._splitter.overflow:
            self.closed = True
            yield encode({"error": {"class": "GenericError", "desc":
                                    f"QMP input longer than {self._splitter.limit} bytes; "
                                    "closing the connection"}})

    def handle(self, text: bytes) -> bytes:
        """The reply to one JSON text."""
        try:
            msg = decode(text)
        except (ValueError, RecursionError) as err:
            return encode({"error": {"class": "GenericError", "desc": f"JSON parse error, {err}"}})
        msg_id = msg.get("id", _NO_ID) if isinstance(msg, dict) else _NO_ID
        try:
            return self._encode_reply({"return": self._dispatch(msg)}, msg_id)
        except ControlError as err:
            return self._encode_reply({"error": {"class": err.error_class, "desc": str(err)}},
                                      msg_id)

    @staticmethod
    def _encode_reply(reply: dict[str, Any], msg_id: Any) -> bytes:
        if msg_id is not _NO_ID:
            reply["id"] = msg_id
        try:
            return encode(reply)
        except (TypeError, ValueError) as err:
            log.error("qmp: a command returned a result that is not JSON: %s", err)
            raise ControlError(f"the command's result is not JSON: {err}") from err

    def _dispatch(self, msg: Any) -> Any:
        name, arguments = _parse_request(msg)
        cmd = self._server.command(name)
        if not self.negotiated and name != "qmp_capabilities":
            raise ControlError(NEGOTIATION_FIRST, "CommandNotFound")
        if self.negotiated and name == "qmp_capabilities":
            raise ControlError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
        if cmd is None:
            raise ControlError(f"The command {name} has not been found", "CommandNotFound")
        result = run_command(cmd, check_arguments(cmd, arguments))
        if name == "qmp_capabilities":
            self.negotiated = True
        return {} if result is None else result


def run_command(cmd: Command, arguments: dict[str, Any]) -> Any:
    """Run a handler; any failure becomes a ControlError, so no handler can kill a connection."""
    try:
        return cmd.handler(arguments)
    except ControlError:
        raise
    except Exception as err:  # noqa: BLE001 - a handler bug must not take the server down
        log.exception("qmp: command %s failed", cmd.name)
        raise ControlError(str(err) or type(err).__name__) from err


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
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes accept() on Linux
        except OSError:
            pass
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
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale %s %s", what, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as err:
        raise ControlError(f"{what} {path}: cannot tell whether a server still "
                           f"answers there ({err}); remove it or choose another path") from err
    finally:
        probe.close()
    raise ControlError(f"{what} {path}: a live server answers there; stop it or "
                       "choose another path")


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
            Command("qmp_capabilities", _capabilities,
                    {"enable": ArgSpec(list, False, "capabilities to enable (none offered)")},
                    "leave capabilities negotiation mode; required before any other command"),
            Command("query-commands", lambda _: [{"name": n} for n in sorted(self._commands)],
                    help="list the commands this server accepts"),
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
        bound = sock.getsockname()[:2]
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
        from repdisk.tls import TLSRelay
        accepted = TLSRelay.accept(raw, context, peer)
        if accepted is None:
            return
        relay, app_end = accepted
        self._adopt(app_end, peer)
        relay.run()

    def _listen(self, sock: socket.socket, unlink: tuple[str, int, int] | None,
                adopt: Callable[[socket.socket, str], None] | None = None) -> None:
        with self._lock:
            if self._closed:
                sock.close()
                raise ControlError(f"qmp: the {self.name} control server is closed")
            self._listeners.append(_Listener(self, sock, unlink, adopt))

    def _adopt(self, sock: socket.socket, peer: str) -> None:
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


def _capabilities(args: dict[str, Any]) -> None:
    """qmp_capabilities: no capability is offered, so any requested one is refused."""
    for cap in args.get("enable", []):
        if not isinstance(cap, str):
            raise ControlError("Parameter 'enable' expects array of strings")
        raise ControlError(f"Capability '{cap}' not available")


# -- client -------------------------------------------------------------------------------

#: Longest wait for an orderly disconnect (QMPClient.close).
CLOSE_TIMEOUT = 1.0


class _QMPSession(_AsyncQMPClient):
    """qemu.qmp's client, with one fix for TLS: its disconnect flushes by setting the write
    high-water mark to 0 and draining, and CPython 3.11's SSL transport pauses writing when
    the buffer size is >= that mark (0 >= 0), so the drain never returns.  Over TLS the
    queue is drained normally instead; closing the transport still sends what is left."""

    async def _bh_flush_writer(self) -> None:
        writer = self._writer
        if writer is None or writer.get_extra_info("sslcontext") is None:
            await super()._bh_flush_writer()
            return
        if self._writer_task:
            await self._outgoing.join()
            await writer.drain()


class QMPClient:
    """A blocking QMP client for repdisk's CLI, controller and tests.

    It is qemu.qmp's own ``QMPClient`` run on a private event loop (rather than the legacy
    wrapper, which uses the calling thread's loop and has no connect timeout), so it can be
    used from any thread, one call at a time, and every call has a timeout.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout      # seconds, for every call
        self._loop = asyncio.new_event_loop()
        self._qmp = _QMPSession("repdisk")
        self._lock = threading.Lock()
        self._received: list[dict[str, Any]] = []
        self.address: Address | None = None

    def connect(self, address: Address, timeout: float | None = None,
                tls: ssl.SSLContext | None = None) -> QMPClient:
        """Connect to ``path`` or ``(host, port)`` or ``"host:port"`` and negotiate.

        ``tls``: a client context (:func:`repdisk.tls.client_context`) for a node's TLS
        control port; the server is checked against the host name or address given here.
        """
        address = tcp_address(address) or address
        self.address = address
        try:
            self._run(self._qmp.connect(address, ssl=tls), timeout, "connect")
        except ControlError:
            self.close()          # a failed client holds no loop or socket
            raise
        return self

    @property
    def greeting(self) -> dict[str, Any] | None:
        return self._qmp.greeting._asdict() if self._qmp.greeting else None

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None, /,
                **kwargs: Any) -> Any:
        """Run a command; arguments as a dict (names with dashes) and/or keywords.

        Raises ControlError with the server's error class and description on failure, or
        when no reply comes within ``self.timeout``.
        """
        args = {**(arguments or {}), **kwargs}
        try:
            return self._run(self._qmp.execute(name, args or None), None, name)
        except ExecuteError as err:
            raise ControlError(str(err), err.error_class) from err

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events received so far (the list may be cleared by the caller).

        The socket is read only during calls; this reads for a moment (10 ms) first.
        """
        with contextlib.suppress(ControlError):
            self._run(asyncio.sleep(0.01), None, "read events")
        self._collect()
        return self._received

    def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Remove and return the first received event called ``name``, waiting for it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._collect()
            for i, event in enumerate(self._received):
                if event.get("event") == name:
                    return self._received.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(f"{self.address}: no {name} event within the timeout")
            try:
                self._received.append(dict(self._run(self._qmp.events.get(), left, name)))
            except ControlError:
                continue

    def _collect(self) -> None:
        self._received.extend(dict(e) for e in self._qmp.events.clear())

    def close(self) -> None:
        """Disconnect and free the event loop; errors of a session that already died are
        not worth raising here.

        Bounded by ``CLOSE_TIMEOUT``: over a silently dead network a TLS close would wait
        for TCP to give up (minutes), and a controller drops such a link from its loop."""
        with self._lock:
            if self._loop.is_closed():
                return
            writer = self._qmp._writer    # noqa: SLF001 - aborted if the close hangs
            try:
                self._loop.run_until_complete(
                    asyncio.wait_for(self._qmp.disconnect(), CLOSE_TIMEOUT))
            except TimeoutError:
                log.debug("qmp client: %s: no orderly close within %gs; aborted",
                          self.address, CLOSE_TIMEOUT)
                if writer is not None:
                    writer.transport.abort()
                    self._loop.run_until_complete(asyncio.sleep(0))
            except (QMPError, OSError, EOFError) as err:
                log.debug("qmp client: %s: session ended with %s", self.address, err)
            self._loop.close()

    def _run(self, coro: Any, timeout: float | None, what: str) -> Any:
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            if self._loop.is_closed():
                coro.close()
                raise ControlError(f"{self.address}: the QMP client is closed")
            try:
                return self._loop.run_until_complete(asyncio.wait_for(coro, limit))
            except TimeoutError as err:
                raise ControlError(f"{self.address}: {what}: no answer within {limit} s") \
                    from err
            except ExecuteError:
                raise
            except (QMPError, OSError, EOFError) as err:
                raise ControlError(f"{self.address}: {what}: {err}") from err

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
