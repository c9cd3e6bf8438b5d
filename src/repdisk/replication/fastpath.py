"""The fast path: the Python side of nbdplugin/repdisk-fast.c.

Every node runs nbdkit with the ``repdisk-fast`` filter in front of the plugin (when
``make setup`` built it).  The filter can carry out one route of a gate in C: a sync
primary's FORWARD (the local write, then the same request to the secondary on the nbdkit
worker's own connection, in the primary's writer session, acknowledged once both are
done), an async primary's WRITE_BACK (the local write, then its range in the slot's mark
log, which the dirty map takes in before it is read, and a wake-up of the forwarder), or
a secondary's COPY_BEFORE_WRITE once the copy is made (a replica write of the current
writer session whose clusters the hidden overlay already holds goes straight to the
disk).  It decides nothing: this module arms it and disarms it.

* :class:`Slot` -- one disk's write path: the local disk's fd and, for sync, the
  secondary's export URI (the forwarder's session tag included), armed only while the
  gate gives the slot's route and no hold, copy or verify needs the write path's own
  range locks; a replica slot, the hidden overlay's bitmap and the writer session
  admitted last (:meth:`Slot.session`), armed only while replication runs and no
  transition holds the disk.  A change takes effect once no write of the slot is under
  way (:meth:`Slot.wait`).
* :class:`Cell` -- what one export serves now (an Export's target, a secondary's replica
  view), so that a connection bound at open follows a promotion.
* :func:`publish_guard` -- whether, and until when, a write may be acknowledged without
  the node's isolation guard and admission (Admission keeps it current).

Without the filter (not built, or a process that is not nbdkit) there are no slots and
cells do nothing: the plugin serves every write, as before.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["DRAIN_TIMEOUT", "FILTER", "Cell", "Slot", "publish_guard"]

#: Where ``make setup`` builds the filter; nodeproc.py loads it into every node.
FILTER = os.path.join(sys.prefix, "lib", "repdisk", "repdisk-fast.so")
_NAME = "repdisk-fast.so"

#: Told when the secondary failed a fast write: (offset, length, errno, why).
FailureHandler = Callable[[int, int, int, str], None]
_FAILURE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32,
                            ctypes.c_int, ctypes.c_char_p)


def _loaded() -> ctypes.CDLL | None:
    """The filter loaded into this process (nbdkit loads it before the plugin), or None."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            path = next((line.split(None, 5)[5].strip() for line in maps
                         if line.rstrip().endswith("/" + _NAME)), None)
    except OSError:
        return None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
    except OSError:
        return None
    lib.repdisk_fast_slot.argtypes = [_FAILURE, ctypes.c_int]
    lib.repdisk_fast_take_marks.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.repdisk_fast_rearm.argtypes = [ctypes.c_int]
    lib.repdisk_fast_lag.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64]
    lib.repdisk_fast_set.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                     ctypes.c_double, ctypes.c_int]
    lib.repdisk_fast_wait.argtypes = [ctypes.c_int, ctypes.c_double]
    lib.repdisk_fast_cell_set.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.repdisk_fast_bind.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.repdisk_fast_replica_slot.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.repdisk_fast_session.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_double]
    lib.repdisk_fast_guard.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.repdisk_fast_stats.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64 * 4)]
    return lib


_lib = _loaded()


def publish_guard(blocked: bool, deadline: float | None) -> None:
    """Fast writes are acknowledged only while not ``blocked`` and before ``deadline``
    (``time.monotonic()``; None: no deadline); past either the plugin serves them."""
    if _lib is not None:
        ns = 2**63 - 1 if deadline is None or math.isinf(deadline) else int(deadline * 1e9)
        _lib.repdisk_fast_guard(int(blocked), ns)


#: How long a replica slot's disarming or new session waits for the writes in C (local
#: writes of one request each) before the plugin refuses the change.
DRAIN_TIMEOUT = 30.0

#: Marks taken from a write-back slot's log per call.
_MARKS = 1024


class Slot:
    """One disk's fast path (see the module docstring)."""

    def __init__(self, index: int, handler: object, wake_fd: int = -1,
                 replica: bool = False) -> None:
        self.index = index
        # The ctypes callback, or a replica slot's view of the bitmap: kept alive as long
        # as the slot.
        self._handler = handler
        #: A write-back slot's eventfd, readable once a mark was made since ``rearm``.
        self.wake_fd = wake_fd
        self._marks = (ctypes.c_uint64 * (2 * _MARKS))() if wake_fd >= 0 else None
        #: A secondary's replica slot (it makes no connections).
        self.replica = replica

    @classmethod
    def make(cls, on_failure: FailureHandler) -> Slot | None:
        """A new sync slot, disarmed; None without the filter (or with its table full)."""
        if _lib is None:
            return None

        def failed(_slot: int, offset: int, length: int, err: int, why: bytes) -> None:
            try:
                on_failure(offset, length, err, why.decode("utf-8", "replace"))
            except Exception:  # noqa: BLE001 (C cannot take an exception: log it, go on)
                log.exception("fast path: failure handler")

        handler = _FAILURE(failed)
        return cls._new(handler, -1)

    @classmethod
    def make_write_back(cls) -> Slot | None:
        """A new write-back slot, disarmed, with its eventfd; None as for :meth:`make`."""
        if _lib is None:
            return None
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        slot = cls._new(_FAILURE(), wake_fd)
        if slot is None:
            os.close(wake_fd)
        return slot

    @classmethod
    def make_replica(cls, bitmap: bytearray, cluster_size: int) -> Slot | None:
        """A new replica slot, disarmed, that reads ``bitmap`` (a hidden overlay's, one bit
        a cluster, changed in place and never resized: exported here, it cannot be); None
        as for :meth:`make`."""
        if _lib is None:
            return None
        bits = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        index = _lib.repdisk_fast_replica_slot(ctypes.addressof(bits),
                                               cluster_size.bit_length() - 1)
        return cls._made(index, bits, -1, replica=True)

    @classmethod
    def _new(cls, handler: object, wake_fd: int) -> Slot | None:
        assert _lib is not None
        return cls._made(_lib.repdisk_fast_slot(handler, wake_fd), handler, wake_fd)

    @classmethod
    def _made(cls, index: int, handler: object, wake_fd: int,
              replica: bool = False) -> Slot | None:
        if index < 0:
            log.warning("fast path: no free slot; this disk's writes go through the plugin")
            return None
        return cls(index, handler, wake_fd, replica)

    def set(self, fd: int, uri: str | None, timeout: float, armed: bool) -> None:
        """Write to the local disk ``fd`` and, for a sync slot, the secondary's export
        ``uri`` (its session tag included; None: no secondary, never armed), each request
        within ``timeout``, and serve writes in C (``armed``) or hand them all to the
        plugin, from the next moment no write is under way.  Connections to another URI
        close; to this one they are kept while disarmed."""
        assert _lib is not None
        if _lib.repdisk_fast_set(self.index, fd, None if uri is None else uri.encode(),
                                 timeout, int(armed)) != 0:
            raise MemoryError("fast path: out of memory")

    def take_marks(self) -> list[tuple[int, int]]:
        """A write-back slot's marks made since the last call, as ``(offset, length)``."""
        assert _lib is not None and self._marks is not None
        marks = self._marks
        taken: list[tuple[int, int]] = []
        while True:
            n = _lib.repdisk_fast_take_marks(self.index, marks, _MARKS)
            flat = marks[:2 * n]
            taken += zip(flat[0::2], flat[1::2], strict=True)
            if n < _MARKS:
                return taken

    def rearm(self) -> None:
        """The forwarder is about to look: the next mark writes ``wake_fd`` again."""
        assert _lib is not None
        _lib.repdisk_fast_rearm(self.index)

    def lag(self, dirty: int, max_lag: int) -> None:
        """A write-back slot's dirty map holds ``dirty`` unsent bytes now: the slot hands
        the plugin (which waits for the lag) a write that would take the unsent bytes
        past ``max_lag``."""
        assert _lib is not None
        _lib.repdisk_fast_lag(self.index, dirty, max_lag)

    def session(self, serial: int, timeout: float) -> bool:
        """A replica slot's connections bound with ``serial`` (:meth:`Cell.bind`) may write
        in C from now on, no others; whether every write in C has ended within
        ``timeout`` (a write of another session may have been in C until then)."""
        assert _lib is not None
        return bool(_lib.repdisk_fast_session(self.index, serial, timeout))

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the last arm or disarm to take effect; whether it did."""
        assert _lib is not None
        return bool(_lib.repdisk_fast_wait(self.index, timeout))

    def stats(self) -> dict[str, int]:
        """``armed`` (0/1), the ``writes`` and ``bytes`` the filter acknowledged and, but
        for a replica slot, its idle ``connections`` to the secondary."""
        assert _lib is not None
        out = (ctypes.c_uint64 * 4)()
        _lib.repdisk_fast_stats(self.index, ctypes.byref(out))
        stats = {"armed": out[0], "writes": out[1], "bytes": out[2]}
        return stats if self.replica else {**stats, "connections": out[3]}


class Cell:
    """What one guest export serves now, for the filter: the slot of its target, if any."""

    def __init__(self) -> None:
        self.index = -1 if _lib is None else _lib.repdisk_fast_cell()

    def point(self, slot: Slot | None) -> None:
        if self.index >= 0:
            assert _lib is not None
            _lib.repdisk_fast_cell_set(self.index, -1 if slot is None else slot.index)

    def bind(self, session: int = -1) -> None:
        """The connection being opened on this thread serves this export (nbdkit's open),
        for a replica view in writer session ``session`` (its fence's serial)."""
        if self.index >= 0:
            assert _lib is not None
            _lib.repdisk_fast_bind(self.index, session)
