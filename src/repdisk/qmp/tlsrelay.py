"""TLS for control over TCP: each client's handshake and traffic on its own thread.

:class:`TLSRelay` runs the server handshake on the connection's own thread and then relays
between the TLS socket and a plain socket pair, so the QMP connection code
(:mod:`repdisk.qmp.server`) stays transport-blind and no TLS object is ever used by two
threads at once (OpenSSL forbids it; a QMP connection has a reader and a writer thread).
The contexts come from :mod:`repdisk.tls` (``server_context`` requires a client certificate
signed by the pair's CA, so a client without one is refused before it can send a command).
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import socket
import ssl

log = logging.getLogger(__name__)

#: A control client must finish the TLS handshake within this many seconds.
HANDSHAKE_TIMEOUT = 10.0

#: A TLS client speaks first (its hello); one that has sent nothing after this many seconds
#: waits for a plain QMP greeting (``--insecure``), and is told so in plain text.
SILENT_CLIENT = 3.0

#: What such a client is told: not JSON, so a QMP client sees at once that it is no greeting
#: (repdisk.qmp.client recognises it).
TLS_REQUIRED = b"repdisk: this control port is served with TLS\n"


def peer_name(tls: ssl.SSLSocket) -> str:
    """The common name of the peer's certificate, for the log."""
    cert = tls.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for attribute in rdn:
            if isinstance(attribute, tuple) and attribute[0] == "commonName":
                return str(attribute[1])
    return "?"


class TLSRelay:
    """One TLS connection terminated on its own thread and relayed to a plain socket.

    ``accept(raw, peer)`` runs the server handshake (bounded by ``HANDSHAKE_TIMEOUT``);
    a client that fails it is logged and closed, and nothing else happens.  On success
    the plain end of a socket pair is returned for the application and :meth:`run` then
    copies bytes both ways until either side closes.
    """

    CHUNK = 1 << 16
    #: Most bytes buffered in one direction before reading from that side pauses.
    LIMIT = 1 << 20

    def __init__(self, tls: ssl.SSLSocket, relay_end: socket.socket) -> None:
        self.tls = tls
        self.plain = relay_end

    @classmethod
    def accept(cls, raw: socket.socket, context: ssl.SSLContext, peer: str,
               what: str = "control client") -> tuple[TLSRelay, socket.socket] | None:
        """The server handshake on ``raw`` (blocks up to ``SILENT_CLIENT`` for the client's
        first bytes, then ``HANDSHAKE_TIMEOUT``): the relay and the application's plain end,
        or None when it failed (logged, ``raw`` closed; a silent client is sent
        ``TLS_REQUIRED`` first)."""
        if not select.select([raw], [], [], SILENT_CLIENT)[0]:
            log.warning("refused %s %s: it sent no TLS hello within %gs (a client without "
                        "TLS?): told it the port needs TLS", what, peer, SILENT_CLIENT)
            with contextlib.suppress(OSError):
                raw.sendall(TLS_REQUIRED)
            raw.close()
            return None
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as err:
            log.warning("refused %s %s: TLS handshake failed: %s", what, peer, err)
            raw.close()
            return None
        log.info("%s %s authenticated as %r", what, peer, peer_name(tls))
        app_end, relay_end = socket.socketpair()
        return cls(tls, relay_end), app_end

    def run(self) -> None:
        """Relay until both directions ended or either side failed; closes both sockets."""
        try:
            self._loop()
        except (ssl.SSLError, OSError) as err:
            log.debug("tls relay ended: %s", err)
        finally:
            for s in (self.tls, self.plain):
                with contextlib.suppress(OSError):
                    s.close()

    def _loop(self) -> None:
        tls, plain = self.tls, self.plain
        tls.setblocking(False)
        plain.setblocking(False)
        to_plain, to_tls = bytearray(), bytearray()
        tls_open = plain_open = True        # each side may still send us bytes
        told_eof = False
        sel = selectors.DefaultSelector()
        while True:
            tls_wants = 0
            if tls_open and len(to_plain) < self.LIMIT:
                tls_open, tls_wants = self._read_tls(to_plain)
            if to_plain:
                del to_plain[:self._send_plain(to_plain)]
            if not tls_open and not to_plain and not told_eof:
                plain.shutdown(socket.SHUT_WR)   # the application's reader sees the end
                told_eof = True
            if plain_open and len(to_tls) < self.LIMIT:
                plain_open = self._read_plain(to_tls)
            if to_tls:
                sent, wants = self._send_tls(to_tls)
                del to_tls[:sent]
                tls_wants |= wants
            if not plain_open and not to_tls:
                return                      # the application closed and all is sent
            read_tls = tls_open and len(to_plain) < self.LIMIT
            if read_tls and tls.pending():
                continue                    # decrypted bytes wait inside OpenSSL, not the fd
            tls_events = ((selectors.EVENT_READ if read_tls else 0)
                          | (selectors.EVENT_WRITE if to_tls else 0) | tls_wants)
            plain_events = ((selectors.EVENT_READ if plain_open and len(to_tls) < self.LIMIT
                             else 0) | (selectors.EVENT_WRITE if to_plain else 0))
            self._wait(sel, tls_events, plain_events)

    def _read_tls(self, into: bytearray) -> tuple[bool, int]:
        """Read what TLS has decrypted; (still open, extra event TLS waits for)."""
        while True:
            try:
                data = self.tls.recv(self.CHUNK)
            except ssl.SSLWantReadError:
                return True, 0
            except ssl.SSLWantWriteError:
                return True, selectors.EVENT_WRITE
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError):
                return False, 0
            if not data:
                return False, 0
            into += data
            if not self.tls.pending() or len(into) >= self.LIMIT:
                return True, 0

    def _send_plain(self, data: bytearray) -> int:
        try:
            return self.plain.send(data)
        except BlockingIOError:
            return 0

    def _read_plain(self, into: bytearray) -> bool:
        try:
            data = self.plain.recv(self.CHUNK)
        except BlockingIOError:
            return True
        into += data
        return bool(data)

    def _send_tls(self, data: bytearray) -> tuple[int, int]:
        """Send what TLS takes now; (bytes taken, extra event TLS waits for)."""
        try:
            return self.tls.send(data[:self.CHUNK]), 0
        except ssl.SSLWantWriteError:
            return 0, 0
        except ssl.SSLWantReadError:
            return 0, selectors.EVENT_READ

    def _wait(self, sel: selectors.BaseSelector, tls_events: int, plain_events: int) -> None:
        """Block until a socket is ready for what the relay waits on (never with nothing)."""
        pairs = [(s, e) for s, e in ((self.tls, tls_events), (self.plain, plain_events)) if e]
        if not pairs:
            raise OSError("tls relay has nothing to wait for")   # both sides are finished
        for sock, events in pairs:
            sel.register(sock, events)
        try:
            sel.select()
        finally:
            for sock, _ in pairs:
                sel.unregister(sock)

