"""The primary's link to its secondary: one forwarding connection at a time, and its state.

:class:`LinkState` (written only by :meth:`Link._set`, which logs the change)::

    DOWN      not replicating (before start, after stop): writes are local and dirty
    UP        forwarding: writes and copies go to ``forwarder``
    DEGRADED  the connection failed (or was dropped while failed): writes are local and
              dirty until a resync brings the link up again

Whatever a failing forwarder did not get acknowledged is marked in the dirty map by its
``on_failure`` (this module), so nothing acknowledged to the guest is forgotten.  Every
connection for replication is a writer session (sessions.py) named by the pair's ``epoch``
and a growing generation, so the secondary fences the older ones.

``current`` is the pair (state, the forwarder writes go to now: None unless UP), replaced
as one value, so a writer reads both at once from any thread.
"""

from __future__ import annotations

import enum
import errno
import logging
import re
import threading
import time
from collections.abc import Callable

from repdisk.block.dirtymap import DirtyMap
from repdisk.errors import ForwardError
from repdisk.replication import nbdclient
from repdisk.replication.forwarder import Forwarder, Source, SourceWake, failed_text, late_text
from repdisk.replication.framework import ReplicationError
from repdisk.replication.sessions import MARK_SUFFIX, SEAL_SUFFIX, make_tag, refusal_of
from repdisk.replication.stage import StageMachine
from repdisk.uri import export_name, with_export_suffix

log = logging.getLogger(__name__)

__all__ = ["CONTENTS_UNKNOWN", "DISK_ID", "Link", "LinkState", "PULL_DELAY"]

#: What a secondary's replica export description says when the disk is new to it (not
#: the file a checkpoint last made a consistent copy): its primary compares first.
CONTENTS_UNKNOWN = "contents unknown, compared before any copy"
#: How a secondary's replica export names its disk file (RawImage.named): a primary's
#: dirty maps are of one secondary disk, and another one is compared first.
DISK_ID = "disk-id"

#: async: the forwarder gathers dirty pieces this long before a round (fio 4 KiB random
#: writes QD16, 2 vCPUs: see bench/README.md).
PULL_DELAY = 0.001


class LinkState(enum.Enum):
    DOWN = "down"          # not replicating: writes are local and dirty
    UP = "up"              # forwarding
    DEGRADED = "degraded"  # failed: writes are local and dirty until resync


def disk_id_of(description: str) -> str | None:
    """The disk name (DISK_ID) a secondary's replica export description gives, if any: a
    file's random name, or ``dev N`` for a block device."""
    found = re.search(rf"{DISK_ID} ([^;]+);", description)
    return found.group(1) if found else None


class Link:
    """The connection a primary disk forwards on: connect, degrade, failure, probe, seal.

    ``up``, ``drop`` and ``stop`` run under the replica's transition lock; ``degrade``
    also runs on a failing forwarder's thread (``on_failure``).
    """

    def __init__(self, name: str, uri: str | None, dirty: DirtyMap, sm: StageMachine, *,
                 timeout: float, window: int, export_suffix: str, writer: str = "") -> None:
        self.name = name
        #: This primary disk's name in session tags (sessions.writer_id).
        self.writer = writer
        self.uri = uri
        self.timeout = timeout
        self.window = window
        self.export_suffix = export_suffix
        #: The pair's epoch, set by the node at start; every connection names it.
        self.epoch = 0
        self._dirty = dirty
        self._sm = sm
        # Guards errors (counted on forwarders' threads).
        self._count_lock = threading.Lock()
        # Held while a fast write's failure is handled (fast_failed).
        self._fast_failing = threading.Lock()
        #: Forwarders that failed (query-replication's forward_errors).
        self.errors = 0
        #: Told, on the failing forwarder's thread and before the writes it failed are
        #: settled, when the secondary refused this primary's writes (EPERM: a newer
        #: session or a failover superseded it); the node judges whether it lost.
        self.on_refused: Callable[[str], None] | None = None
        #: Told, after every change of ``current``, on the changing thread (the write path
        #: arms or disarms its fast path: fastpath.py).
        self.on_change: Callable[[], None] = _nothing
        self.state = LinkState.DOWN
        #: The connection, failed or not; None when there is none.
        self.forwarder: Forwarder | None = None
        # The mark connection (mark_checkpoint) and the forwarder whose session it is in.
        self._marker: tuple[Forwarder, Forwarder] | None = None
        #: (state, the forwarder writes go to now: None unless UP), one value.
        self.current: tuple[LinkState, Forwarder | None] = (LinkState.DOWN, None)

    @property
    def sending(self) -> Forwarder | None:
        """The forwarder writes go to now, or None if they only go to the local disk."""
        return self.current[1]

    @property
    def degraded(self) -> bool:
        return self.state is LinkState.DEGRADED

    @property
    def export_uri(self) -> str:
        """The secondary's export of this disk ("" without a secondary)."""
        return with_export_suffix(self.uri or "", self.export_suffix)

    def _set(self, state: LinkState, fwd: Forwarder | None) -> None:
        """The one writer of the state, the connection and ``current``."""
        if state is not self.state:
            log.info("%s: link %s -> %s", self.name, self.state.value, state.value)
        self.state, self.forwarder = state, fwd
        self.current = (state, fwd if state is LinkState.UP else None)
        self.on_change()

    # -- transitions ---------------------------------------------------------------------

    def up(self, source: Source | None = None, source_wake: SourceWake | None = None) -> None:
        """Connect and forward from now on (UP; DEGRADED if the connection failed at once);
        ``source``, ``source_wake``: the async write-back's pieces (forwarder.py's
        Pulling).  Raises ReplicationError (state unchanged) if the secondary is unfit."""
        fwd = self._connect(session=True, source=source, source_wake=source_wake)
        self._sm.clear_error()    # what broke it is history, before a query sees it UP
        self._set(LinkState.UP, fwd)
        if fwd.failed:  # failed before it was ours: on_failure did not degrade
            self.degrade(f"forwarding to the secondary {self.uri} failed: {fwd.error}")

    def drop(self) -> None:
        """Close the connection; whatever it did not acknowledge is marked dirty.  A
        degraded link stays DEGRADED (only a resync clears that), any other goes DOWN."""
        fwd = self.forwarder
        self._set(LinkState.DEGRADED if self.degraded else LinkState.DOWN, None)
        self._close_marker()
        if fwd is not None:
            fwd.close()  # reports what it did not acknowledge to on_failure: marked dirty

    def stop(self) -> None:
        """Replication is over: drop the connection, DOWN even if degraded."""
        self.drop()
        self._set(LinkState.DOWN, None)

    def degrade(self, why: str) -> None:
        """Stop forwarding until resync; get_error reports ``why`` (and an event goes out).
        The checkpoint mark's connection closes too, on a thread of its own (its polite
        disconnect may wait on a hung link, and the failing forwarder releases its waiters
        only after this): an idle one would keep a secondary that is stopping (it waits
        for its NBD clients) from ever stopping."""
        self._set(LinkState.DEGRADED, self.forwarder)
        self._close_marker(wait=False)
        self._sm.record_error(_degraded(why))

    def still_degraded(self, why: str) -> None:
        """A resync could not bring a degraded link back: get_error reports ``why`` from now
        on, instead of what first broke the link."""
        if self.degraded:
            self._sm.replace_error(_degraded(why))

    def _on_failure(self, fwd: Forwarder, error: str, ranges: list[tuple[int, int]]) -> None:
        """Called once by a failing forwarder (its thread): mark, degrade, report."""
        self._failed(fwd is self.forwarder, error, fwd.errno, ranges)

    def fast_failed(self, offset: int, length: int, err: int, why: str) -> None:
        """The secondary failed a write of the fast path (fastpath.py), on the writing
        nbdkit thread: as a failing forwarder's, while the link is still UP (a link that
        already left UP was degraded, dropped or stopped: the range is only marked).
        ECONNREFUSED: the fast path could not connect; the secondary's fence may have
        refused the session (then it is EPERM, as a refused write)."""
        what = f"write [{offset}, {offset + length})"
        uri = self.uri or ""
        with self._fast_failing:  # several writers may fail at once: one degrades
            fwd = self.sending
            if err == errno.ECONNREFUSED and fwd is not None:  # its connection was refused
                refused = self._refusal(fwd.session_tag)
                if refused:
                    err, why = errno.EPERM, refused
            error = (late_text(uri, what, self.timeout) if err == errno.ETIMEDOUT
                     else failed_text(uri, what, why))
            self._failed(fwd is not None, error, err, [(offset, length)])

    def _failed(self, current: bool, error: str, err: int,
                ranges: list[tuple[int, int]]) -> None:
        """Mark ``ranges``; if the connection that failed is the ``current`` one, degrade
        and report (EPERM: the secondary refused this primary, ``on_refused``)."""
        for off, length in ranges:
            if length > 0:
                self._dirty.mark(off, length)
        with self._count_lock:
            self.errors += 1
        if not current:
            return  # an abandoned connection: its ranges are marked, nothing else to say
        self.degrade(f"forwarding to the secondary {self.uri} failed: {error}")
        if err == errno.EPERM and self.on_refused is not None:
            self.on_refused(error)

    # -- connections -----------------------------------------------------------------------

    def _connect(self, session: bool, source: Source | None = None,
                 source_wake: SourceWake | None = None) -> Forwarder:
        """A new connection to the secondary, checked for size; raises ReplicationError.

        ``session``: a writer session (sessions.py), fenced by the secondary once a newer
        one starts; the start-up probe only looks and is not one."""
        if self.uri is None:
            raise ReplicationError(f"{self.name}: cannot replicate: no secondary is "
                                   "configured (set the 'secondary' key to its NBD URI)")
        fwd: Forwarder

        def on_failure(error: str, ranges: list[tuple[int, int]]) -> None:
            self._on_failure(fwd, error, ranges)

        tag = make_tag(self.epoch, time.time_ns(), self.writer) if session else ""
        fwd = Forwarder(self.uri, timeout=self.timeout, window=self.window,
                        on_failure=on_failure, export_suffix=self.export_suffix,
                        session_tag=tag, source=source if session else None,
                        pull_delay=PULL_DELAY, batch=source is not None and session,
                        source_wake=source_wake if session else None)
        try:
            fwd.connect()
        except ForwardError as err:
            fwd.close()
            why = self._refusal(tag) if tag else None
            if why:
                raise ReplicationError(f"{self.name}: the secondary {self.uri} refused this "
                                       f"primary: {why}") from err
            raise ReplicationError(f"{self.name}: {err}") from err  # err names the URI
        if fwd.size != self._dirty.size:
            fwd.close()
            raise ReplicationError(
                f"{self.name}: the secondary {self.uri} is {fwd.size} bytes but the "
                f"local disk is {self._dirty.size} bytes; give both disks the same size")
        return fwd

    def peer_replica(self) -> tuple[bool, str | None]:
        """What the secondary's replica export says of its disk: whether it is new to it
        (CONTENTS_UNKNOWN: what the dirty map says it lacks is then not all it lacks), and
        which file it is (DISK_ID; None if not said).  (False, None) for a server that does
        not list it (not a repdisk secondary)."""
        assert self.uri is not None
        listed = nbdclient.list_exports(self.uri, self.timeout) or {}
        description = listed.get(export_name(self.export_uri), "")
        return CONTENTS_UNKNOWN in description, disk_id_of(description)

    def _refusal(self, tag: str) -> str | None:
        """Why the secondary refused the session ``tag``, if its replica export's
        description says (sessions.REFUSED); None if it does not, or does not answer."""
        assert self.uri is not None
        listed = nbdclient.list_exports(self.uri, self.timeout) or {}
        return refusal_of(listed.get(export_name(self.export_uri), ""), tag)

    def probe(self) -> None:
        """Check that the secondary answers and has this disk's size (node start-up)."""
        self._connect(session=False).close()

    def seal(self) -> None:
        """Tell the secondary that it holds every write this primary acknowledged: one
        flush of its seal export on a new writer session (admitting it fences the
        forwarding session there).  Only after a barrier that covered every acknowledged
        write, with guest writes refused (a demote); raises ReplicationError if the
        secondary did not confirm."""
        if self.uri is None:
            raise ReplicationError(f"{self.name}: no secondary to seal")
        fwd = self._signaller(SEAL_SUFFIX, make_tag(self.epoch, time.time_ns(), self.writer),
                              "seal the secondary")
        try:
            self._signal(fwd, "the seal")
        finally:
            fwd.close()

    def mark_checkpoint(self) -> None:
        """Tell the secondary that this primary checkpointed (sessions.MARK_SUFFIX): one
        flush of its mark export, in the forwarding session.  Only after a barrier, with
        guest writes held; raises ReplicationError if the secondary did not confirm."""
        fwd = self.forwarder
        assert fwd is not None and self.uri is not None   # UP: the checkpoint's barrier ran
        if self._marker is None or self._marker[0] is not fwd:
            self._close_marker()
            self._marker = (fwd, self._signaller(MARK_SUFFIX, fwd.session_tag,
                                                 "mark the checkpoint on the secondary"))
        try:
            self._signal(self._marker[1], "the checkpoint")
        except ReplicationError:
            self._close_marker()
            raise

    def _signaller(self, suffix: str, tag: str, what: str) -> Forwarder:
        """A connection to the secondary's signal export ``suffix`` (node/exports.py's
        SignalView) in the writer session ``tag``; ReplicationError "cannot ``what``"."""
        assert self.uri is not None
        fwd = Forwarder(self.uri, timeout=self.timeout, window=1,
                        export_suffix=self.export_suffix + suffix, session_tag=tag)
        try:
            fwd.connect()
        except ForwardError as err:
            fwd.close()
            raise ReplicationError(f"{self.name}: cannot {what}: {err}") from err
        return fwd

    def _signal(self, fwd: Forwarder, what: str) -> None:
        """The one flush of a signal connection; ReplicationError if the secondary did
        not confirm ``what``."""
        if not fwd.submit_flush().wait(self.timeout):
            why = fwd.error or f"no answer within {self.timeout:g}s"
            raise ReplicationError(f"{self.name}: the secondary {self.uri} did not confirm "
                                   f"{what}: {why}")

    def _close_marker(self, wait: bool = True) -> None:
        """Close the checkpoint mark's connection, if open; without ``wait``, in the
        background."""
        if self._marker is None:
            return
        fwd, self._marker = self._marker[1], None
        if wait:
            fwd.close()
        else:
            threading.Thread(target=fwd.close, name="repdisk-mark-close", daemon=True).start()

    def acks(self) -> int | None:
        """Requests the secondary acknowledged on the current link; None when not forwarding.

        The node's isolation monitor watches it grow: an acknowledgement is proof of contact.
        """
        fwd = self.sending
        if fwd is None:
            return None
        stats = fwd.stats
        return stats["writes"] + stats["zeros"] + stats["trims"] + stats["flushes"]

    def probe_idle(self) -> None:
        """Send a flush if the link is idle, so that an idle secondary still proves it
        answers (and a dead one is noticed before the next guest write)."""
        fwd = self.sending
        if fwd is not None and not fwd.in_flight and not fwd.queued:
            fwd.submit_flush()


def _nothing() -> None:
    """No one to tell."""


def _degraded(why: str) -> str:
    return f"{why}; writes are kept local and tracked as dirty until resync"
