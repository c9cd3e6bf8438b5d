"""Byte-range locks with shared and exclusive holders.

Used where an operation must not interleave with another on the same bytes: a
read of the secondary's ``active_view`` against a primary write whose
copy-before-write is half done, a checkpoint against any write, a partial
cluster's read-modify-write against a neighbour in the same cluster.

Holders are few (one per request in progress, so at most the number of nbdkit
threads plus background jobs), so a list scanned under one lock is both simple
and fast; there is no fairness beyond what the condition gives (:class:`FairRangeLock`
adds a turnstile for whole-range holders).

Every request takes one, so the uncontended path is kept to one lock round and
a list append/remove: waiters are counted, and a release wakes them only when
there are any (``notify_all`` on an empty condition still costs a call).  The
context managers are small classes, not generators (a generator-based
``contextmanager`` costs several Python calls per use).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType

Entry = tuple[int, int, bool]


class _Held:
    """``with lock.exclusive(a, b):`` / ``with lock.shared(a, b):``."""

    __slots__ = ("_lock", "_start", "_end", "_exclusive", "_entry")

    def __init__(self, lock: RangeLock, start: int, end: int, exclusive: bool) -> None:
        self._lock = lock
        self._start = start
        self._end = end
        self._exclusive = exclusive

    def __enter__(self) -> None:
        self._entry = self._lock.acquire(self._start, self._end, self._exclusive)

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.release(self._entry)


class RangeLock:
    """Shared and exclusive holds of half-open ranges ``[start, end)``: two holds
    conflict when they overlap and one of them is exclusive; a conflicting acquire waits."""

    def __init__(self) -> None:
        # Guards _held and _waiters; waiters sleep on it until an overlapping holder leaves.
        self._cond = threading.Condition(threading.Lock())
        self._held: list[Entry] = []  # (start, end, exclusive)
        self._waiters = 0

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        return any(s < end and start < e and (exclusive or x) for s, e, x in self._held)

    def acquire(self, start: int, end: int, exclusive: bool = True) -> Entry:
        entry = (start, end, exclusive)
        with self._cond:
            if self._held and self._conflicts(start, end, exclusive):
                self._waiters += 1
                try:
                    while self._conflicts(start, end, exclusive):
                        self._cond.wait()
                finally:
                    self._waiters -= 1
            self._held.append(entry)
        return entry

    def release(self, entry: Entry) -> None:
        with self._cond:
            self._held.remove(entry)
            if self._waiters:
                self._cond.notify_all()

    def exclusive(self, start: int, end: int) -> _Held:
        return _Held(self, start, end, True)

    def shared(self, start: int, end: int) -> _Held:
        return _Held(self, start, end, False)


class FairRangeLock:
    """``RangeLock`` plus a turnstile: a whole-range holder-to-be stops new requests.

    The secondary's checkpoint or failover commit needs the whole disk exclusively, and
    RangeLock has no writer preference: without the turnstile, readers and writers that
    keep coming (test_secondary_stress.py) keep it waiting while the primary's checkpoint
    hold runs out.  ``shared`` and ``exclusive`` wait while a ``whole`` holder waits or
    holds, then lock as RangeLock does.
    """

    def __init__(self) -> None:
        self._ranges = RangeLock()
        # Guards _draining: the number of whole-disk holders waiting or holding.
        self._turnstile = threading.Condition(threading.Lock())
        self._draining = 0

    def shared(self, start: int, end: int) -> AbstractContextManager[None]:
        self._wait_turn()
        return self._ranges.shared(start, end)

    def exclusive(self, start: int, end: int) -> AbstractContextManager[None]:
        self._wait_turn()
        return self._ranges.exclusive(start, end)

    @contextmanager
    def whole(self, size: int) -> Iterator[None]:
        """Hold ``[0, size)`` exclusively, ahead of requests that arrive meanwhile."""
        with self._turnstile:
            self._draining += 1
        try:
            with self._ranges.exclusive(0, size):
                yield
        finally:
            with self._turnstile:
                self._draining -= 1
                self._turnstile.notify_all()

    def _wait_turn(self) -> None:
        """Wait while a whole-disk holder is waiting or holding.  The unlocked check is
        the per-request fast path; a holder that arrives just after it is still excluded
        by the range lock itself (the turnstile only gives it priority)."""
        if not self._draining:
            return
        with self._turnstile:
            while self._draining:
                self._turnstile.wait()
