"""The replication framework: QEMU's ``replication.h`` in Python.

A process keeps a list of :class:`ReplicationState` objects, one per replicated
disk.  The ``*_all`` calls visit every state, **newest first** (QEMU inserts at
the head of its list), call the matching callback of its :class:`ReplicationOps`
and stop at the first error, which they raise as :class:`ReplicationError`
chained to the callback's exception.  Nothing is rolled back: like QEMU, the
caller learns which state failed from the message and decides what to do.

A missing callback is skipped.  A state may be removed while a walk is under
way (the walk runs over a snapshot).  The registry is thread-safe; callbacks run
without the registry lock held, so a callback may register or remove states.

QEMU has one process-wide list; here the list is a :class:`Registry` object, and each
node (or test) keeps its own.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from repdisk.errors import RepdiskError

log = logging.getLogger(__name__)

__all__ = [
    "ReplicationMode",
    "ReplicationError",
    "ReplicationOps",
    "ReplicationState",
    "Registry",
]


class ReplicationMode(enum.Enum):
    """Which side of the pair a replicated disk is (QEMU's ``ReplicationMode``)."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


class ReplicationError(RepdiskError):
    """A replication callback failed; ``state`` names the state that failed.

    Raised by the ``*_all`` calls with the callback's own exception as
    ``__cause__``, and by the replicas themselves for a wrong stage or mode.
    """

    def __init__(self, message: str, state: ReplicationState | None = None) -> None:
        super().__init__(message)
        self.state = state


StartFn = Callable[["ReplicationState", ReplicationMode], None]
StopFn = Callable[["ReplicationState", bool], None]
StateFn = Callable[["ReplicationState"], None]


@dataclass(frozen=True)
class ReplicationOps:
    """The four optional callbacks of a state; ``None`` means "skip"."""

    start: StartFn | None = None
    stop: StopFn | None = None
    checkpoint: StateFn | None = None
    get_error: StateFn | None = None

    @classmethod
    def bound_to(cls, replica: Any) -> ReplicationOps:
        """The callbacks of an object with ``start(mode)``, ``stop(failover)``,
        ``checkpoint()`` and ``get_error()`` methods (the primary and secondary replicas)."""
        return cls(start=lambda rs, mode: replica.start(mode),
                   stop=lambda rs, failover: replica.stop(failover),
                   checkpoint=lambda rs: replica.checkpoint(),
                   get_error=lambda rs: replica.get_error())


@dataclass(eq=False)
class ReplicationState:
    """One registered disk: what the callbacks act on (``opaque``) and how."""

    opaque: Any
    ops: ReplicationOps

    def __repr__(self) -> str:
        return f"ReplicationState({self.opaque!r})"


class Registry:
    """An ordered list of states, newest first, with QEMU's ``*_all`` walks."""

    def __init__(self) -> None:
        # Guards _states only; callbacks are called outside it.
        self._lock = threading.Lock()
        self._states: list[ReplicationState] = []

    def new(self, opaque: Any, ops: ReplicationOps) -> ReplicationState:
        """Register a state at the head of the list and return it."""
        rs = ReplicationState(opaque, ops)
        with self._lock:
            self._states.insert(0, rs)
        return rs

    def remove(self, rs: ReplicationState) -> None:
        """Unregister ``rs``; removing an unknown state is a no-op, as in QEMU."""
        with self._lock:
            self._states = [s for s in self._states if s is not rs]

    def states(self) -> list[ReplicationState]:
        """A snapshot of the states, newest first."""
        with self._lock:
            return list(self._states)

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def start_all(self, mode: ReplicationMode) -> None:
        self._walk("start", lambda fn, rs: fn(rs, mode))

    def do_checkpoint_all(self) -> None:
        self._walk("checkpoint", lambda fn, rs: fn(rs))

    def get_error_all(self) -> None:
        """Raise the first state's error as it is: the error is the answer, not a failure of
        ``get_error`` (QEMU propagates it unchanged)."""
        self._walk("get_error", lambda fn, rs: fn(rs), name_op=False)

    def stop_all(self, failover: bool) -> None:
        self._walk("stop", lambda fn, rs: fn(rs, failover))

    def _walk(self, op: str, call: Callable[[Callable[..., None], ReplicationState], None],
              name_op: bool = True) -> None:
        """Call ``op`` on every state still registered, newest first; stop at the first error,
        raised as ``OPAQUE: OP failed: WHY`` (``WHY`` without an ``OPAQUE:`` of its own), or
        ``OPAQUE: WHY`` without ``name_op``."""
        for rs in self.states():
            fn = getattr(rs.ops, op)
            if fn is None:
                continue
            with self._lock:
                if not any(s is rs for s in self._states):
                    continue  # removed by an earlier callback of this walk
            try:
                call(fn, rs)
            except Exception as err:  # noqa: BLE001 - every callback error stops the walk
                log.debug("replication %s of %r failed: %s", op, rs, err)
                why = str(err).removeprefix(f"{rs.opaque}: ")
                what = f"{op} failed: " if name_op else ""
                raise ReplicationError(f"{rs.opaque}: {what}{why}", rs) from err
