"""The primary's link to its secondary: guest writes forwarded over one NBD connection.

Design note
-----------
One libnbd handle, owned by ONE I/O thread that runs its own ``poll`` loop.  Why not
a handle per nbdkit thread, or ``h.poll()``: a synchronous handle per thread has one
request in flight per thread, each waiting for its reply, and libnbd keeps its handle
lock inside ``poll()``, so a thread blocked in ``h.poll(-1)`` stalls every other
thread's ``aio_pwrite``.  Here
submitting threads never touch the handle: they append a ``Ticket`` to ``_incoming``
under ``_lock`` and wake the I/O thread through an eventfd (once per batch, not once
per request).  Each round the I/O thread takes the whole batch, sends what it may,
checks deadlines, waits on the handle's fd (direction from ``aio_get_direction``) and
the eventfd, and retires what completed.

Order.  Requests leave in submission order (``Ticket.seq``).  NBD servers may run
requests in parallel, so a request whose bytes overlap an in-flight one waits at the
head of the queue, and nothing behind it is sent (the queue is never reordered).  A
flush waits until no earlier request is in flight.  ``window`` bounds in-flight
requests.  While held (``hold()``), requests submitted after the hold stay queued;
a barrier's flush is the one request that may pass them, because it carries no data.

Pulling.  A forwarder may have a ``source``: a function the I/O thread calls as
``source(count, budget)`` to get the next pieces to write (at most ``count``, taken
while fewer than ``budget`` bytes are), ``(pieces, placed)`` with ``pieces`` a list of
``(offset, buffer)``, or None when there is nothing (the async primary's dirty map).
``pull()`` asks the I/O thread to call it; it then takes pieces while the window has
room and less than ``PULL_BUDGET`` bytes are in flight, so a write that went through
the source costs no hand-off between threads; with a ``pull_delay``, a round starts at
most that long after the last one came up empty, so pieces go in rounds.  The source
returns pieces with their ranges still locked against the writers that submit requests
(they submit under that lock), and the forwarder takes the pieces' places in the order
before it calls ``placed()`` to unlock them: after every request whose bytes were read
before the pieces' (older bytes of the same range) and before every request whose
bytes are read after (newer ones), so the order rule above holds for pieces too.  With
a source, a draining barrier also waits for the source to come up empty after the
barrier arrived, and for every piece taken before that.  A ``source_wake``, ``(fd,
rearm)``, is a second way to ask for a pull: the I/O thread polls the eventfd ``fd`` and
takes its becoming readable as a ``pull()``, and calls ``rearm()`` where it clears a pull
asked for, just before it looks at the source (the C fast path's marks, fastpath.py).

Batches.  With ``batch``, the forwarder connects to the export's batch twin
(batch.py), and the small writes at the head of the queue that may all go now,
pushed or pulled alike, go as one batch record: one request whose ``parts`` are
checked for overlap (overlap.py: an index of the 4 KiB blocks of the records in
flight) and reported on a failure piece by piece, and whose acknowledgement settles
every write it carries.

Failure.  A request completing with an error, a dead connection, or a request
unacknowledged ``timeout`` seconds after submission (after ``release()`` for held
ones) fails the forwarder, once: submissions stop being accepted, the handle is
closed (libnbd then has released every caller buffer), ``on_failure(error, ranges)``
gets every write/zero/trim submitted but not acknowledged, and only then do waiters
return False.  A ``Ticket.wait`` that expires is the same verdict: the caller gave up
on the secondary, so the forwarder fails (the caller cannot know what landed).
Submissions after a failure (or before ``connect``) return a ticket that is already
failed and ``rejected``: its range is in no ``on_failure`` call, the caller marks it
dirty itself.

Buffers.  A caller may reuse a buffer it passed as soon as ``wait`` returns (ticket.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

import nbd

from repdisk import tls
from repdisk.errors import ForwardError
from repdisk.replication import batch as _batch
from repdisk.replication.batch import BATCH_BYTES, BATCH_PIECES, BATCHES_IN_FLIGHT, groupable
from repdisk.replication.nbdclient import POLL_EVENTS, READABLE, pump
from repdisk.replication.overlap import OverlapIndex
from repdisk.replication.ticket import (
    BARRIER,
    FLUSH,
    READ,
    TRIM,
    WRITE,
    ZERO,
    Ticket,
    rejected,
)
from repdisk.uri import export_name, with_export_suffix

log = logging.getLogger(__name__)

__all__ = ["Forwarder", "FailureCallback", "Source", "SourceWake", "PULL_BUDGET"]

#: ``on_failure(error, ranges)``: ranges are (offset, length) of unacknowledged writes.
FailureCallback = Callable[[str, list[tuple[int, int]]], None]
#: ``source(count, budget)``: the next pieces to write, ``([(offset, buffer), ...], placed)``,
#: or None; their ranges stay locked against writers until the forwarder calls ``placed()``
#: (see Pulling).
Source = Callable[[int, int],
                  "tuple[list[tuple[int, bytes | bytearray]], Callable[[], None]] | None"]
#: ``(fd, rearm)``: an eventfd readable when the source has more, and what the I/O thread
#: calls just before it looks at the source, after which it becomes readable again.
SourceWake = tuple[int, Callable[[], None]]
#: Pulling stops while this many payload bytes are in flight.
PULL_BUDGET = 16 << 20

_DRAIN = -2  # Ticket.drained of a draining barrier until the I/O thread takes it
_STAT = {ZERO: "zeros", TRIM: "trims", FLUSH: "flushes", BARRIER: "flushes", READ: "reads"}
_INF = float("inf")



def failed_text(uri: str, what: str, why: str) -> str:
    """How a request the secondary failed is reported (``what``: Ticket.what)."""
    return f"secondary {uri} failed {what}: {why}"


def late_text(uri: str, what: str, timeout: float) -> str:
    """How a request the secondary did not answer in time is reported."""
    return f"secondary {uri} did not acknowledge {what} within {timeout}s"

class Forwarder:
    """Sends writes to the secondary's ``replica`` export, many in flight, never stalling.

    Public state (read from any thread): ``failed``, ``error``, ``errno`` (of the first
    request the secondary refused, 0 if none), ``size``, ``in_flight``,
    ``queued``, ``in_flight_bytes`` (payload of in-flight writes), ``stats``.
    """

    def __init__(self, uri: str, *, timeout: float = 5.0, window: int = 64,
                 on_failure: FailureCallback | None = None,
                 export_suffix: str = "", session_tag: str = "",
                 source: Source | None = None, pull_delay: float = 0.0,
                 batch: bool = False, source_wake: SourceWake | None = None) -> None:
        if window < 1:
            raise ValueError(f"forwarder window must be at least 1, not {window}")
        self.uri = with_export_suffix(uri, export_suffix)  # what messages name
        # What is connected to: the batch twin of the export if batching (batch.py), the
        # primary's writer-session tag last (sessions.py).
        self._batch = batch
        #: The writer session this connection writes in ("" for none), for its twins.
        self.session_tag = session_tag
        self._connect_uri = with_export_suffix(
            uri, export_suffix + (_batch.EXPORT_SUFFIX if batch else "") + session_tag)
        self.timeout = timeout
        self.window = window
        self.on_failure = on_failure
        self._source = source
        self._source_wake = source_wake
        self._pull_delay = pull_delay
        self.size = 0
        self.failed = False
        self.error: str | None = None
        self.errno = 0
        self.stats = {"writes": 0, "zeros": 0, "trims": 0, "flushes": 0, "bytes": 0,
                      "errors": 0, "pulled": 0, "batches": 0, "reads": 0}
        # Guards everything submitters touch: _incoming, _accepting, _seq, _hold_seq,
        # _released, _stop, _wake_pending, _pull_wanted, _thread and the failed/error
        # transition.
        self._lock = threading.Lock()
        self._incoming: list[Ticket] = []
        self._accepting = False
        self._seq = 0
        self._hold_seq: float = _INF        # requests with seq >= this are held
        self._released: tuple[float, float] | None = None  # (old hold_seq, time)
        self._stop: str | None = None     # why the I/O thread must stop ("" = close)
        self._wake_pending = False
        self._pull_wanted = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._handoff: nbd.NBD | None = None
        self._reset_io_state()

    def _reset_io_state(self) -> None:
        """Fresh I/O-thread-only state (the I/O thread is the only one that mutates it)."""
        self._queue: deque[Ticket] = deque()
        self._barriers: list[Ticket] = []
        self._inflight: set[Ticket] = set()
        # Completed by libnbd, to be settled by _retire (tickets append themselves).
        self.completions: list[Ticket] = []
        self._cur_hold: float = _INF
        self._next_check = 0.0
        self._can_trim = True
        self._fua_flag = nbd.CMD_FLAG_FUA
        self._issued = False  # this round handed libnbd a request (its direction may change)
        self._pulling = False  # the source may have pieces: call it when there is room
        self._drained = 0      # times the source came up empty ...
        self._drained_seq = 0  # ... and the sequence number at the last of them
        self._next_pull = 0.0  # no pull round starts before (pull_delay after an empty one)
        self._waited = 0       # requests in flight that someone waits for (not pulled)
        self._batches = 0      # batch records in flight
        # The blocks of each batch record in flight (overlap.py).
        self._records = OverlapIndex()
        self.in_flight_bytes = 0

    # -- public state ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._barriers) + len(self._incoming)

    @property
    def held(self) -> bool:
        return self._hold_seq != _INF

    @property
    def connect_uri(self) -> str:
        """The export URI this forwarder connects to, its session tag included."""
        return self._connect_uri

    # -- connection -----------------------------------------------------------------

    def connect(self) -> None:
        """Connect with a fresh handle and start the I/O thread; also reconnects after a failure.

        Raises ForwardError naming the URI if the secondary does not complete the
        handshake within ``timeout`` or refuses writes.  A new connection starts with no
        hold and empty queues (a failure settled every earlier ticket).
        """
        with self._lock:
            if self._accepting:
                raise ForwardError(f"forwarder to secondary {self.uri} is already connected; "
                                   "close() it first")
            old = self._thread
        if old is not None and old is not threading.current_thread():
            old.join()
        h = nbd.NBD()
        tls.prepare_client(h, self._connect_uri)  # an nbds:// URI carries TLS credentials
        self.size = self._handshake(h)
        self._reset_io_state()
        self._can_trim = h.can_trim()
        if not h.can_fua():
            log.warning("secondary %s does not support FUA; forwarding without it", self.uri)
            self._fua_flag = 0
        # The I/O thread must hold the only reference, so that dropping it closes the handle.
        self._handoff, h = h, None
        thread = threading.Thread(target=self._run, name="repdisk-forwarder", daemon=True)
        with self._lock:
            self.failed = False
            self.error = None
            self.errno = 0
            self._stop = None
            self._hold_seq = _INF
            self._released = None
            self._accepting = True
            self._thread = thread
        thread.start()
        log.info("forwarding to secondary %s (%d bytes, window %d)", self.uri, self.size,
                 self.window)

    def _handshake(self, h: nbd.NBD) -> int:
        """Connect ``h`` within ``timeout`` without blocking forever on a hung secondary."""
        try:
            h.aio_connect_uri(self._connect_uri)
            done = pump(h, lambda: not h.aio_is_connecting(),
                         time.monotonic() + self.timeout)
            if not done:
                raise ForwardError(f"secondary {self.uri} does not answer: no NBD handshake "
                                   f"within {self.timeout}s")
            if not h.aio_is_ready():
                raise ForwardError(f"secondary {self.uri} does not answer: connection closed "
                                   "during the NBD handshake")
            if h.is_read_only():
                raise ForwardError(f"secondary {self.uri} is read-only; its replica export "
                                   "must accept writes")
            size = int(h.get_size())
            if not self._batch:
                return size
            if size < _batch.MAILBOX:
                raise ForwardError(f"secondary {self.uri} serves no batch records: its export "
                                   f"with {_batch.EXPORT_SUFFIX!r} is {size} bytes, not its "
                                   "disk plus a mailbox (is it a repdisk secondary of this "
                                   "version?)")
            return size - _batch.MAILBOX
        except nbd.Error as err:
            # libnbd names the export it asked for: the one the user gave, not the session's
            said = str(err).replace(export_name(self._connect_uri), export_name(self.uri))
            raise ForwardError(f"secondary {self.uri} does not answer: {said}") from None

    def close(self) -> None:
        """Stop the I/O thread and close the handle; idempotent.

        Requests still unacknowledged are aborted like a failure (``on_failure`` gets their
        ranges); call ``barrier`` first to drain.
        """
        with self._lock:
            thread = self._thread
            if self._accepting and self._stop is None:
                self._stop = ""
                self._wake_locked()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
            with self._lock:
                if self._thread is thread:
                    self._thread = None

    def __del__(self) -> None:
        # Not in close(): a closed forwarder may connect again, and submitters only write
        # the eventfd while accepting, so it is safe to keep until the object goes.
        fd, self._wake_fd = getattr(self, "_wake_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    # -- submission (any thread) ----------------------------------------------------

    def submit_write(self, buf: bytes | memoryview, offset: int, fua: bool = False) -> Ticket:
        """Queue a write; ``buf`` must stay unchanged until the ticket is done."""
        return self._submit(Ticket(self, WRITE, offset, len(buf), buf, fua))

    def submit_zero(self, offset: int, length: int, fua: bool = False) -> Ticket:
        return self._submit(Ticket(self, ZERO, offset, length, None, fua))

    def submit_trim(self, offset: int, length: int, fua: bool = False) -> Ticket:
        return self._submit(Ticket(self, TRIM, offset, length, None, fua))

    def submit_flush(self) -> Ticket:
        return self._submit(Ticket(self, FLUSH, 0, 0))

    def submit_read(self, offset: int, length: int) -> Ticket:
        """Queue a read of the secondary's bytes (``ticket.data`` once it succeeded).

        Ordered like a write: it is sent after every request submitted before it that
        shares a byte with it is acknowledged, and such a request submitted after it waits
        for it, so it reads exactly what the requests submitted before it left there."""
        return self._submit(Ticket(self, READ, offset, length, nbd.Buffer(length)))

    def barrier(self, timeout: float, drain: bool = True) -> bool:
        """Wait until every earlier request, then a flush, is acknowledged; True on success.

        While held, "earlier" means submitted before ``hold()``: the checkpoint order is
        ``hold(); barrier(t)``.  With a source and ``drain``, also every piece the source
        has (see Pulling): only for a source that writers have stopped feeding, or it may
        never come up empty.  Failing (or expiring) fails the forwarder.
        """
        t = Ticket(self, BARRIER, 0, 0)
        if drain and self._source is not None:
            t.drained = _DRAIN
        return self._submit(t).wait(timeout)

    def _submit(self, t: Ticket) -> Ticket:
        with self._lock:
            if not self._accepting:
                return rejected(t.kind, t.offset, t.length)
            t.seq = self._seq
            self._seq += 1
            t.t0 = time.monotonic()
            self._incoming.append(t)
            self._wake_locked()
        return t

    def pull(self) -> None:
        """Have the I/O thread take what the source has (any thread; one flag test when
        a pull is already asked for: the I/O thread clears the flag just before it looks,
        so a pull asked for during ``pull_delay`` costs no wake-up)."""
        if self._pull_wanted:
            return
        with self._lock:
            if not self._pull_wanted:
                self._pull_wanted = True
                self._wake_locked()

    def hold(self) -> None:
        """Keep requests submitted from now on queued (not sent) until ``release``."""
        with self._lock:
            if self._hold_seq == _INF:
                self._hold_seq = self._seq

    def release(self) -> None:
        """Send the held requests, in order; their timeout counts from now."""
        with self._lock:
            if self._hold_seq != _INF:
                self._released = (self._hold_seq, time.monotonic())
                self._hold_seq = _INF
                self._wake_locked()

    def _wake_locked(self) -> None:
        """Wake the I/O thread once per batch; caller holds ``_lock``."""
        if self._accepting and not self._wake_pending:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)

    def ticket_expired(self, t: Ticket, timeout: float | None) -> None:
        """A waiter gave up on ``t``: fail the forwarder (unless ``t`` just settled).
        Any thread (``Ticket.wait``)."""
        with self._lock:
            if self._stop is None and not t.done:
                self._stop = (f"secondary {self.uri} did not acknowledge {t.what()} "
                              f"within {timeout}s")
                self._wake_locked()

    # -- the I/O thread ---------------------------------------------------------------

    def _run(self) -> None:
        h, self._handoff = self._handoff, None
        assert h is not None
        try:
            why = self._loop(h)
        except Exception as err:  # a bug here must still release every waiter
            log.exception("forwarder I/O thread crashed")
            why = f"forwarder to secondary {self.uri} crashed: {err}"
        ref = weakref.ref(h)
        clean = not self._inflight and not self._queue and not self._barriers
        if clean and why == "":
            self._disconnect(h)
        del h
        if ref() is not None:  # a traceback cycle still holds it: collect to close it
            gc.collect()
        if ref() is not None:
            log.error("forwarder could not close its libnbd handle; buffers stay referenced")
        self._finish(why)

    def _loop(self, h: nbd.NBD) -> str:
        """Run until a failure or close; returns the reason ("" for close).

        Every libnbd call drops and retakes the GIL, a thread switch when nbdkit's workers
        want it, so a round makes as few as it can: the socket is fetched once (a handle
        keeps it until closed), the direction once after sending and once after reading,
        and a direction of 0 is how a dead or closed handle shows.
        """
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        source_fd = -1
        if self._source_wake is not None:
            source_fd = self._source_wake[0]
            poller.register(source_fd, select.POLLIN)
            # A wake-up an earlier forwarder left is not a pull: what it was for is in the
            # source, and a link comes up only for a copy that sends what the source has.
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(source_fd)
        fd, mask = h.aio_get_fd(), 0
        readable = select.poll()  # _read_replies: is a reply waiting right now?
        readable.register(fd, select.POLLIN)
        direction = h.aio_get_direction()
        try:
            while True:
                self._issued = False
                why = self._take_incoming()
                why = why if why is not None else self._send(h)
                why = why if why is not None else self._check_deadlines()
                if why is not None:
                    return why
                refresh = self._issued  # a request issued may change the direction...
                now = time.monotonic()
                lazy = self._lazy(now)
                if lazy and self._inflight:
                    # Not woken per reply: read what came since the last round here.
                    self._read_replies(h, readable)
                    why = self._retire()
                    if why is not None:
                        return why
                    refresh = True  # ...and so may a reply read (or the end of the link)
                if refresh:
                    direction = h.aio_get_direction()
                want = POLL_EVENTS[direction]
                if not want:
                    return self._retire() or f"secondary {self.uri} closed the connection"
                mask = self._repoll(poller, fd, mask, want & ~select.POLLIN if lazy else want)
                wake_at = self._next_check
                if (self._pulling or lazy) and now < self._next_pull < wake_at:
                    wake_at = self._next_pull  # a delayed pull round (not one without room)
                wait_ms = max(0, int((wake_at - now) * 1000) + 1)
                for got_fd, events in poller.poll(wait_ms):
                    if got_fd == self._wake_fd:
                        self._drain_wake()
                    elif got_fd == source_fd:
                        self._source_woken(source_fd)
                    else:
                        if events & select.POLLOUT:
                            h.aio_notify_write()
                        if events & READABLE:  # a reply, or the end of the link (HUP/ERR)
                            h.aio_notify_read()
                            if events & select.POLLIN:
                                self._read_replies(h, readable)  # and those behind it
                        direction = h.aio_get_direction()
                why = self._retire()
                if why is None and not direction:
                    why = f"secondary {self.uri} closed the connection"
                if why is not None:
                    return why
        except nbd.Error as err:
            return f"secondary {self.uri} failed: {err}"

    def _read_replies(self, h: nbd.NBD, readable: select.poll) -> None:
        """Read every reply already waiting: libnbd reads one per ``aio_notify_read``, so
        without this each reply would cost a round of its own (a poll and a wake-up).

        ``aio_notify_read`` only while the socket is readable (a zero-timeout poll says
        so): libnbd takes the call as "data is here", and one made mid-send with nothing
        to read would leave it waiting for a reply to a request it has not finished
        sending."""
        while self._inflight and readable.poll(0):
            try:
                h.aio_notify_read()
            except nbd.Error:
                if h.aio_get_direction() & nbd.AIO_DIRECTION_READ:
                    raise
                return  # the last read found the end of the connection: the loop reports it

    @staticmethod
    def _repoll(poller: select.poll, fd: int, old: int, new: int) -> int:
        """Point ``poller`` at ``fd`` for the events in ``new`` (0: not at all)."""
        if new != old:
            if old:
                poller.unregister(fd)
            if new:
                poller.register(fd, new)
        return new

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    def _source_woken(self, fd: int) -> None:
        """The source's eventfd fired: a pull, as if ``pull()`` had been called."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        with self._lock:
            self._pull_wanted = True

    def _take_incoming(self) -> str | None:
        """Move the submitted batch into the queue; returns a stop reason if one is set."""
        with self._lock:
            self._wake_pending = False
            batch, self._incoming = self._incoming, []
            self._cur_hold = self._hold_seq
            released, self._released = self._released, None
            stop = self._stop
            if self._pull_wanted:  # cleared by _pull, when it looks: until then, writers
                self._pulling = self._source is not None  # need not wake this thread
        self._enqueue(batch)
        if released is not None:
            # Held requests waited for the checkpoint, not for the secondary.
            since_seq, at = released
            for t in self._queue:
                if t.seq >= since_seq and t.t0 < at:
                    t.t0 = at
            self._next_check = 0.0
        return stop

    def _enqueue(self, batch: list[Ticket]) -> None:
        for t in batch:
            if t.kind is BARRIER:
                self._barriers.append(t)
                if t.drained == _DRAIN:  # it waits for the source to come up empty
                    t.drained = self._drained
                    self._pulling = True
            else:
                self._queue.append(t)

    def _pull(self) -> bool:
        """Queue the source's next pieces if there is room; False if there was none.

        Each piece's place in the order is taken while the source keeps its range locked
        (see Pulling), whatever the pieces around it."""
        if (not self._pulling or self._queue or len(self._inflight) >= self.window
                or self.in_flight_bytes >= PULL_BUDGET or self._batches >= BATCHES_IN_FLIGHT
                or self._pull_waits()):
            return False
        assert self._source is not None
        taken: list[tuple[int, int, bytes | bytearray]] = []  # (seq, offset, bytes)
        room, most = BATCH_BYTES, BATCH_PIECES if self._batch else 1
        while len(taken) < most and room > 0:
            if self._pull_wanted:  # before looking: a mark made after this wakes us again
                with self._lock:
                    self._pull_wanted = False
                if self._source_wake is not None:
                    self._source_wake[1]()
            got = self._source(most - len(taken), room)
            if got is None:
                self._pulling = False
                self._drained += 1
                self._drained_seq = self._seq
                if self._pull_delay:
                    self._next_pull = time.monotonic() + self._pull_delay
                break
            pieces, placed = got
            try:
                with self._lock:  # their places in the order, while their ranges are locked
                    seq = self._seq
                    self._seq += len(pieces)
            finally:
                placed()
            for offset, buf in pieces:
                taken.append((seq, offset, buf))
                seq += 1
                room -= len(buf)
        if not taken:
            return False
        with self._lock:
            late, self._incoming = self._incoming, []
        self._enqueue_pieces(taken, late)
        return True

    def _enqueue_pieces(self, taken: list[tuple[int, int, bytes | bytearray]],
                        late: list[Ticket]) -> None:
        """Queue pieces, and the requests submitted while they were taken, in order."""
        now = time.monotonic()
        i = 0
        for seq, offset, buf in taken:
            while i < len(late) and late[i].seq < seq:
                self._enqueue([late[i]])
                i += 1
            t = Ticket(self, WRITE, offset, len(buf), buf, pulled=True)
            t.seq = seq
            t.t0 = now
            self._queue.append(t)
        self.stats["pulled"] += len(taken)
        self._enqueue(late[i:])

    def _lazy(self, now: float) -> bool:
        """True while replies may wait for the next pull round: only pulled pieces are in
        flight (nobody waits for them), so reading their replies in one go at the next
        round saves a wake-up per reply."""
        return (bool(self._pull_delay) and not self._waited and not self._barriers
                and not self._queue and now < self._next_pull)

    def _pull_waits(self) -> bool:
        """True while a pull round must wait: pieces gathered for ``pull_delay`` after the
        source came up empty go in one round (fewer wake-ups and GIL hand-offs per
        write); a barrier waiting does not wait."""
        return bool(self._pull_delay) and not self._barriers and \
            time.monotonic() < self._next_pull

    def _send(self, h: nbd.NBD) -> str | None:
        """Issue queued requests in order while the window, overlaps and the hold allow,
        taking pieces from the source whenever the queue runs empty."""
        q, inflight = self._queue, self._inflight
        while True:
            while q and len(inflight) < self.window:
                t = q[0]
                if not self._sendable(t):
                    break
                q.popleft()
                if self._batch and groupable(t) and self._batches < BATCHES_IN_FLIGHT:
                    t = self._group(t)
                why = self._issue(h, t)
                if why is not None:
                    return why
            if not self._pull():
                break
        ready = [b for b in self._barriers if self._barrier_ready(b)]
        for b in ready:
            self._barriers.remove(b)
            why = self._issue(h, b)
            if why is not None:
                return why
        return None

    def _sendable(self, t: Ticket) -> bool:
        """Not held, and no byte in common with a request in flight."""
        return t.seq < self._cur_hold and not self._overlaps(t)

    def _group(self, first: Ticket) -> Ticket:
        """``first`` and the small writes queued right behind it that may go now, as one
        batch record (batch.py); ``first`` alone if none may."""
        q, members, size = self._queue, [first], first.length
        while (q and len(members) < BATCH_PIECES and groupable(q[0])
               and size + q[0].length <= BATCH_BYTES and self._sendable(q[0])):
            members.append(q.popleft())
            size += members[-1].length
        return first if len(members) == 1 else _batch.record_ticket(self, members)

    def _overlaps(self, t: Ticket) -> bool:
        """True if queued ``t`` (never a record) must wait: its bytes overlap an in-flight
        request's (flush: any data)."""
        if t.kind is FLUSH:
            return any(o.length for o in self._inflight)
        start, end = t.offset, t.offset + t.length
        if self._records.records and self._records.hits(start, end):
            return True
        for o in self._inflight:
            if o.parts is None and o.offset < end and start < o.offset + o.length:
                return True
        return False

    def _barrier_ready(self, b: Ticket) -> bool:
        """Everything before ``b`` is acknowledged: the requests submitted earlier and,
        with a source, every piece taken before it came up empty after ``b`` arrived."""
        if self._earlier_pending(b.seq):
            return False
        if b.drained < 0:  # not a draining barrier
            return True
        return self._drained > b.drained and not self._earlier_pending(self._drained_seq)

    def _earlier_pending(self, seq: int) -> bool:
        """True while a sendable request submitted before ``seq`` is unacknowledged."""
        q = self._queue
        if q and q[0].seq < seq and q[0].seq < self._cur_hold:
            return True
        return any(o.seq < seq for o in self._inflight)

    def _issue(self, h: nbd.NBD, t: Ticket) -> str | None:
        """Hand ``t`` to libnbd; it counts as in flight even if libnbd refuses it."""
        self._inflight.add(t)
        self._issued = True
        if not t.pulled:
            self._waited += 1
        flags = self._fua_flag if t.fua else 0
        try:
            if t.kind is WRITE:
                self.in_flight_bytes += t.length
                if t.parts is not None:  # a record goes to the mailbox (batch.py)
                    self._batches += 1
                    t.grains = self._records.add(t.parts)
                    h.aio_pwrite(t.buf, self.size, completion=t.completed, flags=flags)
                else:
                    h.aio_pwrite(t.buf, t.offset, completion=t.completed, flags=flags)
            elif t.kind is ZERO:
                h.aio_zero(t.length, t.offset, completion=t.completed, flags=flags)
            elif t.kind is READ:
                h.aio_pread(t.buf, t.offset, completion=t.completed)
            elif t.kind is TRIM:
                if not self._can_trim:  # advisory: nothing to tell a server that cannot
                    self.completions.append(t)
                    return None
                h.aio_trim(t.length, t.offset, completion=t.completed, flags=flags)
            else:
                h.aio_flush(completion=t.completed)
        except nbd.Error as err:
            return f"secondary {self.uri} refused {t.what()}: {err}"
        return None

    def _retire(self) -> str | None:
        """Settle what libnbd completed; returns the first error (those stay unacknowledged)."""
        done = self.completions
        if not done:
            return None
        self.completions = []
        why = None
        stats = self.stats
        for t in done:
            if t.err:
                stats["errors"] += 1
                why = why or failed_text(self.uri, t.what(), os.strerror(t.err))
                self.errno = self.errno or t.err
                continue
            self._inflight.discard(t)
            if not t.pulled:
                self._waited -= 1
            if t.kind is WRITE:
                self.in_flight_bytes -= t.length
                stats["writes"] += 1
                if t.members:
                    self._batches -= 1
                    if t.grains is not None:
                        self._records.remove(t.grains)
                        t.grains = None
                    stats["batches"] += 1
                    stats["writes"] += len(t.members) - 1
                    for m in t.members:
                        m.settle(True)
                stats["bytes"] += t.length
            else:
                if t.kind is READ:
                    t.data = t.buf.to_bytearray()
                stats[_STAT[t.kind]] += 1
            t.settle(True)
        return why

    def _check_deadlines(self) -> str | None:
        """Fail if the oldest unacknowledged, unheld request is older than ``timeout``."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        waiting = [*self._inflight, *self._barriers]
        if self._queue and self._queue[0].seq < self._cur_hold:
            waiting.append(self._queue[0])  # the oldest sendable queued request
        oldest = min(waiting, key=lambda t: t.t0, default=None)
        if oldest is None:
            self._next_check = now + self.timeout
            return None
        if now - oldest.t0 >= self.timeout:
            return late_text(self.uri, oldest.what(), self.timeout)
        self._next_check = oldest.t0 + self.timeout
        return None

    def _disconnect(self, h: nbd.NBD) -> None:
        """Polite close when nothing is outstanding: NBD_CMD_DISC, briefly wait for EOF."""
        try:
            h.aio_disconnect()
            pump(h, h.aio_is_closed, time.monotonic() + min(self.timeout, 1.0))
        except nbd.Error as err:
            log.debug("disconnect from %s: %s", self.uri, err)

    def _finish(self, why: str) -> None:
        """After the handle is gone: report unacknowledged ranges, then release waiters."""
        with self._lock:
            self._accepting = False
            self._wake_pending = False
            late, self._incoming = self._incoming, []
        pending = sorted([*self._inflight, *self._queue, *self._barriers, *late],
                         key=lambda t: t.seq)
        self._reset_io_state()
        if pending and not why:
            why = (f"forwarder to secondary {self.uri} closed with {len(pending)} "
                   "requests not acknowledged")
        if why:
            ranges = [span for t in pending if t.length and t.kind is not READ
                      for span in t.spans()]
            with self._lock:
                self.failed = True
                self.error = why
            log.error("%s; %d ranges not on the secondary", why, len(ranges))
            self._call_on_failure(why, ranges)
        else:
            log.info("forwarder to secondary %s closed", self.uri)
        for t in pending:
            for m in t.members or ():
                m.settle(False)
            t.settle(False)

    def _call_on_failure(self, why: str, ranges: list[tuple[int, int]]) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(why, ranges)
        except Exception:  # the I/O thread must still release every waiter
            log.exception("forwarder on_failure callback raised")
