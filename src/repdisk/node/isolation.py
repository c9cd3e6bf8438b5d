"""A primary's guard against split brain (see :class:`Isolation`)."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from repdisk.errors import BlockIOError
from repdisk.replication.stage import EventSink

log = logging.getLogger(__name__)


def _nothing() -> None:
    """No one to tell."""


class Isolation:
    """A primary's guard against split brain: no contact for ``timeout`` -> isolated.

    Contact is a controller heartbeat (:meth:`contact`) or an acknowledgement from the
    secondary (``secondary_answers``, polled by a monitor thread; it may probe an idle
    link).  Isolated with policy ``suspend``: guest writes wait in :meth:`admit` until
    contact returns (reads go on); with ``continue``: only reported.  Fenced (the
    controller failed over meanwhile): writes fail with EROFS for good.

    Armed by the first controller heartbeat: a primary that no controller manages
    (``repdisk lab``, tests of a bare pair) never suspends.  The controller must fail over
    only after its heartbeat-timeout, which must exceed ``timeout``: an isolated primary
    has then already stopped acknowledging writes.
    """

    def __init__(self, timeout: float, policy: str, secondary_answers: Callable[[], bool],
                 events: EventSink, fenced: str = "") -> None:
        self.timeout = timeout
        self.policy = policy
        self._secondary_answers = secondary_answers
        self._events = events
        # Guards every field below; waiters in admit() wait on it.
        self._cond = threading.Condition()
        self._armed = False
        self._last_contact = time.monotonic()
        self.isolated = False
        self.suspended = False
        #: Writes are held while a refusal by the secondary is judged (hold_for_verdict;
        #: how many verdicts are awaited, one per disk refused).
        self.judging = 0
        self.fenced = fenced
        #: Told (with ``_cond`` held) after any change of what :meth:`blocking` or
        #: :meth:`deadline` say: the node's Admission republishes them to the fast path.
        self.on_change: Callable[[], None] = _nothing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repdisk-isolation", daemon=True)
        self._thread.start()

    def overdue(self) -> bool:
        """Armed and the last contact older than ``timeout``, whether or not the monitor
        has seen it yet (a node that was stopped or starved wakes with a stale verdict);
        plain fields, read without the lock."""
        return self._armed and time.monotonic() - self._last_contact >= self.timeout

    def blocking(self) -> bool:
        """Whether a write must wait here or be refused, whatever the time."""
        return bool(self.suspended or self.fenced or self.judging)

    def deadline(self) -> float | None:
        """From when on (``time.monotonic()``) a write must be judged here: the last contact
        plus the timeout; None while unarmed (no controller: never)."""
        return self._last_contact + self.timeout if self._armed else None

    def admit(self) -> None:
        """Let a guest write through, hold it while suspended, refuse it once fenced.

        ``Admission`` calls it only while ``suspended``, ``fenced`` or :meth:`overdue`
        (plain fields, read without the lock: a write racing the change is either side of
        it); an overdue guard is judged again here first."""
        if not self.suspended and not self.fenced and not self.judging:
            if not self.overdue():
                return
            with self._cond:
                self._update()
        with self._cond:
            while not self.fenced and (self.suspended or self.judging):
                self._cond.wait()
            if self.fenced:
                raise BlockIOError(errno.EROFS, f"guest write refused: this node is fenced: "
                                                f"{self.fenced}")

    def contact(self) -> None:
        """The controller was heard from (arms the guard)."""
        with self._cond:
            self._armed = True
            self._last_contact = max(self._last_contact, time.monotonic())
            self._update()
            self.on_change()

    def hold_for_verdict(self, held: bool) -> None:
        """Hold guest writes (True) until the verdict (False, or :meth:`fence`): the
        secondary refused this primary's writes, and whether another node took over is
        being asked.  Calls pair up; writes wait until every verdict is in."""
        with self._cond:
            self.judging += 1 if held else -1
            self._cond.notify_all()
            self.on_change()

    def fence(self, reason: str) -> None:
        with self._cond:
            first = not self.fenced
            self.fenced = reason
            self._cond.notify_all()
            self.on_change()
        if first:
            log.error("fenced: %s; guest writes fail from now on", reason)
            self._events("NODE_FENCED", {"reason": reason})

    def _run(self) -> None:
        tick = min(self.timeout / 4, 0.25)
        looked = time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            # Ask the link only when contact is getting old: a probe costs a flush.
            if self._armed and now - self._last_contact > self.timeout / 3:
                if self._secondary_answers():
                    with self._cond:  # the acknowledgement came after the previous look
                        self._last_contact = max(self._last_contact, looked)
                        self.on_change()
                looked = now
            elif not self._armed and now - looked >= self.timeout:
                # No controller: an idle link is still probed now and then, for a
                # secondary asked to stop (SIGTERM) closes its connection only after a
                # request, and a dead one is then noticed before the next guest write.
                self._secondary_answers()
                looked = now
            with self._cond:
                self._update()

    def _update(self) -> None:
        """Re-evaluate isolation (``_cond`` held); log and report a change."""
        since = time.monotonic() - self._last_contact
        isolated = self._armed and since >= self.timeout
        if isolated == self.isolated:
            return
        self.isolated = isolated
        self.suspended = isolated and self.policy == "suspend"
        self._cond.notify_all()
        self.on_change()
        if isolated:
            log.error("isolated: no contact with the secondary or the controller for %.1fs; "
                      "guest writes %s", since,
                      "are held" if self.suspended else "go on (on-isolation=continue)")
            self._events("NODE_ISOLATED", {"policy": self.policy, "since": since})
        else:
            log.warning("contact restored; guest writes flow again")
            self._events("NODE_CONTACT_RESTORED", {})

    def query(self) -> dict[str, Any]:
        with self._cond:
            return {"policy": self.policy, "timeout": self.timeout, "armed": self._armed,
                    "isolated": self.isolated, "suspended": self.suspended,
                    "fenced": self.fenced or None,
                    "last_contact_age": round(time.monotonic() - self._last_contact, 3)}

    def close(self) -> None:
        """Stop the monitor; writes still held are refused (the node is going away)."""
        self._stop.set()
        self._thread.join()
        with self._cond:
            self.fenced = self.fenced or "the node is shutting down"
            self._cond.notify_all()
            self.on_change()

