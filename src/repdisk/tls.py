"""TLS for repdisk's links between hosts: the replication link (NBD) and control over TCP.

Replication link.  The secondary's nbdkit requires TLS (``--tls=require`` with a PSK
file or an x509 directory: nbdkit's flags, set by :mod:`repdisk.cli.nodeproc`); the
primary's libnbd client uses the same credentials.  They reach the client inside the
NBD URI, in libnbd's own syntax (``nbds://USER@host/replica?tls-psk-file=F``), so the
URI stays the one thing that says where and how to connect, and ``nbdinfo``,
``qemu-img`` or ``nbdcopy`` can use the very same string.  :meth:`TLSSpec.client_uri`
builds it from the ``secondary-tls`` key; the forwarder lets libnbd read the local files
the URI names.

Control over TCP.  The same QMP protocol, inside TLS with x509 certificates on both
sides (Python's ``ssl`` has no PSK before 3.13): :func:`server_context` requires a
client certificate signed by the pair's CA, so a client without one is refused during
the handshake, before it can send a command.  :class:`TLSRelay` runs that handshake on
the connection's own thread and then relays between the TLS socket and a plain socket
pair, so the QMP connection code stays transport-blind and no TLS object is ever used
by two threads at once (OpenSSL forbids it; QMP has a reader and a writer thread).

Files.  :func:`make_psk` writes ``USER:HEXKEY`` (mode 0600); :func:`make_ca` writes a
small CA and one server and one client certificate, named as nbdkit and libnbd expect
(``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem``,
``client-key.pem``; ``ca-key.pem`` should then be moved off the hosts).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
import selectors
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, urlencode

from repdisk.errors import ConfigError
from repdisk.uri import is_loopback, uses_tls

if TYPE_CHECKING:
    from repdisk.qmp.protocol import QMPServer

log = logging.getLogger(__name__)

PSK_USER = "repdisk"
PSK_BYTES = 32
#: Files of a certificate directory, by the side that needs them.
CERT_FILES = {
    "server": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
    "client": ("ca-cert.pem", "client-cert.pem", "client-key.pem"),
}
#: A control client must finish the TLS handshake within this many seconds.
HANDSHAKE_TIMEOUT = 10.0
_USER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PSK_LINE = re.compile(r"^([^:\s]+):([0-9a-fA-F]+)$")
_TLS_QUERY = ("tls-psk-file", "tls-certificates", "tls-verify-peer")


# -- what to use ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSSpec:
    """Credentials for one side of the replication link: a PSK file or an x509 directory."""

    kind: str                 # "psk" or "x509"
    path: str                 # the PSK file, or the certificate directory
    username: str = PSK_USER  # psk: which identity of the file the client uses

    @classmethod
    def parse(cls, key: str, text: str) -> TLSSpec | None:
        """``psk:FILE[:USER]``, ``x509:DIR`` or ``off`` (None); the path is made absolute.

        nbdkit changes directory when it daemonizes, so a relative path would break later.
        """
        kind, _, rest = text.partition(":")
        if text == "off":
            return None
        if kind == "x509" and rest:
            return cls("x509", os.path.abspath(rest))
        if kind == "psk" and rest:
            path, _, user = rest.partition(":")
            if user and not _USER_RE.match(user):
                raise ConfigError(key, f"PSK username {user!r} may only have letters, digits, "
                                       "'.', '_' and '-'")
            return cls("psk", os.path.abspath(path), user or PSK_USER)
        raise ConfigError(key, f"cannot parse {text!r}: use psk:FILE[:USER], x509:DIR or off "
                               "(create them with: repdisk tls psk FILE / repdisk tls ca DIR)")

    def check(self, key: str, side: str) -> None:
        """Refuse missing or unsafe files now, with a clear line, not at the first connection."""
        if self.kind == "psk":
            users = read_psk_users(key, self.path)
            if side == "client" and self.username not in users:
                raise ConfigError(key, f"{self.path} has no key for user {self.username!r} "
                                       f"(it has: {', '.join(users)})")
        else:
            check_cert_dir(key, self.path, side)

    def nbdkit_args(self) -> list[str]:
        """nbdkit's flags for a listener that accepts TLS clients only."""
        if self.kind == "psk":
            return ["--tls=require", f"--tls-psk={self.path}"]
        return ["--tls=require", f"--tls-certificates={self.path}", "--tls-verify-peer"]

    def client_uri(self, key: str, uri: str) -> str:
        """``uri`` with these credentials in libnbd's URI syntax (``nbd`` becomes ``nbds``)."""
        scheme, sep, rest = uri.partition("://")
        if not sep or not scheme.startswith("nbd"):
            raise ConfigError(key, f"{uri!r} is not an NBD URI")
        base, qsep, query = rest.partition("?")
        params = parse_qsl(query, keep_blank_values=True)
        if any(k in _TLS_QUERY for k, _ in params) or "@" in base.partition("/")[0]:
            raise ConfigError(key, f"{uri!r} already carries TLS settings; give them once, "
                                   "either in the URI or with secondary-tls")
        if scheme.startswith("nbds"):
            scheme = "nbd" + scheme[4:]
        if self.kind == "psk":
            base = f"{quote(self.username, safe='')}@{base}"
            params.append(("tls-psk-file", self.path))
        else:
            params += [("tls-certificates", self.path), ("tls-verify-peer", "true")]
        query = urlencode(params, quote_via=quote, safe="/")
        return f"nbds{scheme[3:]}://{base}?{query}"


def check_plain(key: str, what: str, host: str, insecure: bool) -> None:
    """Refuse unencrypted TCP to or from another host unless the operator said --insecure."""
    if insecure or is_loopback(host):
        return
    raise ConfigError(key, f"{what} {host} is plain TCP between hosts: anyone on the path can "
                           "read and change the disk; use TLS (psk:FILE or x509:DIR) or say "
                           "insecure explicitly")


def control_tls_dir(key: str, text: str, side: str) -> str | None:
    """The certificate directory of ``x509:DIR`` for control over TCP (None for ``off``);
    its files for ``side`` are checked now.  Python's ``ssl`` has no PSK before 3.13."""
    spec = TLSSpec.parse(key, text)
    if spec is None:
        return None
    if spec.kind != "x509":
        raise ConfigError(key, "control over TCP uses certificates, not a PSK: give x509:DIR "
                               "(create it with repdisk tls ca DIR --hosts ...)")
    check_cert_dir(key, spec.path, side)
    return spec.path


def check_control_plain(key: str, address: str, insecure: bool) -> None:
    """Refuse control over plain TCP unless insecure, loopback included: a TCP port on
    loopback is open to every local user, the 0600 Unix socket only to its owner."""
    if not insecure:
        raise ConfigError(key, f"control on {address} without TLS would let anyone who reaches "
                               "the port (on loopback: any local user) run any command: give "
                               "TLS certificates (x509:DIR) or say insecure explicitly")


# -- checking files ------------------------------------------------------------------------

def read_psk_users(key: str, path: str) -> list[str]:
    """The usernames of a PSK file; refuses a file others may read or one badly formed."""
    try:
        st = os.stat(path)
        with open(path, encoding="ascii") as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(key, f"PSK file {path} does not exist: create it with "
                               f"repdisk tls psk {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(key, f"cannot read PSK file {path}: {err}") from err
    if st.st_mode & 0o077:
        raise ConfigError(key, f"PSK file {path} is readable by others (mode "
                               f"{st.st_mode & 0o777:o}): chmod 600 {path}")
    users = []
    for n, line in enumerate(lines, 1):
        m = _PSK_LINE.match(line)
        if not m or len(m.group(2)) % 2:
            raise ConfigError(key, f"PSK file {path} line {n} is not USER:HEXKEY")
        users.append(m.group(1))
    if not users:
        raise ConfigError(key, f"PSK file {path} is empty")
    return users


def check_cert_dir(key: str, folder: str, side: str) -> None:
    """Refuse a certificate directory that lacks a file ``side`` needs, or leaks a key."""
    for name in CERT_FILES[side]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ConfigError(key, f"{path} is missing (a {side} needs "
                                   f"{', '.join(CERT_FILES[side])}; create them with "
                                   f"repdisk tls ca {folder} --hosts ...)")
        if name.endswith("-key.pem") and os.stat(path).st_mode & 0o077:
            raise ConfigError(key, f"private key {path} is readable by others: chmod 600 {path}")


# -- making files --------------------------------------------------------------------------

def _create_private(path: str, data: bytes, force: bool = False) -> None:
    """Write a secret file that is 0600 from its first byte (never briefly world-readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError("tls", f"{path} exists; remove it first, or pass --force to "
                                 "replace it (clients need the new key then)") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def make_psk(path: str, username: str = PSK_USER, force: bool = False) -> None:
    """A new PSK file with one ``USER:HEXKEY`` line (256 random bits), mode 0600."""
    if not _USER_RE.match(username):
        raise ConfigError("tls", f"PSK username {username!r} may only have letters, digits, "
                                 "'.', '_' and '-'")
    _create_private(path, f"{username}:{secrets.token_hex(PSK_BYTES)}\n".encode(), force)


def make_ca(folder: str, hosts: list[str], days: int = 3650, force: bool = False) -> list[str]:
    """A CA, a server certificate valid for ``hosts`` and a client certificate, via certtool.

    One server certificate names every host of the pair (DNS names and IP addresses as
    subject alternative names), so the same directory serves both nodes and the
    controller.  Returns the files written.
    """
    if not hosts:
        raise ConfigError("hosts", "give the names or addresses clients use to reach the "
                                   "nodes, e.g. --hosts pri.example.com,10.0.0.2")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    out = [os.path.join(folder, n) for n in
           ("ca-key.pem", "ca-cert.pem", "server-key.pem", "server-cert.pem",
            "client-key.pem", "client-cert.pem")]
    if not force and any(os.path.exists(p) for p in out):
        raise ConfigError("tls", f"{folder} already holds certificates; choose an empty "
                                 "directory or pass --force")
    ca_key, ca_cert, srv_key, srv_cert, cli_key, cli_cert = out
    for key_path in (ca_key, srv_key, cli_key):
        _create_private(key_path, _certtool("--generate-privkey", "--no-text", "--key-type=ecdsa",
                                            "--curve=secp256r1"), force=True)
    _issue(ca_cert, ca_key, None, ["cn = repdisk CA", "ca", "cert_signing_key"], days)
    sans = [f"ip_address = {h}" if _is_ip(h) else f"dns_name = {h}" for h in hosts]
    _issue(srv_cert, srv_key, (ca_cert, ca_key),
           [f"cn = {hosts[0]}", *sans, "tls_www_server", "encryption_key", "signing_key"], days)
    _issue(cli_cert, cli_key, (ca_cert, ca_key),
           ["cn = repdisk client", "tls_www_client", "encryption_key", "signing_key"], days)
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _issue(cert: str, key: str, ca: tuple[str, str] | None, template: list[str],
           days: int) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".info") as info:
        info.write("\n".join([*template, f"expiration_days = {days}"]) + "\n")
        info.flush()
        args = ["--no-text", "--load-privkey", key, "--template", info.name, "--outfile", cert]
        if ca is None:
            _certtool("--generate-self-signed", *args)
        else:
            _certtool("--generate-certificate", "--load-ca-certificate", ca[0],
                      "--load-ca-privkey", ca[1], *args)


def _certtool(*args: str) -> bytes:
    try:
        done = subprocess.run(["certtool", *args], capture_output=True, check=False)
    except FileNotFoundError:
        raise ConfigError("tls", "certtool is not installed (Debian: apt-get install "
                                 "gnutls-bin)") from None
    if done.returncode:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise ConfigError("tls", f"certtool {args[0]} failed: {err[-1] if err else '?'}")
    return done.stdout


# -- control over TCP: ssl contexts and the relay ----------------------------------------------

def server_context(folder: str) -> ssl.SSLContext:
    """A control server's TLS: its certificate, and client certificates from the CA required."""
    check_cert_dir("control-tls", folder, "server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(os.path.join(folder, "server-cert.pem"),
                        os.path.join(folder, "server-key.pem"))
    ctx.load_verify_locations(os.path.join(folder, "ca-cert.pem"))
    ctx.num_tickets = 0   # no resumption: every connection proves its certificate
    return ctx


def client_context(folder: str) -> ssl.SSLContext:
    """A control client's TLS: its certificate, and the server checked against the CA and
    the host name it was reached by."""
    check_cert_dir("control-tls", folder, "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.path.join(folder, "client-cert.pem"),
                        os.path.join(folder, "client-key.pem"))
    ctx.load_verify_locations(os.path.join(folder, "ca-cert.pem"))
    return ctx


def serve_control(server: QMPServer, address: tuple[str, int],
                  folder: str | None) -> tuple[str, int]:
    """Serve a node's or controller's control protocol on TCP ``address``: TLS with client
    certificates of ``folder``'s CA, or plain when ``folder`` is None (the configuration
    checked that the operator said insecure).  Returns the bound address."""
    return server.serve_tcp(*address, server_context(folder) if folder else None)


def peer_name(tls: ssl.SSLSocket) -> str:
    """The common name of the peer's certificate, for the log."""
    cert = tls.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
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


def prepare_client(h: object, uri: str) -> None:
    """Let a libnbd handle read the credential files a TLS URI names (``tls-psk-file``,
    ``tls-certificates``): libnbd refuses local files in URIs by default, in case the URI
    came from someone else; ours comes from the node's own configuration."""
    if uses_tls(uri):
        h.set_uri_allow_local_file(True)  # type: ignore[attr-defined]
