"""Addresses and NBD URIs: what they say about where a connection goes, and nothing more.

A control address is a Unix socket path or TCP ``HOST:PORT`` (``[V6]:PORT`` for an IPv6
literal); :func:`tcp_address` tells them apart and :func:`parse_address` checks a key's
``HOST:PORT``.  An NBD URI is libnbd's (``nbd://``, ``nbds://``, ``nbd+unix://``, ...):
whether it uses TLS, its TCP host or Unix socket, and the same URI for a sibling export
(:func:`with_export_suffix`).  Credentials are :mod:`repdisk.tls`' business.
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import parse_qs, quote, unquote

from repdisk.errors import ConfigError

#: A control address: a Unix socket path, ``"host:port"``, or ``(host, port)``.
Address = str | tuple[str, int]


def tcp_address(address: Address) -> tuple[str, int] | None:
    """``(host, port)`` for a TCP control address (``"host:port"``, ``"[v6]:port"`` or a
    tuple); None for a Unix socket path."""
    if isinstance(address, tuple):
        return address
    if not re.fullmatch(r"[^/]*:\d+", address):
        return None
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def parse_address(key: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 literal in brackets) as a (host, port) pair; a ConfigError
    naming ``key`` for anything else."""
    address = tcp_address(text)
    if address is None or not address[0] or not 0 < address[1] < 65536:
        raise ConfigError(key, f"cannot parse {text!r}: use HOST:PORT, e.g. 10.0.0.1:7000")
    return address


def is_loopback(host: str) -> bool:
    """True for addresses that cannot leave this host (127/8, ::1, localhost)."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uses_tls(uri: str) -> bool:
    """True for libnbd's TLS schemes (nbds://, nbds+unix://, nbds+vsock://)."""
    return uri.startswith("nbds")


def uri_tcp_host(uri: str) -> str | None:
    """The host of a TCP NBD URI (brackets of an IPv6 literal removed), None otherwise."""
    m = re.match(r"^nbds?://(?:[^@/]*@)?(\[[^\]]*\]|[^:/?]*)", uri)
    return m.group(1).strip("[]") if m else None


def uri_unix_socket(uri: str) -> str | None:
    """The socket path of a Unix NBD URI (``nbd+unix:///?socket=PATH``), None otherwise."""
    if not re.match(r"^nbds?\+unix://", uri):
        return None
    found = parse_qs(uri.partition("?")[2]).get("socket")
    return found[0] if found else None


def with_absolute_socket(uri: str) -> str:
    """A Unix NBD URI whose relative ``socket=`` is made absolute (from the current
    folder); any other URI unchanged."""
    path = uri_unix_socket(uri)
    if path is None or path.startswith("/"):
        return uri
    base, _, query = uri.partition("?")
    parts = [f"socket={quote(os.path.abspath(path), safe='/')}" if p.startswith("socket=") else p
             for p in query.split("&")]
    return f"{base}?{'&'.join(parts)}"


def with_export_suffix(uri: str, suffix: str) -> str:
    """Append ``suffix`` to the export name in an NBD URI (its path after the leading /)."""
    if not suffix:
        return uri
    # By hand: urlunsplit drops the empty authority of nbd+unix:///export.
    base, sep, query = uri.partition("?")
    scheme, _, rest = base.partition("://")
    authority, _, path = rest.partition("/")
    return f"{scheme}://{authority}/{path}{quote(suffix, safe='')}{sep}{query}"


def export_name(uri: str) -> str:
    """The export name of an NBD URI: its path after the leading /, unquoted."""
    base = uri.partition("?")[0]
    return unquote(base.partition("://")[2].partition("/")[2])
