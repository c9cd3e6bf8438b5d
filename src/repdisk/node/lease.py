"""One controller per pair: the lease a node grants the controller it heard from last."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from repdisk.errors import ControlError
from repdisk.qmp.server import gone

log = logging.getLogger(__name__)


class ControllerLease:
    """One controller per pair: the controller heard from last holds this node's lease.

    Every command a controller sends names it (``controller``); a command from another
    controller is refused while the holder's lease is fresh (it was heard within
    ``duration`` seconds, which the holder's heartbeat sets).  Commands without a name
    (an operator's ``repdisk ctl``) pass.  Not persisted: a lease stands for a controller
    that is alive now, which a restarted node learns from the next heartbeat; a node that
    restarted grants it to the first controller it hears, and the other is refused from
    its next command on.  A controller that stops cleanly releases it (``lease`` 0).  A
    controller of this host whose control socket refuses connections (killed) holds no
    lease, however recently it was heard.
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
            if self.holder not in (None, who) and self._fresh(now):
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
            return self.holder if self._fresh(time.monotonic()) else None

    def _fresh(self, now: float) -> bool:
        """Whether the holder's lease stands (under the lock): heard within ``duration``,
        and not a controller of this host that is gone."""
        return self.holder is not None and now - self._heard < self.duration and \
            not _holder_gone(self.holder)

    def query(self) -> dict[str, Any] | None:
        """The holder, the lease's length, how long ago it was heard, and whether the lease
        stands (``fresh``: heard within the length, and not a controller of this host that
        is gone); None if no controller was heard."""
        with self._lock:
            if self.holder is None:
                return None
            now = time.monotonic()
            return {"holder": self.holder, "duration": self.duration,
                    "age": round(now - self._heard, 3), "fresh": self._fresh(now)}


def controller_socket(holder: str) -> str:
    """How ``repdisk ctl`` reaches the controller ``holder`` (its ident) from this host: its
    control socket when it is of this host, its TCP port when it has only that, else
    ``CONTROLLER-SOCKET`` (a path on its own host)."""
    host, _, where = holder.partition(":")
    if where.startswith("tcp:"):
        return where.removeprefix("tcp:")
    return where if host == socket.gethostname() and where.startswith("/") \
        else "CONTROLLER-SOCKET"


def _holder_gone(holder: str) -> bool:
    """Whether ``holder`` (a controller's ident: ``HOST:/control/socket``) is of this host
    and nothing serves its control socket any more: removed, or refusing connections (left
    by a killed controller).  A controller elsewhere, or on TCP only, is never known gone."""
    host, _, where = holder.partition(":")
    if host != socket.gethostname() or not where.startswith("/"):
        return False
    return gone(where, 0.5)

