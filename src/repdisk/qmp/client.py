"""The client side of repdisk's control sockets: a blocking QMP client, one command, progress.

Used by ``repdisk ctl``, ``repdisk status``, ``repdisk lab``, the controller and tests.

An address is a Unix socket path or ``HOST:PORT`` (a node's or controller's control-tcp
port).  TCP needs a certificate directory (``tls``, from ``repdisk tls ca``): the client
shows client-cert.pem and checks the server against ca-cert.pem and the host it dialled.
Plain TCP only with ``insecure`` (for a port served with insecure=yes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp import QMPClient as _AsyncQMPClient

from repdisk import tls as tlsmod
from repdisk.errors import ConfigError, ControlError
from repdisk.qmp.tlsrelay import TLS_REQUIRED
from repdisk.uri import Address, tcp_address

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Longest wait for an orderly disconnect (QMPClient.close).
CLOSE_TIMEOUT = 1.0


#: How an NBD server's greeting begins.
_NBDMAGIC = b"NBDMAGIC"


class NotQMPError(QMPError):
    """The server's first bytes are not a QMP greeting; the message says what it is."""


class TLSRequiredError(QMPError):
    """A control port served with TLS told this plain client so (tlsrelay.TLS_REQUIRED)."""


class NotAControlSocket(ControlError):
    """The address is a file, or a socket whose server does not speak QMP (e.g. a node's
    NBD socket): no control socket at all, unlike one that does not answer yet."""


class _QMPSession(_AsyncQMPClient):
    """qemu.qmp's client, with one fix for TLS: its disconnect flushes by setting the write
    high-water mark to 0 and draining, and CPython 3.11's SSL transport pauses writing when
    the buffer size is >= that mark (0 >= 0), so the drain never returns.  Over TLS the
    queue is drained normally instead; closing the transport still sends what is left."""

    async def _readline(self) -> bytes:
        """A line; before the greeting, refuse at once a server whose first byte is not
        QMP's ``{``.  An NBD server greets with ``NBDMAGIC`` and no newline, which qemu.qmp
        would wait for until the connect timed out; a control port served with TLS tells a
        plain client ``TLS_REQUIRED`` once it has waited for its hello."""
        if self._greeting is not None or self._reader is None:
            return await super()._readline()
        first = await self._reader.readexactly(1)
        if first == b"{":
            return first + await super()._readline()
        magic = first + await self._reader.read(len(TLS_REQUIRED) - 1)
        if magic.startswith(TLS_REQUIRED[:len(b"repdisk:")]):
            raise TLSRequiredError("the port is served with TLS")
        raise NotQMPError("an NBD socket" if magic.startswith(_NBDMAGIC)
                          else "a socket whose server does not speak QMP")

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
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        address = tcp_address(address) or address
        self.address = address
        try:
            self._run(self._qmp.connect(address, ssl=tls), timeout, "connect")
        except ControlError as err:
            self.close()          # a failed client holds no loop or socket
            if isinstance(address, str) and os.path.exists(address) \
                    and not stat.S_ISSOCK(os.stat(address).st_mode):
                raise NotAControlSocket(f"{address} is not a socket: give the node's (or "
                                        "the controller's) --control socket", "") from err
            why = getattr(err.__cause__, "exc", None)  # qemu.qmp's ConnectError
            if isinstance(why, TLSRequiredError):
                raise ControlError(f"{where}: {why}: give --tls DIR (client certificates) "
                                   "instead of --insecure", "") from err
            if isinstance(why, NotQMPError):
                raise NotAControlSocket(f"{where} is {why}, not a control socket: give "
                                        "the node's --control socket", "") from err
            if isinstance(why, (FileNotFoundError, ConnectionRefusedError)):
                raise ControlError(f"{where}: nothing answers there "
                                   f"({os.strerror(why.errno) if why.errno else why.strerror}): "
                                   "start the node (or controller) first, or give its "
                                   "--control socket", "") from err
            raise
        return self

    @property
    def greeting(self) -> dict[str, Any] | None:
        """The server's greeting as received, or None before a connection succeeded."""
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
                raise ControlError(f"{self.address}: no {name} event within the timeout", "")
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

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None, what: str) -> _T:
        """Run ``coro`` on the private loop, one call at a time, within ``timeout``
        (``self.timeout`` if None); a timeout or a broken session becomes a ControlError
        naming ``what``, a command's error stays qemu.qmp's ExecuteError."""
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            if self._loop.is_closed():
                coro.close()
                raise ControlError(f"{self.address}: the QMP client is closed", "")
            try:
                return self._loop.run_until_complete(asyncio.wait_for(coro, limit))
            except TimeoutError as err:
                raise ControlError(f"{self.address}: {what}: no answer within {limit} s",
                                   "") \
                    from err
            except ExecuteError:
                raise
            except (QMPError, OSError, EOFError) as err:
                raise ControlError(f"{self.address}: {what}: {err}", "") from err

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# -- one command on a control socket ------------------------------------------------------

#: Short names for ``repdisk ctl``: alias -> (QMP command, fixed arguments).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "status": ("query-replication", {}),
    "start": ("replication-start", {}),
    "checkpoint": ("replication-do-checkpoint", {}),
    "resume": ("replication-resume", {}),
    "error": ("replication-get-error", {}),
    "stop": ("replication-stop", {"failover": False}),
    "failover": ("replication-stop", {"failover": True}),
    "resync": ("replication-resync", {}),
    "verify": ("replication-verify", {}),
}

#: The same short names sent to a controller (its commands for the same intent).
CONTROLLER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "status": ("query-controller", {}),
    "checkpoint": ("replication-do-checkpoint", {}),
    "failover": ("controller-failover", {}),
    "resync": ("controller-resync", {}),
    "verify": ("controller-verify", {}),
}

#: Commands that may take long: ``repdisk ctl`` shows their progress events on a terminal.
LONG = {"replication-start", "replication-stop", "replication-resync", "controller-resync",
        "replication-verify", "controller-verify"}


def resolve(command: str, args: dict[str, Any],
            controller: bool = False) -> tuple[str, dict[str, Any]]:
    """The QMP command and arguments behind ``command``, an alias (of :data:`ALIASES`, or
    of :data:`CONTROLLER_ALIASES` for a controller) or a command's own name; ``args`` are
    given after the alias' fixed arguments."""
    name, fixed = (CONTROLLER_ALIASES if controller else ALIASES).get(command, (command, {}))
    return name, {**fixed, **args}


def is_controller(client: QMPClient) -> bool:
    """Whether ``client`` is connected to a controller (its greeting names it)."""
    version = (client.greeting or {}).get("QMP", {}).get("version", {})
    return str(version.get("package", "")).startswith("repdisk-controller")


def connect(address: str, tls: str | None = None, insecure: bool = False, *,
            timeout: float = 10.0, connect_timeout: float = 10.0) -> QMPClient:
    """A negotiated client of a control socket or ``HOST:PORT``; TCP uses TLS with the
    certificates in ``tls`` (read at every connect, so renewed files take effect at once)."""
    context = None
    if tcp_address(address) is not None:
        if tls:
            context = tlsmod.client_context(tls)
        elif not insecure:
            raise ConfigError("tls", f"{address} is a TCP control port: give --tls DIR (client "
                                     "certificates), or --insecure for a port served without TLS")
    try:
        return QMPClient(timeout=timeout).connect(address, timeout=connect_timeout,
                                                  tls=context)
    except ControlError as err:
        if context is None and tcp_address(address) and isinstance(err.__cause__,
                                                                   TimeoutError):
            raise ControlError(f"{err}: a control port served with TLS says nothing to a "
                               "client without it; give --tls DIR", "") from err
        why = getattr(err.__cause__, "exc", None)  # qemu.qmp's ConnectError
        if isinstance(why, ssl.SSLError) and why.reason == "WRONG_VERSION_NUMBER":
            raise ControlError(f"{address}: the port answered without TLS (it is served "
                               "--insecure): give --insecure instead of --tls", "") from err
        raise


def execute(socket: str, command: str, args: dict[str, Any] | None = None, *,
            timeout: float = 600.0, progress: bool = False, tls: str | None = None,
            insecure: bool = False) -> Any:
    """Run one command on a control socket; raises ControlError with the server's error."""
    client = connect(socket, tls, insecure, timeout=timeout)
    try:
        name, arguments = resolve(command, args or {}, is_controller(client))
        watcher = ProgressPrinter(socket, tls=tls, insecure=insecure) \
            if progress and name in LONG else None
        try:
            return client.execute(name, arguments)
        finally:
            if watcher:
                watcher.stop()
    finally:
        client.close()


class ProgressPrinter:
    """Prints ``*_PROGRESS`` events of a node on a second connection while a command runs."""

    def __init__(self, socket: str, out: Callable[[str], object] = sys.stderr.write,
                 tls: str | None = None, insecure: bool = False) -> None:
        self._out = out
        self._stop = threading.Event()
        self._client = connect(socket, tls, insecure, timeout=5.0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(0.2)  # one last read after the command answered
            events = self._client.events
            for ev in events:
                if ev.get("event", "").endswith("_PROGRESS"):
                    self._out("\r" + format_progress(ev["event"], ev.get("data", {})))
            events.clear()
            if stopping:
                return

    def stop(self) -> None:
        """Print the events that came until now, then close the watching connection; call
        once, after the command answered."""
        self._stop.set()
        self._thread.join()
        self._client.close()
        self._out("\n")


def format_progress(event: str, data: dict[str, Any]) -> str:
    """One ``*_PROGRESS`` event as a line: ``disk resync: 1.0/4.0 MiB (25%)``."""
    done, total = data.get("done", 0), data.get("total", 0) or 1
    what = event.removesuffix("_PROGRESS").lower()
    return (f"{data.get('disk', '')} {what}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB "
            f"({100 * done / total:.0f}%)")

