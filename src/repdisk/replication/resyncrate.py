"""How fast a resync may copy while the guest runs: a fixed cap, no limit, or adaptive.

A resync (and an initial sync, and a verify's repair) shares the link to the secondary
with the guest's writes, and the secondary serves one connection's requests in order: a
4 KiB guest write queued behind megabytes of resync pieces waits for all of them.  So the
copier asks a :class:`Pacer` before each piece how big it may be, how many may be in
flight, and when it may go.

The rate is the primary's ``resync-rate`` key (:func:`parse`):

``auto`` (default)
    Adaptive, like DRBD's dynamic resync controller with ``c-min-rate``: while the guest
    writes (a guest write within the last ``QUIET`` seconds) the copy backs off to small
    pieces (``BUSY_PIECE``), one in flight, at most ``BUSY_RATE`` bytes per second; while
    the guest is quiet it runs at full speed.  A guest that never stops writing still sees
    the resync finish, at ``BUSY_RATE``.
``SIZE`` (e.g. ``100M``: bytes per second)
    A fixed cap, whatever the guest does.
``max``
    No limit (the copier's own window and memory bound only).

The pacer learns that the guest writes from the time of the replica's last guest write
(one clock read per write, next to the write counters the replica keeps anyway).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from repdisk.errors import ConfigError
from repdisk.units import parse_size

#: auto: a guest write within this many seconds means the guest is writing.
QUIET = 0.5
#: auto: while the guest writes, pieces of at most this many bytes (whole granules) ...
BUSY_PIECE = 64 << 10
#: ... one at a time, at most this many bytes per second (DRBD's c-min-rate; the floor
#: that lets a resync under a guest that never stops writing end).
BUSY_RATE = 16 << 20
#: A fixed cap below this is refused: a resync at a few KiB/s would never end.
MIN_CAP = 1 << 20

AUTO, MAX = "auto", "max"


@dataclass(frozen=True)
class ResyncRate:
    """A parsed ``resync-rate``: ``cap`` bytes per second (None: no cap) and whether the
    copy backs off while the guest writes."""
    cap: int | None
    adaptive: bool

    def describe(self) -> str:
        if self.adaptive:
            return AUTO
        return MAX if self.cap is None else f"{self.cap} bytes/s"


def parse(key: str, text: str) -> ResyncRate:
    """``auto``, ``max`` or a size per second (``100M``, ``100M/s``); ConfigError if not."""
    word = text.strip().lower()
    if word == AUTO:
        return ResyncRate(None, True)
    if word in (MAX, "unlimited"):
        return ResyncRate(None, False)
    size = word[:-2] if word.endswith("/s") else word
    try:
        cap = parse_size(key, size)
    except ConfigError:
        raise ConfigError(key, f"cannot parse rate {text!r}: use auto, max, or bytes per "
                               "second with an optional K, M, G suffix, e.g. 100M") from None
    if cap < MIN_CAP:
        raise ConfigError(key, f"{text!r} is below 1M per second: a resync that slow may "
                               "never end; use auto to let it back off while the guest writes")
    return ResyncRate(cap, False)


@dataclass(frozen=True)
class Step:
    """What the copier may do next: pieces of at most ``piece`` bytes, ``in_flight`` at most."""
    piece: int
    in_flight: int
    busy: bool


class Pacer:
    """One copy's pacing (thread-safe; one copier at a time is the usual case).

    ``last_write()`` returns the clock's time of the guest's latest write; ``piece`` and
    ``window`` are the copier's own limits when nothing holds it back.
    """

    def __init__(self, rate: ResyncRate, last_write: Callable[[], float], piece: int,
                 window: int, granularity: int,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self._last_write = last_write
        self._full = Step(piece, window, False)
        busy_piece = max(BUSY_PIECE // granularity, 1) * granularity
        self._busy = Step(min(busy_piece, piece), 1, True)
        self._clock = clock
        self._sleep = sleep
        # Guards _next: when the next byte may go (a token bucket kept as a schedule).
        self._lock = threading.Lock()
        self._next = clock()

    def step(self) -> Step:
        """The limits for the next piece (auto: small and alone while the guest writes)."""
        if not self.rate.adaptive:
            return self._full
        busy = self._clock() - self._last_write() < QUIET
        return self._busy if busy else self._full

    def pace(self, nbytes: int, step: Step) -> float:
        """Wait until ``nbytes`` more may go at the current rate; returns the seconds waited."""
        rate = BUSY_RATE if step.busy else self.rate.cap
        now = self._clock()
        with self._lock:
            if rate is None:
                self._next = now
                return 0.0
            start = max(self._next, now)
            self._next = start + nbytes / rate
        wait = start - now
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)
