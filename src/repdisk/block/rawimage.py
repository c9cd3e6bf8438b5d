"""Raw images: a sparse file or a block device as a ``BlockDevice``, and the calls on raw
files that every image is built of.

The file calls (fallocate modes, whole reads and writes, SEEK_DATA runs, creating a file)
take a file descriptor and keep no state; a mode the filesystem cannot do is reported as
False, never raised, so that a caller can switch a fast path off for good.  The overlay
uses them on its data and bitmap files too.

``zero`` tries the fast paths in order (punch a hole, then zero the range, then write
zeros) and switches each one off for good, with a debug line, the first time the
filesystem says "not supported", as nbdkit's file plugin does.  Copies between two of
them (``copy_range``) run in the kernel where it can (copy_file_range), with the same
switch-off rule.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from repdisk.block.device import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    BlockDevice,
    Buffer,
    Extent,
    add_extent,
    byte_view,
)
from repdisk.block.imagelock import lock_image
from repdisk.errors import BlockIOError, block_error, check_range

log = logging.getLogger(__name__)

__all__ = ["RawImage", "copy_range", "COPY_CHUNK", "punch_hole", "fallocate", "data_runs",
           "read_full", "write_full", "os_errors", "create_file", "whole_blocks"]

#: Largest single buffer of ``copy_range`` (and of an overlay's commit: adjacent clusters
#: are coalesced up to it).
COPY_CHUNK = 4 << 20

# -- the calls on raw files under every image (raw image, overlay data and bitmap files) --

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


def data_runs(fd: int, start: int, end: int,
              granule: int = 0) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(offset, end, is_data)`` runs of ``[start, end)`` found with SEEK_DATA/SEEK_HOLE.

    Where the system cannot tell, everything is data (a safe answer: data may be zeros,
    but a hole is promised to be zeros).

    SEEK_HOLE searches up to the next hole, which in a fully allocated file is its end:
    its cost grows with what lies after ``start``, not with ``end - start``.  With a
    ``granule``, no SEEK_HOLE is made: data found at an offset is taken to reach the next
    multiple of ``granule`` (one SEEK_DATA per granule of data, one per hole), so a data
    run may hold zeros up to a granule's end.  Adjacent data runs come as one.
    """
    pos, run = start, start         # run: where the data run ending at pos began
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:        # no data at or after pos
                data = end
            elif err.errno in (errno.EINVAL, *UNSUPPORTED):
                yield run, end, True
                return
            else:
                raise
        data = min(data, end)
        if data > pos:
            if run < pos:
                yield run, pos, True
            yield pos, data, False
            pos = run = data
            continue
        if granule:
            pos = min(end, pos - pos % granule + granule)
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        if hole > pos:                          # else the data just vanished: look again
            yield run, hole, True
            pos = run = hole
    if run < pos:
        yield run, pos, True


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Turn an OSError into a BlockIOError that names the object and the call."""
    try:
        yield
    except BlockIOError:
        raise
    except OSError as err:
        raise block_error(err, what) from err


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


# -- raw images ----------------------------------------------------------------------

# What copy_file_range says when it cannot copy between these two files at all: not
# regular files (EINVAL), different filesystems (EXDEV), no support (the UNSUPPORTED set).
_NO_KERNEL_COPY = frozenset({errno.EINVAL, errno.EXDEV, *UNSUPPORTED})


def copy_range(src: BlockDevice, dst: BlockDevice, offset: int, length: int) -> None:
    """Copy ``[offset, offset + length)`` of ``src`` to the same place in ``dst``.

    Overlays keep a cluster at its own offset in their data file, so copy-before-write
    and commit are both this.  Between two raw images the kernel copies
    (``RawImage.copy_to``): one copy of each byte instead of a read into a buffer and a
    write out of it, and one system call instead of two, for the secondary's every first
    write to a cluster.  Anywhere else, or once the kernel has refused, through a buffer
    of at most COPY_CHUNK bytes.
    """
    if isinstance(src, RawImage) and isinstance(dst, RawImage):
        done = src.copy_to(dst, offset, length)
        offset, length = offset + done, length - done
    if not length:
        return
    buf = memoryview(bytearray(min(length, COPY_CHUNK)))
    for pos in range(offset, offset + length, len(buf)):
        piece = buf[:min(len(buf), offset + length - pos)]
        src.pread_into(piece, pos)
        dst.pwrite(piece, pos)


#: The extended attribute that names a disk file (RawImage.identity).
IDENTITY_XATTR = "user.repdisk.id"
#: What a file system without (user) extended attributes answers.
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


class RawImage:
    """A raw disk image: a (sparse) regular file or a block device.

    Create with :meth:`create` or open with :meth:`open`; the size is fixed at open time.
    """

    def __init__(self, path: str, fd: int, size: int, readonly: bool) -> None:
        self.path = path
        self.size = size
        self.readonly = readonly
        self._fd = fd
        # Fast paths of zero(), switched off for good once the filesystem refuses them.
        self._can_punch = True
        self._can_zero_range = True
        self._can_copy = True  # copy_to in the kernel (copy_file_range), see there

    def identity(self) -> str | None:
        """Which file this is, not what it holds: a random name kept in the file's extended
        attribute ``user.repdisk.id`` (None if it has none yet, see :meth:`named`), which a
        new file at the same path lacks even where the file system reuses the inode
        number; a block device's own number; where the file system keeps no extended
        attributes, the device and inode."""
        return self._identity(create=False)

    def named(self) -> str:
        """:meth:`identity`, giving the file its name first if it has none."""
        name = self._identity(create=True)
        assert name is not None
        return name

    def _identity(self, create: bool) -> str | None:
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            return f"dev {st.st_rdev}"
        try:
            return os.getxattr(self._fd, IDENTITY_XATTR).decode("ascii", "replace")
        except OSError as err:
            if err.errno in _NO_XATTRS:
                return f"{st.st_dev}:{st.st_ino}"
            if err.errno != errno.ENODATA:
                raise
        if not create:
            return None
        name = secrets.token_hex(16)
        try:
            os.setxattr(self._fd, IDENTITY_XATTR, name.encode("ascii"))
        except OSError as err:
            if err.errno not in _NO_XATTRS:
                raise
            return f"{st.st_dev}:{st.st_ino}"
        return name

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, exist_ok: bool = False) -> RawImage:
        """Create a sparse image of ``size`` bytes (an existing file is resized if exist_ok)."""
        if size <= 0:
            raise ValueError(f"raw image {os.fspath(path)}: size must be positive, not {size}")
        name = os.fspath(path)
        fd = create_file(name, exist_ok, "raw image")
        try:
            with os_errors(f"raw image {name}: ftruncate to {size} bytes"):
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, size, False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], readonly: bool = False) -> RawImage:
        """Open an existing file or block device; its current size is the disk's size."""
        name = os.fspath(path)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(name, flags)
        except OSError as err:
            raise BlockIOError(err.errno or errno.EIO,
                               f"cannot open raw image {name}: {err.strerror}") from err
        try:
            size = cls._size_of(name, fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, size, readonly)

    @staticmethod
    def _size_of(name: str, fd: int) -> int:
        """The size of a regular file or block device, refusing anything else and size 0."""
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            size = os.fstat(fd).st_size
        elif stat.S_ISBLK(mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise BlockIOError(errno.EINVAL,
                               f"raw image {name} is not a regular file or block device")
        if size == 0:
            raise BlockIOError(errno.EINVAL, f"raw image {name} is empty (0 bytes): give it a "
                                             f"size first, e.g. truncate -s 1G {name}")
        return size

    def lock(self) -> None:
        """Mark the file in use for writing, as QEMU does (:func:`lock_image`)."""
        lock_image(self._fd, self.path)

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        """Close the file (without flushing: callers flush when they need durability)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RawImage({self.path!r}, size={self.size})"

    def _check_writable(self) -> None:
        if self.readonly:
            raise BlockIOError(errno.EROFS, f"raw image {self.path} is open read-only")

    def pread_into(self, buf: Buffer, offset: int) -> None:
        # The guest's every read comes here: the common case is one preadv and no call of
        # ours (check_range and read_full only when the request is bad or the read short).
        view = byte_view(buf)
        n = len(view)
        if n <= 0 or offset < 0 or offset + n > self.size:
            check_range(self.size, offset, n)
        try:
            if os.preadv(self._fd, [view], offset) != n:
                read_full(self._fd, view, offset)
        except OSError as err:
            raise block_error(err, f"raw image {self.path}: read at {offset}") from err

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        # Every write comes here: the common case is one pwrite and no call of ours
        # (check_range and write_full only when the request is bad or the write short).
        view = memoryview(buf)
        n = view.nbytes
        if n <= 0 or offset < 0 or offset + n > self.size:
            check_range(self.size, offset, n, write=True)
        if self.readonly:
            self._check_writable()
        try:
            done = os.pwrite(self._fd, view, offset)
            if done != n:
                write_full(self._fd, byte_view(view)[done:], offset + done)
            if fua:
                os.fdatasync(self._fd)
        except OSError as err:
            raise block_error(err, f"raw image {self.path}: write at {offset}") from err

    def copy_to(self, dst: RawImage, offset: int, length: int) -> int:
        """Copy ``[offset, offset + length)`` to the same place in ``dst`` in the kernel;
        returns the bytes copied, the rest is the caller's (``copy_range``).

        Fewer than ``length`` only when the kernel cannot copy between the two files (it
        is then not asked again: a debug line, as for zero's fast paths) or the source
        ends early (the caller's read pads with zeros, as every read of a short file).
        A failure of the copy itself is a BlockIOError naming both files.
        """
        check_range(self.size, offset, length)
        check_range(dst.size, offset, length, write=True)
        dst._check_writable()
        done = 0
        while self._can_copy and done < length:
            try:
                n = os.copy_file_range(self._fd, dst._fd, length - done,
                                       offset + done, offset + done)
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                if err.errno not in _NO_KERNEL_COPY or done:
                    raise block_error(err, f"copy of [{offset + done}, {offset + length}) "
                                            f"from raw image {self.path} to {dst.path}") from err
                self._can_copy = False
                log.debug("%s: the kernel cannot copy to %s (%s), copying through a buffer",
                          self.path, dst.path, err.strerror)
                break
            if n == 0:
                break
            done += n
        return done

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        if length <= 0 or offset < 0 or offset + length > self.size:
            check_range(self.size, offset, length, write=True)  # raises: names what is wrong
        if self.readonly:
            self._check_writable()
        with os_errors(f"raw image {self.path}: zero at {offset}"):
            self._zero_range(offset, length)
            if fua:
                os.fdatasync(self._fd)

    def _zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros: punch, else zero range, else write zeros."""
        if self._can_punch:
            if punch_hole(self._fd, offset, length):
                return
            self._can_punch = False
            log.debug("%s: cannot punch holes, falling back to zero range", self.path)
        if self._can_zero_range:
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            if fallocate(self._fd, mode, offset, length):
                return
            self._can_zero_range = False
            log.debug("%s: cannot zero ranges, falling back to writing zeros", self.path)
        end = offset + length
        while offset < end:
            step = min(end - offset, len(ZEROS))
            write_full(self._fd, ZEROS[:step], offset)
            offset += step

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Punch a hole where the filesystem can; trim is advisory, so otherwise do nothing."""
        check_range(self.size, offset, length, write=True)
        self._check_writable()
        with os_errors(f"raw image {self.path}: trim at {offset}"):
            if self._can_punch and not punch_hole(self._fd, offset, length):
                self._can_punch = False
                log.debug("%s: cannot punch holes, trim does nothing", self.path)
            if fua:
                os.fdatasync(self._fd)

    def flush(self) -> None:
        with os_errors(f"raw image {self.path}: fdatasync"):
            os.fdatasync(self._fd)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Holes (HOLE|ZERO) and data (0) of ``[offset, offset+length)``, from SEEK_DATA."""
        check_range(self.size, offset, length)
        out: list[Extent] = []
        with os_errors(f"raw image {self.path}: extents at {offset}"):
            for start, end, is_data in data_runs(self._fd, offset, offset + length):
                add_extent(out, start, end - start, 0 if is_data else EXTENT_HOLE | EXTENT_ZERO)
        return out
