"""Stages of a replicated disk and the guard clauses every transition starts with.

The stage machine itself (which transition does what) lives with each replica:
``secondary.py`` and ``primary.py``, one function per transition, as in QEMU's
``block/replication.c``.  What both sides share is here: the stage enum, the
one place that writes the stage (``StageMachine.set_stage``, which logs and
emits an event), the recorded error, and the guards QEMU puts in front of
``start``, ``checkpoint``, ``get_error`` and ``stop``.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from typing import Any

from repdisk.replication.framework import ReplicationError, ReplicationMode

log = logging.getLogger(__name__)

#: Receives ``(event_name, data)``; the control socket turns these into QMP events.
EventSink = Callable[[str, dict[str, Any]], None]


def no_events(name: str, data: dict[str, Any]) -> None:
    """The default event sink: drop everything."""


class Stage(enum.Enum):
    NONE = "none"                        # not started: every I/O fails
    RUNNING = "running"                  # replicating
    FAILOVER = "failover"                # secondary: committing its overlays into the disk
    FAILOVER_FAILED = "failover-failed"  # secondary: commit failed; terminal
    DONE = "done"                        # replication over (failover done, or stopped)


class StageMachine:
    """A replica's stage and last error; the only writer of both."""

    def __init__(self, name: str, mode: ReplicationMode, events: EventSink = no_events) -> None:
        self.name = name
        self.mode = mode
        self.events = events
        # Serializes transitions of this replica (start/checkpoint/stop); reentrant so a
        # transition may call another (start runs a checkpoint).
        self.lock = threading.RLock()
        #: The stage: read it freely (a plain field, so the I/O gates read it without a
        #: call); :meth:`set_stage` is its one writer (tests/test_lint.py checks).
        self.stage = Stage.NONE
        self._error: str | None = None

    @property
    def error(self) -> str | None:
        return self._error

    def set_stage(self, new: Stage) -> None:
        old, self.stage = self.stage, new
        if old is not new:
            log.info("%s: stage %s -> %s", self.name, old.value, new.value)
            self.events("REPLICATION_STAGE_CHANGED", {
                "disk": self.name, "mode": self.mode.value, "from": old.value, "to": new.value})

    def record_error(self, message: str) -> None:
        """Remember the first error since it was last cleared; ``get_error`` reports it."""
        if self._error is None:
            self._error = message
            log.error("%s: %s", self.name, message)
            self.events("REPLICATION_ERROR", {"disk": self.name, "mode": self.mode.value,
                                              "error": message})

    def replace_error(self, message: str) -> None:
        """Record ``message`` in place of the error recorded so far (the same failure, whose
        newest cause is the one to act on); logged once, not again while it stays."""
        if message != self._error:
            self._error = None
            self.record_error(message)

    def clear_error(self) -> None:
        self._error = None

    def progress(self, kind: str, done: int, total: int) -> None:
        """A ``KIND_PROGRESS`` event: the one shape `repdisk ctl` and the controller read."""
        self.events(f"{kind}_PROGRESS", {"disk": self.name, "done": done, "total": total})

    # -- guards ---------------------------------------------------------------

    def finished(self) -> bool:
        """DONE or FAILOVER: start, checkpoint and stop are ignored (QEMU checks this first)."""
        return self.stage in (Stage.DONE, Stage.FAILOVER)

    def guard_start(self, mode: ReplicationMode) -> bool:
        """True if start must run; False if it is ignored; raises for a wrong stage or mode."""
        if self.finished():
            return False
        if mode is not self.mode:   # first: "started already" would hide the wrong node
            raise ReplicationError(f"{self.name}: the start mode {mode.value} does not match "
                                   f"this disk's mode {self.mode.value}: start this node with "
                                   f"mode={self.mode.value}, or send mode={mode.value} to the "
                                   f"{mode.value}'s control socket")
        if self.stage is not Stage.NONE:
            raise ReplicationError(f"{self.name}: replication is running or done "
                                   f"(stage {self.stage.value}): it is started already, "
                                   "nothing to do")
        return True

    def guard_running(self, op: str) -> bool:
        """True if ``op`` must run; False if ignored; raises unless RUNNING."""
        if self.finished():
            return False
        if self.stage is not Stage.RUNNING:
            raise ReplicationError(f"{self.name}: cannot {op}: replication is not running "
                                   f"(stage {self.stage.value})")
        return True

    def get_error(self) -> None:
        """QEMU's get_error: NONE is an error, then any recorded I/O error."""
        if self.stage is Stage.NONE:
            raise ReplicationError(f"{self.name}: replication is not running")
        if self._error is not None:
            raise ReplicationError(f"{self.name}: {self._error}")
