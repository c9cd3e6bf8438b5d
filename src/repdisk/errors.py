"""repdisk's exceptions: one root, so callers can catch everything repdisk raises.

    RepdiskError
     +-- ConfigError        a bad key or value at start-up (names the key)
     +-- BlockIOError       an I/O request failed; carries the errno the NBD client should see
     +-- ForwardError       the primary could not reach or write to its secondary
     +-- ControlError       a control command failed (QMP error class + description)

Defined beside the code that raises them, each a direct subclass of the root:
``ReplicationError`` (a replication transition failed, repdisk.replication.framework),
``NodeUnreachable`` and ``ControllerRefused`` (repdisk.controller.peer), ``ResourceError``
(a resource file's mistake, repdisk.cli.resources), ``StartFailed`` (a detached process did
not get ready, repdisk.detach).
"""

from __future__ import annotations

import errno as _errno


class RepdiskError(Exception):
    """Root of every exception repdisk raises on purpose."""


class ConfigError(RepdiskError):
    """A start-up parameter is wrong; ``key`` names it, the message says how to fix it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class BlockIOError(RepdiskError, OSError):
    """An I/O request failed; ``errno`` is what the NBD client is told."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class ForwardError(RepdiskError):
    """The primary's link to its secondary failed."""


class ControlError(RepdiskError):
    """A control command failed; ``error_class`` is the QMP error class."""

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


def check_range(size: int, offset: int, length: int, write: bool = False) -> None:
    """Refuse a request that is empty, negative or past the end, naming what is wrong."""
    if length <= 0:
        raise BlockIOError(_errno.EINVAL, f"invalid request length {length} at offset {offset}")
    if offset < 0 or offset + length > size:
        raise BlockIOError(_errno.ENOSPC if write else _errno.EINVAL,
                           f"request [{offset}, {offset + length}) is past the end of the "
                           f"{size}-byte disk")


def block_error(err: OSError, what: str) -> BlockIOError:
    """The BlockIOError for ``err``; the hot paths catch OSError themselves and call this,
    so a request pays for its message only when it fails."""
    return BlockIOError(err.errno or _errno.EIO, f"{what} failed: {err.strerror or err}")
