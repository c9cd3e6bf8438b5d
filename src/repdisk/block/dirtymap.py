"""A thread-safe set of dirty byte ranges at a granularity.

The primary keeps one per disk for "writes not known to be on the secondary": a write
that could not be forwarded marks its range, and resync copies the runs and clears them.

The map stores disjoint, non-adjacent runs of granules as two sorted lists (starts and
ends), so every operation costs O(log runs + runs touched) and memory is O(runs), never
O(disk size): a fully dirty 1 TiB disk is one run.  Granule ``g`` covers bytes
``[g * granularity, (g + 1) * granularity)``, the last one clamped to the disk's size.

Marks made outside Python (the async primary's C fast path, fastpath.py) reach the map
through a feed (:meth:`DirtyMap.feed_from`): every read or clear of the map first takes in
what the feed has, under the map's lock, so no reader sees the map without a mark made
before its call.

Persistence (:meth:`DirtyMap.save` / :meth:`DirtyMap.load`) is a small JSON file of byte
runs, replaced atomically (:func:`~repdisk.durable.replace_file`): a primary saves its
maps at a clean stop and reads them back at its next start (node.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any

from repdisk.durable import replace_file

log = logging.getLogger(__name__)

__all__ = ["DirtyMap"]

MAGIC = "repdisk-dirtymap"
FORMAT_VERSION = 1


class DirtyMap:
    """Dirty regions of a ``size``-byte disk, tracked in ``granularity``-byte granules."""

    def __init__(self, size: int, granularity: int = 65536) -> None:
        if size <= 0:
            raise ValueError(f"dirty map: size must be positive, not {size}")
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"dirty map: granularity {granularity} is not a power of two")
        self.size = size
        self.granularity = granularity
        self._ngranules = (size + granularity - 1) // granularity
        # Guards _starts, _ends and _count.
        self._lock = threading.Lock()
        self._starts: list[int] = []  # granule runs [start, end), sorted, disjoint, not adjacent
        self._ends: list[int] = []
        self._count = 0               # dirty granules
        self._feed: Callable[[], list[tuple[int, int]]] | None = None

    def __repr__(self) -> str:
        return (f"DirtyMap(size={self.size}, granularity={self.granularity}, "
                f"dirty_bytes={self.dirty_bytes})")

    def _check(self, offset: int, length: int) -> None:
        if length < 0 or offset < 0 or offset + length > self.size:
            raise ValueError(f"dirty map: range [{offset}, {offset + length}) is outside the "
                             f"{self.size}-byte disk")

    def _touching(self, offset: int, length: int) -> tuple[int, int]:
        """Granules ``[first, end)`` that share at least one byte with the range."""
        g = self.granularity
        return offset // g, (offset + length + g - 1) // g

    def _inside(self, offset: int, length: int) -> tuple[int, int]:
        """Granules ``[first, end)`` wholly inside the range (the disk's end closes the last)."""
        g = self.granularity
        stop = offset + length
        end = self._ngranules if stop == self.size else stop // g
        return (offset + g - 1) // g, end

    def feed_from(self, feed: Callable[[], list[tuple[int, int]]]) -> None:
        """Take in ``feed()``'s ``(offset, length)`` ranges (inside the disk, each marked
        once) before every read or clear of the map; ``feed`` is called with the map's
        lock held, so it must not use the map."""
        self._feed = feed

    def _take_feed(self) -> None:
        """Mark what the feed has (``_lock`` held)."""
        if self._feed is not None:
            for offset, length in self._feed():
                self._mark_locked(offset, length)

    def _mark_locked(self, offset: int, length: int) -> None:
        """Mark the granules a non-empty range touches (``_lock`` held)."""
        first, end = self._touching(offset, length)
        self._count += self._add(first, end)

    # --- updates ---

    def mark(self, offset: int, length: int) -> None:
        """Mark every granule the range touches as dirty (an empty range marks nothing)."""
        self._check(offset, length)
        if length:
            with self._lock:
                self._mark_locked(offset, length)

    def clear(self, offset: int, length: int) -> None:
        """Clear the granules wholly inside the range, as returned by :meth:`runs`.

        A granule the range covers only in part stays dirty: clearing never forgets a byte
        that a caller did not say was clean.
        """
        self._check(offset, length)
        first, end = self._inside(offset, length)
        if first < end:
            with self._lock:
                self._take_feed()
                self._count -= self._remove(first, end)

    def take_last(self, limit: int, count: int, budget: int) -> list[tuple[int, int]]:
        """Clear and return the ends of the highest dirty runs, highest first, as
        ``(offset, length)``: at most ``count`` pieces of at most ``limit`` bytes (at least
        one granule) each, taken while fewer than ``budget`` bytes are; [] if clean.

        For a copier that sends what is dirty in rounds (the async primary's forwarder):
        one lock round for a round's pieces.  The highest, not the lowest: taking one
        shortens or drops the last run, O(1), where the first would shift every run
        after it."""
        g = self.granularity
        most = max(limit // g, 1)
        pieces: list[tuple[int, int]] = []
        taken = 0
        with self._lock:
            self._take_feed()
            starts, ends = self._starts, self._ends
            while starts and len(pieces) < count and taken < budget:
                start, end = starts[-1], ends[-1]
                cut = end - most
                if cut > start:
                    ends[-1] = cut
                else:
                    cut = start
                    del starts[-1], ends[-1]
                self._count -= end - cut
                offset = cut * g
                length = min(end * g, self.size) - offset
                pieces.append((offset, length))
                taken += length
        return pieces

    def clear_all(self) -> None:
        with self._lock:
            self._take_feed()
            self._starts.clear()
            self._ends.clear()
            self._count = 0

    def _add(self, start: int, end: int) -> int:
        """Insert granules ``[start, end)``, merging touching runs; returns granules added."""
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, start)      # first run ending at or after start
        j = bisect_right(starts, end)     # runs starting at or before end
        covered = sum(ends[k] - starts[k] for k in range(i, j))
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]
        return end - start - covered

    def _remove(self, start: int, end: int) -> int:
        """Remove granules ``[start, end)``, splitting runs; returns granules removed."""
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, start)     # first run ending after start
        j = bisect_left(starts, end)      # runs starting before end
        if i >= j:
            return 0
        if j == i + 1 and start <= starts[i]:  # one run, cut from its start
            if ends[i] <= end:
                removed = ends[i] - starts[i]
                del starts[i], ends[i]
                return removed
            removed, starts[i] = end - starts[i], end
            return removed
        removed = sum(min(ends[k], end) - max(starts[k], start) for k in range(i, j))
        new_starts, new_ends = [], []
        if starts[i] < start:
            new_starts.append(starts[i])
            new_ends.append(start)
        if ends[j - 1] > end:
            new_starts.append(end)
            new_ends.append(ends[j - 1])
        starts[i:j] = new_starts
        ends[i:j] = new_ends
        return removed

    # --- queries ---

    def is_dirty(self, offset: int, length: int) -> bool:
        """True if any granule the range touches is dirty."""
        self._check(offset, length)
        if not length:
            return False
        first, end = self._touching(offset, length)
        with self._lock:
            self._take_feed()
            i = bisect_right(self._ends, first)   # first run ending after `first`
            return i < len(self._starts) and self._starts[i] < end

    @property
    def dirty_bytes(self) -> int:
        """Dirty bytes (whole granules, the last one clamped to the disk's size); O(1)."""
        with self._lock:
            self._take_feed()
            total = self._count * self.granularity
            if self._ends and self._ends[-1] == self._ngranules:
                total -= self._ngranules * self.granularity - self.size
            return total

    def __bool__(self) -> bool:
        with self._lock:
            self._take_feed()
            return bool(self._starts)

    def runs(self) -> list[tuple[int, int]]:
        """Dirty ``(offset, length)`` byte runs, sorted, coalesced, clamped to the size."""
        g = self.granularity
        with self._lock:
            self._take_feed()
            return [(s * g, min(e * g, self.size) - s * g)
                    for s, e in zip(self._starts, self._ends, strict=True)]

    # --- persistence ---

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the map to ``path`` atomically: a crash leaves the old file or the new one."""
        doc = {"magic": MAGIC, "version": FORMAT_VERSION, "size": self.size,
               "granularity": self.granularity, "runs": self.runs()}
        replace_file(path, json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike[str], size: int, granularity: int = 65536) -> DirtyMap:
        """Read a map saved by :meth:`save` for a ``size``-byte disk.

        A file saved at another granularity is re-marked at this one (a superset: never a
        dirty byte lost).  Raises FileNotFoundError if there is no file, ValueError if it
        is corrupt or was saved for a disk of another size.
        """
        name = os.fspath(path)
        with open(name, encoding="utf-8") as f:
            try:
                doc = json.load(f)
            except ValueError:
                raise ValueError(f"dirty map {name}: not valid JSON; remove it and resync "
                                 f"the whole disk") from None
        runs = cls._parse(name, doc)
        if doc["size"] != size:
            raise ValueError(f"dirty map {name}: saved for a {doc['size']}-byte disk, "
                             f"but the disk is {size} bytes")
        if doc["granularity"] != granularity:
            log.info("dirty map %s: converting granularity %d to %d", name,
                     doc["granularity"], granularity)
        dirty = cls(size, granularity)
        for offset, length in runs:
            dirty.mark(offset, length)
        return dirty

    @staticmethod
    def _parse(name: str, doc: Any) -> list[tuple[int, int]]:
        """Validate a loaded document and return its runs."""
        def bad(why: str) -> ValueError:
            return ValueError(f"dirty map {name}: {why}; remove it and resync the whole disk")

        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise bad("not a repdisk dirty map")
        if doc.get("version") != FORMAT_VERSION:
            raise bad(f"format version {doc.get('version')!r}, expected {FORMAT_VERSION}")
        for key in ("size", "granularity"):
            if not isinstance(doc.get(key), int) or doc[key] <= 0:
                raise bad(f"field {key!r} is {doc.get(key)!r}, expected a positive integer")
        runs = doc.get("runs")
        if not isinstance(runs, list):
            raise bad("field 'runs' is not a list")
        out = []
        for run in runs:
            if (not isinstance(run, list) or len(run) != 2
                    or not all(isinstance(v, int) for v in run)
                    or run[0] < 0 or run[1] <= 0 or run[0] + run[1] > doc["size"]):
                raise bad(f"bad run {run!r}")
            out.append((run[0], run[1]))
        return out
