"""QMP without I/O: commands and their arguments, JSON framing, one connection's protocol.

:class:`QMPProtocol` takes the bytes a client sent and returns the bytes to send back; it
never touches a socket, so every transport (:mod:`repdisk.qmp.server`) and the tests share
it.  What it needs of the server behind it is :class:`CommandTable`.

A connection is in one :class:`Phase` at a time, changed only by ``QMPProtocol._set_phase``;
:func:`gate` is the one place that says which command may run in which phase.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from repdisk.errors import ConfigError, ControlError
from repdisk.units import parse_duration, parse_size

log = logging.getLogger(__name__)

#: Longest JSON text a client may send; longer input is answered with an error and dropped.
MAX_MESSAGE = 1 << 20

CAPABILITIES = "qmp_capabilities"
NEGOTIATION_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"
NEGOTIATION_DONE = "Capabilities negotiation is already complete, command ignored"
CLOSING = "the connection is closing: its input broke the protocol"


# -- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ArgSpec:
    """One argument of a command: its JSON type(s), whether it must be given, a help line.

    ``bool`` accepts only true/false and ``int`` only integers that are not booleans (Python's
    bool is an int; QMP's are different types); ``float`` accepts any JSON number.

    ``unit`` ``"size"`` (an ``int`` of bytes) or ``"duration"`` (a ``float`` of seconds) also
    accepts a string with a unit, read by repdisk.units' one parser: ``"1G"``, ``"500ms"``
    (so ``repdisk ctl SOCK query-digests length=1G`` works as the plugin's keys do).

    ``internal``: sent by repdisk's own programs (the controller's lease), not typed by a
    user; query-commands does not list it.
    """

    type: type | tuple[type, ...]
    required: bool = True
    help: str = ""
    unit: str | None = None
    internal: bool = False


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
    #: Refused, not run, if its client hung up before it came to run: what it says is
    #: "now" (a heartbeat), and a node that was stopped may read it long after it was sent.
    timely: bool = False


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


class Phase(enum.Enum):
    """Where one connection's QMP session is."""

    #: The greeting is out: only ``qmp_capabilities`` runs (QEMU's negotiation mode).
    NEGOTIATING = "negotiating"
    #: ``qmp_capabilities`` succeeded: every other command runs, and the client gets events.
    RUNNING = "running"
    #: The input broke the protocol beyond repair (a text too long): nothing runs any more;
    #: the transport sends the replies already made, then hangs up.
    CLOSED = "closed"


#: What a command meets in each phase, by (phase, is it qmp_capabilities): None runs it,
#: otherwise the QMP error (class, description) that answers it instead.
GATE: dict[tuple[Phase, bool], tuple[str, str] | None] = {
    (Phase.NEGOTIATING, True): None,
    (Phase.NEGOTIATING, False): ("CommandNotFound", NEGOTIATION_FIRST),
    (Phase.RUNNING, True): ("CommandNotFound", NEGOTIATION_DONE),
    (Phase.RUNNING, False): None,
    (Phase.CLOSED, True): ("GenericError", CLOSING),
    (Phase.CLOSED, False): ("GenericError", CLOSING),
}


def gate(phase: Phase, name: str) -> None:
    """Let the command called ``name`` run in ``phase``, or raise the ControlError that
    answers it (:data:`GATE`)."""
    refusal = GATE[phase, name == CAPABILITIES]
    if refusal is not None:
        error_class, desc = refusal
        raise ControlError(desc, error_class)


class CommandTable(Protocol):
    """What a :class:`QMPProtocol` needs of the server it answers for."""

    #: Longest JSON text a client may send.
    max_message: int

    def command(self, name: str) -> Command | None:
        """The command called ``name``, or None."""

    def version_info(self) -> dict[str, Any]:
        """The version object of the greeting and of ``query-version``."""


class QMPProtocol:
    """One connection's QMP state machine: feed it received bytes, send what it returns.

    Transport-independent: it neither reads nor writes sockets, so the Unix and TCP/TLS
    transports, and tests, share it.  Commands run synchronously inside :meth:`receive`.
    """

    def __init__(self, server: CommandTable) -> None:
        self._server = server
        self._splitter = _Splitter(server.max_message)
        #: The transport saw the client hang up (its requests may still be buffered).
        self.client_gone = False
        self.phase = Phase.NEGOTIATING

    def _set_phase(self, phase: Phase) -> None:
        """The one writer of :attr:`phase`; logs each change."""
        log.debug("qmp: connection %s -> %s", self.phase.value, phase.value)
        self.phase = phase

    @property
    def negotiated(self) -> bool:
        """True once qmp_capabilities succeeded and until the connection closes: the
        client may get events."""
        return self.phase is Phase.RUNNING

    @property
    def closed(self) -> bool:
        """True when the input broke the protocol: send the replies made, then hang up."""
        return self.phase is Phase.CLOSED

    def greeting(self) -> bytes:
        """The greeting QEMU sends first: the server's version, no capabilities offered."""
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
            self._set_phase(Phase.CLOSED)
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
        gate(self.phase, name)
        if cmd is None:
            raise ControlError(f"The command {name} has not been found", "CommandNotFound")
        if cmd.timely and self.client_gone:
            raise ControlError(f"{name} not run: its client hung up before it could run")
        result = run_command(cmd, check_arguments(cmd, arguments))
        if name == CAPABILITIES:
            self._set_phase(Phase.RUNNING)
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


