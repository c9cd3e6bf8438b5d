"""One controller per pair: the lease a node grants the controller it heard from last."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from repdisk.errors import ControlError

log = logging.getLogger(__name__)


class ControllerLease:
    """One controller per pair: the controller heard from last holds this node's lease.

    Every command a controller sends names it (``controller``); a command from another
    controller is refused while the holder's lease is fresh (it was heard within
    ``duration`` seconds, which the holder's heartbeat sets).  Commands without a name
    (an operator's ``repdisk ctl``) pass.  Not persisted: a lease stands for a controller
    that is alive now, which a restarted node learns from the next heartbeat; a node that
    restarted grants it to the first controller it hears, and the other is refused from
    its next command on.  A controller that stops cleanly releases it (``lease`` 0).
    """

    #: Lease length until a heartbeat names one.
    DEFAULT = 10.0

    def __init__(self) -> None:
        # Guards the fields below (commands arrive on several control connections).
        self._lock = threading.Lock()
        self.holder: str | None = None
        self.duration = self.DEFAULT
        self._heard = 0.0

    def check(self, who: str | None, duration: float | None = None) -> None:
        """Grant or renew the lease to ``who``; raise if another controller holds it."""
        if who is None:
            return
        with self._lock:
            now = time.monotonic()
            if self.holder not in (None, who) and now - self._heard < self.duration:
                raise ControlError(
                    f"controller lease refused: controller {self.holder} holds this node "
                    f"(heard {now - self._heard:.1f}s ago, lease {self.duration:g}s); one "
                    "controller per pair: stop that controller first")
            if duration == 0:            # the holder stops cleanly: anyone may take it now
                if self.holder == who:
                    log.info("controller lease released by %s", who)
                    self.holder = None
                return
            if self.holder != who:
                log.info("controller lease granted to %s", who)
            self.holder, self._heard = who, now
            if duration is not None and duration > 0:
                self.duration = duration

    def holder_now(self) -> str | None:
        """The controller whose lease is fresh, if one is."""
        with self._lock:
            fresh = time.monotonic() - self._heard < self.duration
            return self.holder if fresh else None

    def query(self) -> dict[str, Any] | None:
        with self._lock:
            if self.holder is None:
                return None
            return {"holder": self.holder, "duration": self.duration,
                    "age": round(time.monotonic() - self._heard, 3)}

