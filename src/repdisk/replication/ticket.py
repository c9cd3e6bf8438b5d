"""Tickets: one request handed to the forwarder, and how its submitter waits for it.

A ticket is born pending (``done`` False) and settles once, on the forwarder's I/O
thread: acknowledged (``ok``) or failed.  ``wait`` blocks on a lock held from creation
until the ticket settles; a ticket of a pulled piece has no lock (nobody holds it).  A
batch record is a ticket too: its ``parts`` are the writes it carries, its ``members``
their tickets, settled with it.

Buffers: a ticket lets go of its buffer when it settles, which the forwarder does only
after libnbd has retired its command (success) or the handle is closed (failure), so a
submitter may reuse a buffer it passed as a memoryview as soon as ``wait`` returns.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

log = logging.getLogger(__name__)

__all__ = ["WRITE", "ZERO", "TRIM", "FLUSH", "READ", "BARRIER", "Ticket", "TicketOwner",
           "rejected"]

#: Request kinds (``Ticket.kind``); a barrier is the flush that ends ``Forwarder.barrier``.
WRITE, ZERO, TRIM, FLUSH, READ = "write", "zero", "trim", "flush", "read"
BARRIER = "barrier flush"
# How long an expired Ticket.wait waits for the I/O thread to close the handle; closing
# a Unix/TCP socket takes microseconds, so this only matters if the I/O thread is wedged.
ABORT_GRACE = 1.0


class TicketOwner(Protocol):
    """What a ticket tells the forwarder it was submitted to."""

    #: Tickets whose command libnbd has completed, for the I/O thread to settle: a
    #: ticket appends itself inside ``aio_notify_*``, on that thread.
    completions: list[Ticket]

    def ticket_expired(self, t: Ticket, timeout: float | None) -> None:
        """A waiter gave up on ``t`` after ``timeout`` seconds (any thread)."""


class Ticket:
    """One submitted request; ``wait`` for the secondary's acknowledgement.

    ``seq`` is the submission order; ``rejected`` means the forwarder was already failed
    (or not connected) at submission, so this range reaches no ``on_failure`` call.
    ``err`` is the errno libnbd reported for it (0: none).
    """

    __slots__ = ("kind", "offset", "length", "buf", "fua", "seq", "t0", "done", "ok",
                 "rejected", "drained", "pulled", "parts", "members", "grains", "data", "err",
                 "_settled", "_owner")

    def __init__(self, owner: TicketOwner | None, kind: str, offset: int, length: int,
                 buf: Any = None, fua: bool = False, pulled: bool = False) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        # What is sent: bytes or a memoryview for a write, an nbd.Buffer for a read.
        self.buf = buf
        self.fua = fua
        self.seq = -1
        self.t0 = 0.0
        self.done = False
        self.ok = False
        self.rejected = False
        self.drained = -1  # a draining barrier: the source's empty rounds when it arrived
        self.pulled = pulled  # taken from the source: nobody waits for it
        # A batch record (batch.py): its writes' (offset, length), sorted; ``offset`` is
        # then the lowest, ``length`` the bytes of them all and ``buf`` the record.
        self.parts: list[tuple[int, int]] | None = None
        self.members: list[Ticket] | None = None  # the writes a record carries
        self.grains: set[int] | None = None  # a record's overlap-index blocks, in flight
        self.data: bytearray | None = None  # a read's bytes, once it succeeded
        self.err = 0
        self._owner = owner
        # Held from creation until the request is settled; waiters block on it (none for
        # a pulled piece: nobody has its ticket).
        self._settled: threading.Lock | None = None if pulled else threading.Lock()
        if self._settled is not None:
            self._settled.acquire()

    def __repr__(self) -> str:
        state = "ok" if self.ok else "failed" if self.done else "pending"
        return f"<Ticket #{self.seq} {self.what()} {state}>"

    def what(self) -> str:
        """What messages call it: ``write [a, b)`` or ``batch of N pieces in [a, b)``."""
        spans = self.spans()
        where = f"[{spans[0][0]}, {spans[-1][0] + spans[-1][1]})"
        return f"batch of {len(spans)} pieces in {where}" if self.parts else f"{self.kind} {where}"

    def spans(self) -> list[tuple[int, int]]:
        """The (offset, length) ranges of the disk it changes, sorted."""
        return self.parts if self.parts is not None else [(self.offset, self.length)]

    def wait(self, timeout: float | None = None) -> bool:
        """True once the secondary acknowledged; False if it failed or ``timeout`` expired.

        An expired wait fails the forwarder (see forwarder.py) and returns once the
        handle is closed and ``on_failure`` has run: microseconds past ``timeout`` plus
        the callback's own time (at most ``ABORT_GRACE`` more, in case the I/O thread
        is wedged).  Only for a ticket someone holds (never a pulled piece's).
        """
        owner = self._owner  # read first: settling clears it
        if self.done:
            return self.ok
        assert self._settled is not None
        if self._settled.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._settled.release()
            return self.ok
        assert owner is not None  # a ticket without forwarder is born done
        owner.ticket_expired(self, timeout)
        if self._settled.acquire(timeout=ABORT_GRACE):
            self._settled.release()
        else:
            log.error("forwarder I/O thread did not abort within %ss; %r returns anyway",
                      ABORT_GRACE, self)
        return self.ok

    def settle(self, ok: bool) -> None:
        """Mark done and wake waiters; the I/O thread calls this once per ticket."""
        self.ok = ok
        self.done = True
        self.buf = None
        self._owner = None
        if self._settled is not None:
            self._settled.release()

    def completed(self, err: Any) -> int:
        """libnbd's completion callback (runs inside aio_notify_*): note ``err``'s errno,
        join its forwarder's ``completions`` to be settled, and retire the command (1)."""
        self.err = err.value
        owner = self._owner
        if owner is not None:
            owner.completions.append(self)
        return 1


def rejected(kind: str, offset: int, length: int) -> Ticket:
    """A ticket already failed at submission (no forwarder connected)."""
    t = Ticket(None, kind, offset, length)
    t.rejected = True
    t.settle(False)
    return t
