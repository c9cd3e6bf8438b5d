"""Byte-range locks with shared and exclusive holders.

Used where an operation must not interleave with another on the same bytes: a
read of the secondary's ``active`` view against a primary write whose
copy-before-write is half done, a checkpoint against any write, a partial
cluster's read-modify-write against a neighbour in the same cluster.

Holders are few (one per request in progress, so at most the number of nbdkit
threads plus background jobs), so a list scanned under one condition variable
is both simple and fast; there is no fairness beyond what the condition gives.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class RangeLock:
    def __init__(self) -> None:
        # Guards _held; waiters sleep on it until an overlapping holder leaves.
        self._cond = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int, bool]] = []  # (start, end, exclusive)

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        for s, e, x in self._held:
            if s < end and start < e and (exclusive or x):
                return True
        return False

    def acquire(self, start: int, end: int, exclusive: bool = True) -> tuple[int, int, bool]:
        entry = (start, end, exclusive)
        with self._cond:
            while self._conflicts(start, end, exclusive):
                self._cond.wait()
            self._held.append(entry)
        return entry

    def release(self, entry: tuple[int, int, bool]) -> None:
        with self._cond:
            self._held.remove(entry)
            self._cond.notify_all()

    @contextmanager
    def exclusive(self, start: int, end: int) -> Iterator[None]:
        entry = self.acquire(start, end, True)
        try:
            yield
        finally:
            self.release(entry)

    @contextmanager
    def shared(self, start: int, end: int) -> Iterator[None]:
        entry = self.acquire(start, end, False)
        try:
            yield
        finally:
            self.release(entry)
