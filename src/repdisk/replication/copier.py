"""The primary's copier: what is dirty goes to the secondary, and the disks are compared.

:meth:`Copier.copy` sends every dirty region (start, resync, a clean close of an async
primary), paced by the ``resync-rate`` (resyncrate.py), at most SEND_BUDGET bytes and
``window`` pieces in flight.  Each piece is cleared, read and submitted under its range
lock, so it takes its place in the forwarder's order among the guest's writes
(writepath.py); what is not acknowledged is dirty again, so the next resync continues
from there.  :meth:`Copier.compare` marks dirty where the secondary's disk differs (by
digest; a primary that did not stop cleanly), :meth:`Copier.verify` finds the exact
bytes that differ.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from repdisk.errors import ForwardError
from repdisk.replication import resync, resyncrate
from repdisk.replication.framework import ReplicationError
from repdisk.replication.link import Link
from repdisk.replication.resync import differing_bytes, merge_runs
from repdisk.replication.resyncrate import ResyncRate
from repdisk.replication.stage import StageMachine
from repdisk.replication.ticket import Ticket
from repdisk.replication.writepath import WritePath

log = logging.getLogger(__name__)

__all__ = ["Copier", "Progress", "SEND_BUDGET", "PROGRESS_INTERVAL"]

#: A copy keeps at most this many payload bytes queued or in flight (its memory bound).
SEND_BUDGET = 16 << 20
#: RESYNC_PROGRESS events are sent at most this often (the progress callback sees every chunk).
PROGRESS_INTERVAL = 0.5

Progress = Callable[[int, int], None]
Runs = list[tuple[int, int]]


class Copier:
    """Copies and compares one primary disk; called by the replica's transitions only."""

    def __init__(self, name: str, path: WritePath, link: Link, sm: StageMachine, *,
                 rate: ResyncRate, piece_size: int) -> None:
        self.name = name
        self._path = path
        self._link = link
        self._sm = sm
        self.disk = path.disk
        self.dirty = path.dirty
        self.rate = rate
        self._piece_size = piece_size
        # Guards sent.
        self._count_lock = threading.Lock()
        #: Pieces submitted to the secondary (query-replication's forwarded, with the
        #: guest's writes).
        self.sent = 0
        #: A verify under way: {"done", "total"} bytes (query-replication), else None.
        self.verify_progress: dict[str, int] | None = None

    @property
    def timeout(self) -> float:
        return self._link.timeout

    def pacer(self) -> resyncrate.Pacer:
        """A copy's pacing by the rate: the guest's writes are the activity it backs off
        from; pieces and window are the copy's own limits."""
        path = self._path
        return resyncrate.Pacer(self.rate, lambda: path.last_write, self._piece_size,
                                self._link.window, self.dirty.granularity)

    # -- copying what is dirty ------------------------------------------------------------

    def copy(self, progress: Progress | None) -> int:
        """Send every dirty region to the secondary (writes flowing), then a barrier; raise
        ReplicationError if the link fails.  Returns the bytes sent.

        Sync mode goes over what became dirty meanwhile (writes that chose "not
        forwarding" just before the link came up) until nothing is left.  Async mode
        makes one pass: writes keep marking, and the forwarder's pulls carry on from there.
        """
        last_event = 0.0

        def report(done: int) -> None:
            nonlocal last_event
            total = done + self.dirty.dirty_bytes
            if progress is not None:
                progress(done, total)
            if time.monotonic() - last_event >= PROGRESS_INTERVAL:
                last_event = time.monotonic()
                self._sm.progress("RESYNC", done, total)

        done = self._send_dirty(chase=not self._path.write_back, report=report)
        fwd = self._link.sending
        # Not draining: async writes may keep the dirty map from ever running dry.
        if fwd is None or not fwd.barrier(self.timeout, drain=False):
            self._failed()
        self._sm.progress("RESYNC", done, done)
        self._path.pull()
        return done

    def _send_dirty(self, chase: bool = True,
                    report: Callable[[int], None] | None = None) -> int:
        """Send the dirty runs, SEND_BUDGET bytes and ``window`` pieces at most in flight;
        returns the bytes sent once they are all acknowledged.  ``chase``: go on until the
        map is empty, else one pass over the runs dirty at the start.  Raises
        ReplicationError (what was not acknowledged is dirty again) if the link fails.
        """
        done = 0
        pending: deque[Ticket] = deque()
        in_flight = 0
        pacer = self.pacer()
        while runs := self.dirty.runs():
            for offset, length in runs:
                end = offset + length
                while offset < end:
                    step = pacer.step()
                    clen = min(step.piece, end - offset)
                    while pending and (in_flight + clen > SEND_BUDGET
                                       or len(pending) >= step.in_flight):
                        in_flight -= self._settle(pending.popleft())
                    pacer.pace(clen, step)
                    pending.append(self._copy_piece(offset, clen))
                    in_flight += clen
                    done += clen
                    offset += clen
                    if report is not None:
                        report(done)
            if not chase:
                break
        while pending:
            self._settle(pending.popleft())
        return done

    def _copy_piece(self, offset: int, length: int) -> Ticket:
        """Clear a dirty piece's bits, read it and send it (under its range lock)."""
        path = self._path
        with path.locks.exclusive(offset, offset + length):
            self.dirty.clear(offset, length)
            buf = path.blocks.read_cleared(self.disk.pread_into, self.dirty,
                                           [(offset, length)])[0][1]
            fwd = self._link.sending
            try:
                ticket = None if fwd is None else fwd.submit_write(memoryview(buf), offset)
            except BaseException:
                self.dirty.mark(offset, length)
                raise
            if ticket is None or (ticket.done and not ticket.ok):
                self.dirty.mark(offset, length)  # not forwarding, or the forwarder failed
                ticket = None
        path.piece_sent()
        if ticket is None:
            self._failed()
        assert ticket is not None
        with self._count_lock:
            self.sent += 1
        return ticket

    def _settle(self, ticket: Ticket) -> int:
        """Wait for a piece's acknowledgement; its length, or ReplicationError."""
        if not ticket.wait(self.timeout):
            self._failed()
        return ticket.length

    def _failed(self) -> None:
        """Stop copying: what is left stays dirty, so the next resync continues from here."""
        fwd = self._link.forwarder
        uri = self._link.uri
        if fwd is not None and fwd.errno == errno.ESHUTDOWN:  # secondary's gate: stage NONE
            raise ReplicationError(
                f"{self.name}: the secondary {uri} is not started yet: start "
                "it first (repdisk ctl SECONDARY-CONTROL start mode=secondary), then this "
                f"primary; {self.dirty.dirty_bytes} bytes wait to be copied")
        why = (fwd.error if fwd else None) or f"no answer within {self.timeout:g}s"
        raise ReplicationError(f"{self.name}: resync stopped: the secondary "
                               f"{uri} failed: {why}; "
                               f"{self.dirty.dirty_bytes} bytes remain dirty, resync again")

    # -- comparing ------------------------------------------------------------------------

    def compare(self) -> None:
        """Mark dirty every granule where the secondary's disk differs from this one (by
        digest, resync.differing_granules); then the ordinary copy sends them.  Writes
        made meanwhile are marked as usual, so a granule compared before one is not lost."""
        began = time.monotonic()
        try:
            runs = resync.differing_granules(self.disk, self._link.export_uri, self.timeout)
        except ForwardError as err:
            raise ReplicationError(f"{self.name}: cannot compare the disks, so nothing is "
                                   f"copied yet: {err}") from err
        for offset, length in runs:
            self.dirty.mark(offset, length)
        log.warning("%s: compared with the secondary in %.1fs: %d bytes differ", self.name,
                    time.monotonic() - began, sum(n for _, n in runs))

    def verify(self, runs: Runs, progress: Progress | None) -> Runs:
        """The exact byte runs of ``runs`` that differ between the disks (coalesced), the
        link UP; see PrimaryReplica.verify."""
        total = sum(n for _, n in runs)
        self.verify_progress = {"done": 0, "total": total}
        try:
            return self._verify_runs(runs, total, progress)
        finally:
            self.verify_progress = None

    def _verify_runs(self, runs: Runs, total: int, progress: Progress | None) -> Runs:
        found: Runs = []
        pacer, done, last_event = self.pacer(), 0, 0.0
        for offset, length in merge_runs(runs):
            end = offset + length
            while offset < end:
                step = pacer.step()
                n = min(step.piece, end - offset)
                pacer.pace(n, step)
                found += self._verify_piece(offset, n, done, total, found)
                offset += n
                done += n
                self.verify_progress = {"done": done, "total": total}
                if progress is not None:
                    progress(done, total)
                if time.monotonic() - last_event >= PROGRESS_INTERVAL:
                    last_event = time.monotonic()
                    self._sm.progress("VERIFY", done, total)
        self._sm.progress("VERIFY", done, total)
        return merge_runs(found)

    def _verify_piece(self, offset: int, length: int, done: int, total: int,
                      found: Runs) -> Runs:
        """The differing runs of one piece; under the write-back, a difference is compared
        again (twice at most, each time once the writers have settled), and what is
        unsent is not one."""
        path = self._path
        diffs = self._compare_piece(offset, length, done, total, found)
        if not path.write_back:
            return diffs
        for _ in range(2):
            if not diffs:
                break
            path.settled(self.timeout / 2)
            diffs = [d for o, n in diffs if not path.unsent(o, n)
                     for d in self._compare_piece(o, n, done, total, found)]
        return [r for r in diffs if not path.unsent(*r)]

    def _compare_piece(self, offset: int, length: int, done: int, total: int,
                       found: Runs) -> Runs:
        local = bytearray(length)
        with self._path.locks.exclusive(offset, offset + length):
            fwd = self._link.sending
            ticket = None if fwd is None else fwd.submit_read(offset, length)
            self.disk.pread_into(memoryview(local), offset)
        if ticket is None or not ticket.wait(self.timeout) or ticket.data is None:
            fwd = self._link.forwarder
            why = (fwd.error if fwd else None) or f"no answer within {self.timeout:g}s"
            raise ReplicationError(
                f"{self.name}: verify stopped at {done} of {total} bytes: the secondary "
                f"{self._link.uri} failed: {why}; {len(found)} differing ranges found "
                f"before it: {found[:16]}")
        return differing_bytes(offset, local, ticket.data)
