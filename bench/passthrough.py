"""Minimal nbdkit Python plugin that passes every request straight to one file.

It is the benchmark's ceiling for *any* nbdkit Python plugin: the same nbdkit, the same
Python interpreter and GIL hand-offs as repdisk's plugin, and nothing else (no locks, no
replication). Whatever repdisk loses against this plugin is repdisk's own cost; whatever this
plugin loses against nbdkit's C `file` plugin is the price of Python.

Usage: nbdkit python bench/passthrough.py file=DISK.img

Keys:
  file=PATH   the raw image to serve (required); opened read-write unless nbdkit is -r
"""

from __future__ import annotations

import errno
import os
import sys

import nbdkit

# The same per-thread Python state as repdisk's plugin (src/repdisk/threadstate.py): without
# it nbdkit 1.32 creates and destroys a Python thread state per request, and the ceiling
# would be that cost, not Python's.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                                "src"))
from repdisk.node.threadstate import pin, reap  # noqa: E402

API_VERSION = 2

_path: str | None = None


def thread_model() -> int:
    """Requests run in parallel: pread/pwrite are positioned and need no lock."""
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    """Accept only `file`, so a typo fails at start-up instead of serving nothing."""
    global _path
    if key != "file":
        raise RuntimeError(f"passthrough: unknown key {key!r}: only file=PATH is accepted")
    _path = os.path.abspath(value)


def config_complete() -> None:
    """The file key is required."""
    if _path is None:
        raise RuntimeError("passthrough: missing file=PATH: name the image to serve")


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's callback name
    """One fd per connection; it is the handle."""
    assert _path is not None
    reap()
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(h: int) -> None:
    os.close(h)
    reap()


def get_size(h: int) -> int:
    return os.fstat(h).st_size


def can_multi_conn(h: int) -> bool:
    """Every connection sees the same page cache, and flush is fdatasync of the same file."""
    return True


def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    """Read straight into nbdkit's buffer; loop only on a short read."""
    pin()
    view = memoryview(buf)
    while view:
        n = os.preadv(h, [view], offset)
        if n == 0:
            nbdkit.set_error(errno.EIO)
            raise RuntimeError(f"passthrough: short read at offset {offset}: end of file")
        view = view[n:]
        offset += n


def pwrite(h: int, buf: memoryview, offset: int, flags: int) -> None:
    """Write from nbdkit's buffer without a copy; FUA becomes fdatasync."""
    pin()
    view = memoryview(buf)
    while view:
        n = os.pwrite(h, view, offset)
        view = view[n:]
        offset += n
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(h)


def flush(h: int, flags: int) -> None:
    os.fdatasync(h)
