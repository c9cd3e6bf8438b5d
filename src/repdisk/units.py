"""The one size parser and the one duration parser, and their readable forms.

Every size and duration a user types goes through here: the plugin's keys (``max-lag=256M``,
``timeout=500ms``), ``repdisk controller --interval 5s``, ``repdisk lab --size 1G`` and the
arguments of ``repdisk ctl`` (``length=1G``, ``timeout=2s``: see
``repdisk.qmp.protocol.ArgSpec.unit``).

- A size is a whole number with an optional binary suffix ``K``, ``M``, ``G`` or ``T``
  (case-insensitive, ``KiB``/``KB``-style endings accepted): ``64K`` is 65536.
- A duration is a positive number with an optional unit ``ms``, ``s``, ``m`` or ``h``
  (no unit: seconds): ``500ms`` is 0.5.

A mistake raises :class:`ConfigError` naming the key and showing a valid example.
"""

from __future__ import annotations

import re
import time

from repdisk.errors import ConfigError

_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_size(key: str, text: str) -> int:
    """Bytes in ``text`` (``64K``, ``1G``, ``4096``); ConfigError naming ``key`` if not a size."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ConfigError(key, f"cannot parse size {text!r}: use a number with an optional "
                               "K, M, G or T suffix, e.g. 64K or 1G")
    return int(m.group(1)) << _SIZE_SHIFT[m.group(2).upper()]


def parse_duration(key: str, text: str) -> float:
    """Seconds in ``text`` (``500ms``, ``5s``, ``2m``, ``1h``, ``3``); must be positive."""
    m = _DURATION_RE.fullmatch(text)
    if not m:
        raise ConfigError(key, f"cannot parse duration {text!r}: use a number with an optional "
                               "unit ms, s, m or h, e.g. 5s or 500ms")
    if float(m.group(1)) <= 0:
        raise ConfigError(key, f"{text!r} is not positive: use e.g. 5s or 500ms")
    return float(m.group(1)) * _DURATION_SECONDS[m.group(2)]


def format_size(n: float) -> str:
    """Bytes as MiB with one decimal (``1.0 MiB``), the unit of every status line."""
    return f"{n / 2**20:.1f} MiB"


def format_seconds(s: float) -> str:
    """A duration for people: ``0.6 ms``, ``1.25 s``, ``3m 20s``, ``2h 05m``."""
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def format_time(epoch: float) -> str:
    """A wall-clock time (seconds since the epoch) as local ISO time and its age."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    age = time.time() - epoch
    return f"{stamp} ({format_seconds(age)} ago)" if age >= 0 else stamp
