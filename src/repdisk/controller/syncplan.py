"""The controller's initial sync and checksum resync: which granules of the primary's disk
the secondary lacks, found without copying the disks.

:class:`SyncPlan` walks the disks in pieces (so digests of a 1 TiB disk never sit in one
message, and progress can be reported between pieces), asking both nodes for a piece's
digests (``query-digests``) or data runs (``query-allocation``) at once, and marks what
differs dirty in the primary (``replication-mark-dirty``); the primary's own copy then
sends it.  :class:`Progress` turns bytes done into a rate and an ETA.  The node side
(digests, data runs) is repdisk.replication.resync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from repdisk.replication.resync import GRANULARITY, PIECE, Run, differing_runs, merge_runs

log = logging.getLogger(__name__)

#: How ``repdisk controller --initial-sync`` finds what the secondary lacks.
SYNC_MODES = ("checksum", "full", "none")


@dataclass
class Progress:
    """Bytes done of a total, with a rate and an ETA; ``phase`` says what is being done."""
    phase: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = max(total, done)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "done": self.done, "total": self.total,
                "rate": round(self.rate), "eta": None if self.eta is None else round(self.eta, 1),
                "elapsed": round(time.monotonic() - self.started, 3)}

    def line(self) -> str:
        eta = "?" if self.eta is None else f"{self.eta:.0f}s"
        pct = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.phase} {self.done / 2**20:.1f}/{self.total / 2**20:.1f} MiB "
                f"({pct:.0f}%) {self.rate / 2**20:.1f} MiB/s ETA {eta}")


Call = Callable[[str, dict[str, Any]], Any]


@dataclass
class SyncPlan:
    """Find what must be copied so that the secondary's disk equals the primary's.

    ``primary`` and ``secondary`` run a node command and return its result.  ``mode``:
    ``checksum`` marks the granules whose digests differ; ``full`` marks every run that
    holds data on either side (the primary's data, and the secondary's data where the
    primary has holes, which the copy then turns into zeros).  The marks go into the
    primary's dirty map; nothing is copied here.
    """
    primary: Call
    secondary: Call
    disks: list[tuple[str, int]]              # (name, size)
    mode: str = "checksum"
    granularity: int = GRANULARITY
    piece: int = PIECE
    on_progress: Callable[[Progress], None] = lambda p: None
    marked: int = 0                           # bytes in the runs marked
    dirty: dict[str, int] = field(default_factory=dict)  # each disk's dirty bytes after

    def run(self) -> int:
        """Compare every disk piece by piece; returns the bytes marked dirty."""
        if self.mode not in ("checksum", "full"):
            raise ValueError(f"unknown sync mode {self.mode!r}: use checksum or full")
        progress = Progress("compare" if self.mode == "checksum" else "scan",
                            sum(size for _, size in self.disks))
        base = 0
        with ThreadPoolExecutor(max_workers=1) as pool:
            for name, size in self.disks:
                for offset in range(0, size, self.piece):
                    length = min(self.piece, size - offset)
                    runs = self._piece(pool, name, size, offset, length)
                    if runs:
                        res = self.primary("replication-mark-dirty",
                                           {"disk": name, "runs": [list(r) for r in runs]})
                        self.marked += sum(n for _, n in runs)
                        self.dirty[name] = res["dirty_bytes"]
                    progress.update(base + offset + length)
                    self.on_progress(progress)
                base += size
        log.info("%s sync: %d of %d bytes differ", self.mode, self.marked, progress.total)
        return self.marked

    def _piece(self, pool: ThreadPoolExecutor, name: str, size: int, offset: int,
               length: int) -> list[Run]:
        """Ask both nodes about one piece at once (the secondary's answer in a thread)."""
        if self.mode == "checksum":
            args = {"disk": name, "offset": offset, "length": length,
                    "granularity": self.granularity}
            theirs = pool.submit(self.secondary, "query-digests", args)
            ours = self.primary("query-digests", args)
            return differing_runs(offset, self.granularity, ours["digests"],
                                  theirs.result()["digests"], size)
        args = {"disk": name, "offset": offset, "length": length}
        theirs = pool.submit(self.secondary, "query-allocation", args)
        ours = self.primary("query-allocation", args)
        return merge_runs([tuple(r) for r in ours["runs"] + theirs.result()["runs"]])
