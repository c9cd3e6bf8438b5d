"""Writer sessions of a secondary's ``replica`` export: fencing stale primaries.

A primary connects to ``replica@EPOCH.GEN.WRITER`` (``replica/NAME@...`` in a
group): its epoch, a generation that grows with every connection it makes, and
which primary disk it is (:func:`writer_id`).  The secondary admits a session only
if its epoch is not older than the node's, and once a newer session is admitted,
every write of an older one is refused with EPERM.  Three dangers are closed this
way:

* a primary of an older epoch (one that lost a failover) can never write;
* requests of a connection the primary gave up on (a hung secondary, a cut
  link) that are still in the secondary's socket buffer cannot land after the
  primary's resync over a new connection has rewritten the same bytes;
* a second primary given this secondary's URI by mistake (another disk's) cannot
  take it over, whatever epoch it names: the first writer a fence admits is the
  one it serves, and any other is refused until the secondary restarts (a demote
  or promotion makes new fences too).

Admission waits for the writes of older sessions that are already under way
(the fence's writing lock, exclusive), so no write of an old session is half done
when a newer one starts.  A plain ``replica`` connection (no tag) is an
operator's tool and is not fenced.

A superseded session's refusals leave one at a time, REFUSAL_GAP apart.  Its
connection is one the primary gave up on, so it usually delivers a burst of queued
requests and is gone: nbdkit 1.32.4 to 1.33.9 (Debian 12 ships 1.32.5) aborts the
whole node when two replies race on a connection whose client has closed (upstream
Red Hat bug 2173054, fixed in 1.33.10).  Every node preloads a guard against that
(nbdplugin/nbdkit-guard.c); the spacing keeps a node started without it up in this
common case: the first reply's failure marks the connection dead before the next
refusal returns, and nbdkit then sends nothing.
"""

from __future__ import annotations

import errno
import hashlib
import re
import threading
import time
from typing import Any

from repdisk.block.device import BlockDevice
from repdisk.block.rangelock import RangeLock
from repdisk.errors import BlockIOError
from repdisk.replication import fastpath

Token = tuple[int, int]  # (epoch, generation)

_TAG = re.compile(r"^(\d+)\.(\d+)(?:\.([0-9a-f]{1,32}))?$")


def split_tag(export: str) -> tuple[str, Token | None, str]:
    """``replica/root@3.17.ab12`` -> (``replica/root``, (3, 17), ``ab12``): the writer is
    "" if the tag names none; no tag -> (name, None, "")."""
    base, sep, tag = export.rpartition("@")
    if not sep:
        return export, None, ""
    m = _TAG.match(tag)
    if not m:
        raise BlockIOError(errno.EINVAL, f"export {export!r}: the session tag must be "
                                         "EPOCH.GENERATION[.WRITER]")
    return base, (int(m.group(1)), int(m.group(2))), m.group(3) or ""


def writer_id(identity: str) -> str:
    """A primary disk's name in its session tags: 16 hex digits of a hash of its
    identity (``RawImage.named``), the same at every start on the same file."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


#: A replica export's seal twin (``replica/NAME+seal@EPOCH.GEN``): a demoting primary
#: flushes it once, after its final barrier, to say that the secondary now holds every
#: write it acknowledged (node.py records it; a promotion then copies nothing).
SEAL_SUFFIX = "+seal"


#: A replica export's mark twin (``replica/NAME+mark@EPOCH.GEN.WRITER``, on the forwarding
#: session's own tag): a primary flushes it at each checkpoint, after its barrier and
#: while it holds guest writes, to say that the secondary's disk is a checkpoint's closed
#: set.  A secondary takes a checkpoint only after such a mark with no write of the
#: session since (a lone `checkpoint` of the secondary during a copy would otherwise make
#: half a copy consistent).
MARK_SUFFIX = "+mark"


#: Seconds between two refusals of superseded sessions (see the module docstring): far
#: longer than nbdkit takes to send one reply, and nothing waits on a dead connection.
REFUSAL_GAP = 0.02


def make_tag(epoch: int, generation: int, writer: str = "") -> str:
    return f"@{epoch}.{generation}" + (f".{writer}" if writer else "")


#: How a replica export's description names the last session its fence refused and why
#: (``refused session EPOCH.GEN.WRITER: why``): a refused primary reads its own there, for
#: NBD says no more than "no export named" when the secondary refuses to open one.
REFUSED = "refused session"


def refusal_of(description: str, tag: str) -> str | None:
    """Why the session ``tag`` (``@EPOCH.GEN[.WRITER]``) was refused, if ``description``
    (its replica export's) says so."""
    _, sep, why = description.partition(f"{REFUSED} {tag[1:]}: ")
    return why if sep else None


class SessionFence:
    """Which writer session of one disk may write (the newest admitted); see the module
    docstring.  Shared by a replica export and its batch and seal twins.

    With a fast path (``fast``, the disk's replica slot), the filter serves some writes of
    the current session in C: admission tells the slot the new session (by a serial the
    fence counts) and waits for the writes in C to end, as it waits for its own; a mark
    stands only while the slot has acknowledged no write since.
    """

    def __init__(self, name: str, fast: fastpath.Slot | None = None) -> None:
        self.name = name
        self._fast = fast
        # One range, [0, 1): writes take it shared, admission of a newer session exclusive.
        self._writing = RangeLock()
        # Guards _current (read with _writing shared, written with it exclusive).
        self._mutex = threading.Lock()
        self._current: Token = (-1, -1)
        # Grows with every change of _current: the fast path's name for the session.
        self._serial = 0
        # The primary disk this fence serves (writer_id), once a tagged session named one.
        self._writer = ""
        #: The last session refused and why (REFUSED; "" if none), for the description.
        self.refusal = ""
        # Held while a superseded session's request is refused: one refusal at a time.
        self._refusing = threading.Lock()
        # The session whose primary's checkpoint mark came with no write of it since, and
        # how many writes the fast path had acknowledged then.
        self._marked: Token | None = None
        self._marked_fast = 0
        # Open connections of each session (SessionView), and since when the current
        # session has had none (time.time(); the fence's making if none ever connected).
        self._open: dict[Token, int] = {}
        self._unconnected_since: float = time.time()

    def admit(self, token: Token, node_epoch: int, writer: str = "",
              node_won: bool = True) -> None:
        """Make ``token``'s session the one that writes, or raise EPERM saying why not
        (and keep why for :attr:`refusal`): its epoch is older than the node's, a newer
        session writes, or another primary disk (``writer``) writes in this epoch."""
        with self._writing.exclusive(0, 1), self._mutex:
            why = self._refuses(token, node_epoch, writer, node_won)
            if why:
                self.refusal = f"{REFUSED} {make_tag(*token, writer)[1:]}: {why}"
                raise BlockIOError(errno.EPERM, f"{self.name}: {why}")
            if token != self._current:
                fast = self._fast
                if fast is not None and not fast.session(self._serial + 1,
                                                         fastpath.DRAIN_TIMEOUT):
                    fast.session(self._serial, 0)
                    raise BlockIOError(errno.EAGAIN, f"{self.name}: writes of the session "
                                                     f"{self._current} still under way did "
                                                     "not finish (is the disk hung?); retry")
                self._serial += 1
            self._current = token
            self._writer = writer or self._writer

    def serial(self, token: Token) -> int:
        """The fast path's name for ``token``'s session if it is the current one, else -1
        (a connection of it may not write in C)."""
        with self._mutex:
            return self._serial if token == self._current else -1

    def mark(self, token: Token) -> None:
        """``token``'s primary checkpointed (MARK_SUFFIX); EPERM if a newer session writes."""
        entry = self._writing.acquire(0, 1, False)
        try:
            current = self._current
            if token == current:
                self._marked = token
                self._marked_fast = self._fast_writes()
                return
        finally:
            self._writing.release(entry)
        raise BlockIOError(errno.EPERM, f"{self.name}: checkpoint mark of a superseded "
                                        f"primary session {token} refused (current {current})")

    def checkpointable(self) -> bool:
        """Whether the disk is a checkpoint's closed set: the current session's primary
        marked a checkpoint and wrote nothing since, or no primary session ever wrote
        (a plain ``replica`` connection, an operator's tool)."""
        return self._current == (-1, -1) or (self._marked == self._current
                                             and self._marked_fast == self._fast_writes())

    def _fast_writes(self) -> int:
        return 0 if self._fast is None else self._fast.stats()["writes"]

    def joined(self, token: Token) -> None:
        """A connection of ``token``'s session opened (a SessionView was made)."""
        with self._mutex:
            self._open[token] = self._open.get(token, 0) + 1

    def left(self, token: Token) -> None:
        """A connection of ``token``'s session closed."""
        with self._mutex:
            count = self._open.pop(token, 0) - 1
            if count > 0:
                self._open[token] = count
            elif token == self._current:
                self._unconnected_since = time.time()

    def restart_clock(self) -> None:
        """Count :meth:`unconnected_since` from now (a start); while a primary is connected
        it is not read."""
        with self._mutex:
            self._unconnected_since = time.time()

    def unconnected_since(self) -> float | None:
        """When (time.time()) the current session last had a connection open, or the
        fence was made; None while it has one: a primary is connected."""
        with self._mutex:
            return None if self._open.get(self._current) else self._unconnected_since

    @property
    def writer_epoch(self) -> int:
        """The epoch of the session that writes now (-1 if none was admitted)."""
        with self._mutex:
            return self._current[0]

    @property
    def writer(self) -> str:
        """The primary disk this fence serves ("" until a tagged session named one)."""
        return self._writer

    def _refuses(self, token: Token, node_epoch: int, writer: str, node_won: bool) -> str:
        """Why ``token``'s session may not write ("": it may).  ``node_won``: this node
        won its epoch's failover (else it was only started in it, maybe by mistake)."""
        if token[0] < node_epoch:
            why = ("that primary lost a failover to this node" if node_won else
                   "this node was started in that epoch, it won no failover in it: if that "
                   "start's epoch= was a typo, see docs/failure-matrix.md, 'a secondary "
                   "started in a wrong epoch'")
            return (f"refusing a primary of epoch {token[0]}: this node is in epoch "
                    f"{node_epoch} ({why})")
        if token < self._current:
            return f"a newer primary session {self._current} is already writing"
        if writer and self._writer and writer != self._writer:
            return (f"refusing a second primary (disk {writer}): this secondary replicates "
                    f"the primary of disk {self._writer} (a secondary serves one primary "
                    f"disk); give the primary of disk {writer} its own secondary, or restart "
                    "this secondary (its controller stopped first, if one runs its pair) to "
                    "pair it with that primary")
        return ""

    def run_write(self, token: Token, fn: Any, *args: Any) -> None:
        """Run a write of ``token``'s session, holding off newer admissions meanwhile.

        Called for every replica request, so a plain acquire/release rather than a
        generator context manager (several Python calls per request)."""
        self._run(token, True, fn, args)

    def run_flush(self, token: Token, fn: Any) -> None:
        """:meth:`run_write` for a flush: it changes no data, so a checkpoint mark stands."""
        self._run(token, False, fn, ())

    def _run(self, token: Token, changes: bool, fn: Any, args: tuple[Any, ...]) -> None:
        entry = self._writing.acquire(0, 1, False)
        try:
            current = self._current
            if token == current:
                try:
                    fn(*args)
                finally:
                    if changes:
                        self._marked = None     # a write after the last checkpoint mark
                return
        finally:
            self._writing.release(entry)
        with self._refusing:        # not holding _writing: admissions do not wait for this
            time.sleep(REFUSAL_GAP)
            raise BlockIOError(errno.EPERM, f"{self.name}: write of a superseded primary "
                                            f"session {token} refused (current {current})")


class SessionView:
    """A ``replica`` view as one writer session sees it: writes pass only while current."""

    def __init__(self, view: BlockDevice, fence: SessionFence, token: Token) -> None:
        self._view, self._fence, self._token = view, fence, token
        self.size = view.size
        self.pread_into = view.pread_into
        self.extents = view.extents
        fence.joined(token)
        cell: fastpath.Cell | None = getattr(view, "fast_cell", None)
        if cell is not None:  # this connection's writes may take the fast path
            cell.bind(fence.serial(token))

    def close(self) -> None:
        """The connection closed (called once, by the plugin's close)."""
        self._fence.left(self._token)

    def _write(self, fn: Any, *args: Any) -> None:
        self._fence.run_write(self._token, fn, *args)

    def pwrite(self, buf: Any, offset: int, fua: bool = False) -> None:
        self._write(self._view.pwrite, buf, offset, fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._write(self._view.zero, offset, length, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._write(self._view.trim, offset, length, fua)

    def flush(self) -> None:
        self._fence.run_flush(self._token, self._view.flush)
