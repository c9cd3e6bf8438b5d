"""File helpers under the images: fallocate modes, whole reads and writes, data runs.

Every function takes a file descriptor and raises ``BlockIOError`` (or lets an
``OSError`` through for :func:`os_errors` to name); none keeps state.  A mode the
filesystem cannot do is reported as False, never raised, so that callers can switch
a fast path off for good (``RawImage.zero``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from repdisk.errors import BlockIOError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# What fallocate says when a filesystem or device cannot do a mode (ENOTSUP == EOPNOTSUPP).
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV})

_libc = ctypes.CDLL(None, use_errno=True)
_libc_fallocate = getattr(_libc, "fallocate64", _libc.fallocate)
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc_fallocate.restype = ctypes.c_int

# Source of zeros for the write-zeros fallback and for reads past a short file's end.
ZEROS = memoryview(bytes(1 << 20))


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Run fallocate; False if the filesystem does not support ``mode``, raise on failure."""
    while True:
        if _libc_fallocate(fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in UNSUPPORTED:
            return False
        raise BlockIOError(err, f"fallocate(mode {mode:#x}) of [{offset}, {offset + length}) "
                                f"on fd {fd} failed: {os.strerror(err)}")


def whole_blocks(nbytes: int) -> int:
    """``nbytes`` rounded up to whole 4 KiB blocks."""
    return -(-nbytes // 4096) * 4096


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False when the filesystem cannot punch holes."""
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def read_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill all of ``view`` from ``offset``; bytes past the end of a short file read as zeros."""
    n = len(view)
    done = os.preadv(fd, [view], offset)  # nearly always all of it: one call
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            while done < n:
                step = min(n - done, len(ZEROS))
                view[done:done + step] = ZEROS[:step]
                done += step
        done += got


def write_full(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset``, looping on short writes."""
    n = len(view)
    done = os.pwrite(fd, view, offset)  # nearly always all of it: one call
    while done < n:
        done += os.pwrite(fd, view[done:], offset + done)


# What copy_file_range says when it cannot copy between these two files at all: not

def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(offset, end, is_data)`` runs of ``[start, end)`` found with SEEK_DATA/SEEK_HOLE.

    Where the system cannot tell, everything is data (a safe answer: data may be zeros,
    but a hole is promised to be zeros).
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:        # no data at or after pos
                data = end
            elif err.errno in (errno.EINVAL, *UNSUPPORTED):
                yield pos, end, True
                return
            else:
                raise
        data = min(data, end)
        if data > pos:
            yield pos, data, False
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        if hole > pos:                          # else the data just vanished: look again
            yield pos, hole, True
            pos = hole


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Turn an OSError into a BlockIOError that names the object and the call."""
    try:
        yield
    except BlockIOError:
        raise
    except OSError as err:
        raise block_error(err, what) from err


def block_error(err: OSError, what: str) -> BlockIOError:
    """The BlockIOError for ``err``; the hot paths catch OSError themselves and call this,
    so a request pays for its message only when it fails."""
    return BlockIOError(err.errno or errno.EIO, f"{what} failed: {err.strerror or err}")


def create_file(path: str, exist_ok: bool, what: str) -> int:
    """Create ``path`` read-write, refusing an existing one unless ``exist_ok``."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if exist_ok else os.O_EXCL)
    try:
        return os.open(path, flags, 0o644)
    except FileExistsError:
        raise BlockIOError(errno.EEXIST, f"{what} {path} already exists and is not "
                                         "overwritten; move it away if it is not wanted") from None
    except OSError as err:
        raise BlockIOError(err.errno or errno.EIO,
                           f"cannot create {what} {path}: {err.strerror}") from err
