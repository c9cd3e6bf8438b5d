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
the handshake (run by :mod:`repdisk.qmp.tlsrelay`), before it can send a command.

Files.  :func:`make_psk` writes ``USER:HEXKEY`` (mode 0600); :func:`make_ca` writes a
small CA and one server and one client certificate, named as nbdkit and libnbd expect
(``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem``,
``client-key.pem``; ``ca-key.pem`` should then be moved off the hosts).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, quote, urlencode

from repdisk.errors import ConfigError
from repdisk.uri import is_loopback, uses_tls

PSK_USER = "repdisk"
PSK_BYTES = 32
#: Files of a certificate directory, by the side that needs them.
CERT_FILES = {
    "server": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
    "client": ("ca-cert.pem", "client-cert.pem", "client-key.pem"),
}
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


# -- control over TCP: ssl contexts ---------------------------------------------------------

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
    the host name it was reached by.  ``folder`` is a client's ``--tls DIR``."""
    check_cert_dir("tls", folder, "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.path.join(folder, "client-cert.pem"),
                        os.path.join(folder, "client-key.pem"))
    ctx.load_verify_locations(os.path.join(folder, "ca-cert.pem"))
    return ctx


# -- the replication link's libnbd client ---------------------------------------------------

class URIClient(Protocol):
    """The part of a libnbd handle (``nbd.NBD``) that :func:`prepare_client` uses."""

    def set_uri_allow_local_file(self, allow: bool) -> None:
        """Whether a URI may name local files (libnbd's default: no)."""


def prepare_client(h: URIClient, uri: str) -> None:
    """Let a libnbd handle read the credential files a TLS URI names (``tls-psk-file``,
    ``tls-certificates``): libnbd refuses local files in URIs by default, in case the URI
    came from someone else; ours comes from the node's own configuration."""
    if uses_tls(uri):
        h.set_uri_allow_local_file(True)
