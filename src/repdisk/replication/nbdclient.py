"""libnbd from Python without its blocking calls: a handle driven with ``poll``.

libnbd's own tests drive the async API with an external loop: on each round wait for
what ``aio_get_direction()`` says (0 means do not wait: the handle is dead or closed),
then ``aio_notify_read()`` / ``aio_notify_write()``.  :func:`pump` is that loop for a
handle no other thread uses (a handshake, a close, a one-off question); the forwarder's
I/O thread runs its own (it also waits for its wake-up fd and reads every reply waiting),
with the same :data:`POLL_EVENTS` and :data:`READABLE`.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

import nbd

from repdisk import tls

__all__ = ["READABLE", "POLL_EVENTS", "pump", "list_exports"]

#: What poll reports that libnbd must read to find out (a reply, or the end of the link).
READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL

#: The poll events for each answer of ``aio_get_direction()`` (0: none, the handle is dead
#: or closed), a lookup rather than a call: the forwarder asks after every round.
POLL_EVENTS: tuple[int, ...] = tuple(
    (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0)
    | (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0)
    for direction in range(nbd.AIO_DIRECTION_BOTH + 1))


def pump(h: Any, until: Callable[[], bool], deadline: float) -> bool:
    """Drive ``h`` with a private poll loop until ``until()`` or ``deadline``; True if reached.

    Used where no other thread can use the handle yet (handshake) or any more (close).
    """
    while not until():
        left = deadline - time.monotonic()
        mask = POLL_EVENTS[h.aio_get_direction()]
        if left <= 0 or not mask:  # no mask: dead or closed, nothing more will happen
            return until()
        p = select.poll()
        p.register(h.aio_get_fd(), mask)
        for _fd, events in p.poll(int(left * 1000) + 1):
            if events & select.POLLOUT:
                h.aio_notify_write()
            if events & READABLE:  # HUP/ERR too: the read finds out
                h.aio_notify_read()
    return True


def list_exports(uri: str, timeout: float = 5.0) -> dict[str, str] | None:
    """The exports the NBD server at ``uri`` lists, name -> description, or None if it
    cannot say (it does not answer in ``timeout``, or refuses to list)."""
    h = nbd.NBD()
    listed: dict[str, str] = {}
    try:
        tls.prepare_client(h, uri)
        h.set_opt_mode(True)
        h.aio_connect_uri(uri)
        if not pump(h, lambda: not h.aio_is_connecting() or h.aio_is_negotiating(),
                    time.monotonic() + timeout) or not h.aio_is_negotiating():
            return None

        def add(name: str, description: str) -> int:
            listed[name] = description
            return 0

        h.opt_list(add)
        h.opt_abort()
    except nbd.Error:
        return None
    return listed  # the handle closes when dropped
