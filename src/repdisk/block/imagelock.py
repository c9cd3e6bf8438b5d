"""QEMU's image locks: who may open a node's files (docs/DESIGN.md, "Who may open").

QEMU (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes) marks an image in
use with one-byte, shared (F_RDLCK) open-file-description locks: byte 100 + i while it
holds permission bit i, byte 200 + i while it does *not* share it with others.  A user
that wants bit i conflicts with anyone's lock on 200 + i; one that does not share bit i
conflicts with anyone's lock on 100 + i.  Taking the same locks makes QEMU's own tools
(qemu-io, qemu-img, a QEMU guest) refuse an image a node serves, and one node another's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from repdisk.errors import BlockIOError, block_error

LOCK_PERM_BASE, LOCK_SHARED_BASE = 100, 200
#: QEMU's BLK_PERM_* bits (7.2): consistent read, write, write unchanged, resize.
PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 0x1, 0x2, 0x4, 0x8
PERM_ALL = 0xF
#: What a node does with the files it serves, and what it lets others do: read only (what
#: qemu-nbd or a guest without share-rw takes on a writable image).
SERVING_PERM = PERM_ALL
SERVING_SHARED = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED

_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64/aarch64: type, whence, start, len, pid


def _ofd_lock(fd: int, command: int, kind: int, offset: int, length: int = 1) -> int:
    """One fcntl(F_OFD_*) call on ``[offset, offset+length)``; the l_type it returns."""
    raw = fcntl.fcntl(fd, command, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, length, 0))
    return int(struct.unpack(_FLOCK, raw)[0])


def lock_image(fd: int, path: str, perm: int = SERVING_PERM,
               shared: int = SERVING_SHARED) -> None:
    """Take QEMU's locks on ``fd`` for ``perm``, sharing only ``shared``, or refuse.

    Applied, then checked, as QEMU does: of two users opening at once at least one finds
    the other.  Released when the file is closed (the locks belong to its open file
    description).  Raises BlockIOError(EBUSY) naming the holder(s) of a conflicting lock.
    """
    unshared = PERM_ALL & ~shared
    bits = range(PERM_ALL.bit_length())
    try:
        for i in bits:
            for base, mask in ((LOCK_PERM_BASE, perm), (LOCK_SHARED_BASE, unshared)):
                if mask >> i & 1:
                    _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, base + i)
        conflict = any(
            mask >> i & 1 and _ofd_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, base + i)
            != fcntl.F_UNLCK
            for i in bits for base, mask in ((LOCK_SHARED_BASE, perm), (LOCK_PERM_BASE, unshared)))
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise block_error(err, f"{path}: lock") from err
        conflict = True
    if conflict:
        _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, LOCK_PERM_BASE,
                  LOCK_SHARED_BASE + len(bits) - LOCK_PERM_BASE)
        raise BlockIOError(errno.EBUSY, f"{path} is in use by {_lock_holders(fd)}: stop it "
                                        "first (two writers would corrupt it)")


def _lock_holders(fd: int) -> str:
    """Who else holds OFD locks on ``fd``'s file (scans /proc: a refusal's cost only)."""
    me = os.fstat(fd)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for n in os.listdir(f"/proc/{pid}/fd"):
                if int(pid) == os.getpid() and int(n) == fd:
                    continue
                st = os.stat(f"/proc/{pid}/fd/{n}")
                if (st.st_dev, st.st_ino) != (me.st_dev, me.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}", encoding="utf-8") as f:
                    if "OFDLCK" in f.read():
                        found.append(_describe_process(int(pid)))
                        break
        except OSError:
            continue  # gone, or not ours to look at
    return ", ".join(found) or "another process"


def _describe_process(pid: int) -> str:
    """``repdisk node (pid N, control PATH)`` for a node, else ``COMMAND (pid N)``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            comm = f.read().strip()
    except OSError:
        return f"pid {pid}"
    control = next((a[len("control="):] for a in args if a.startswith("control=")), None)
    if control is not None:
        return f"repdisk node (pid {pid}, control {control})"
    return f"{comm} (pid {pid})"
