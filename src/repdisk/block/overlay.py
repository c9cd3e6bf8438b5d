"""Copy-on-write overlays: a sparse data file plus a persisted allocation bitmap.

An :class:`Overlay` is a ``BlockDevice`` over a ``backing`` BlockDevice of the same size.
The secondary stacks two of them: ``active -> hidden -> disk``.

The virtual disk is divided into clusters (a power of two, 512 B .. 2 MiB).  A cluster is
either *unallocated* (reads fall through to the backing; the overlay holds nothing) or
*allocated* (the data file ``PATH`` holds the whole cluster at ``cluster * cluster_size``).
A cluster only ever becomes allocated whole: a write covering part of an unallocated
cluster first copies the rest of it from the backing (read-modify-write), so an allocated
cluster never mixes new bytes with stale ones.

``PATH.bitmap`` is a 4096-byte header (magic, then JSON, zero padded) and one bit per
cluster (bit ``c & 7`` of byte ``c >> 3``).  Its length is exact; anything else is refused.

Persistence order: a bit reaches the bitmap file only after its cluster's data is on disk.
New bits wait in ``_pending`` until :meth:`Overlay.flush` has fdatasync'ed the data file,
then they are written and the bitmap file is fdatasync'ed.  A crash loses at most the
unflushed clusters, which then read through to the backing again: never garbage.
``make_empty`` clears the bitmap file first, then the data.

Cost: ``make_empty`` and ``commit`` cost O(allocated clusters), never O(disk size).  The
in-memory bitmap (a ``bytearray``) answers lookups in O(1); ``_used`` holds the indices of
its non-zero bytes so the allocated clusters can be enumerated and reset without a scan.
Opening reads only the data regions of the (sparse) bitmap file, found with SEEK_DATA.

Locks (taken in this order):

* ``_ranges`` (a RangeLock over cluster indices): exclusive for anything that may allocate
  (write, zero, copy_from_backing) and, over the whole disk, for make_empty and commit;
  shared for reads and extents.  Under it the allocation state of the locked clusters
  cannot change, so lookups need no other lock, and a partial cluster's read-modify-write
  cannot interleave with a neighbour's.
* ``_flush_lock``: serializes the writers of the bitmap file (flush, make_empty), so a
  flush never writes back bits that make_empty has just cleared.
* ``_meta``: guards ``_bitmap``, ``_used``, ``_count`` and ``_pending``; held only for
  in-memory updates, never across I/O.
"""


from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator

from repdisk.block.device import EXTENT_ZERO, BlockDevice, Buffer, Extent, add_extent, byte_view
from repdisk.block.imagelock import lock_image
from repdisk.block.rangelock import RangeLock
from repdisk.block.rawimage import (
    COPY_CHUNK,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    RawImage,
    copy_range,
    create_file,
    data_runs,
    fallocate,
    os_errors,
    punch_hole,
    read_full,
    whole_blocks,
    write_full,
)
from repdisk.errors import BlockIOError, check_range

log = logging.getLogger(__name__)

__all__ = ["Overlay", "coalesce", "DEFAULT_CLUSTER_SIZE"]

MAGIC = b"REPDISK-OVERLAY\n"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
MIN_CLUSTER_SIZE = 512
MAX_CLUSTER_SIZE = 2 << 20
DEFAULT_CLUSTER_SIZE = 64 << 10
# Scan unit when loading a bitmap: all-zero pages are skipped at C speed.
_SCAN_PAGE = 4096


def coalesce(indices: Iterable[int], limit: int = 0) -> Iterator[tuple[int, int]]:
    """Turn sorted integers into ``(first, count)`` runs, each at most ``limit`` long if set."""
    first = count = 0
    for i in indices:
        if count and i == first + count and count != limit:
            count += 1
            continue
        if count:
            yield first, count
        first, count = i, 1
    if count:
        yield first, count


def _check_cluster_size(cluster_size: int, what: str) -> None:
    if (not isinstance(cluster_size, int) or cluster_size & (cluster_size - 1)
            or not MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE):
        raise ValueError(f"{what}: cluster size {cluster_size} is not a power of two between "
                         f"{MIN_CLUSTER_SIZE} and {MAX_CLUSTER_SIZE}")


def _encode_header(cluster_size: int, size: int) -> bytes:
    meta = {"version": FORMAT_VERSION, "cluster_size": cluster_size,
            "size": size, "backing_size": size}
    raw = MAGIC + json.dumps(meta, sort_keys=True).encode()
    return raw + bytes(HEADER_SIZE - len(raw))


def _decode_header(raw: bytes, name: str) -> dict[str, int]:
    """Parse a bitmap file's header, refusing anything that is not exactly what we write."""
    def corrupt(why: str) -> BlockIOError:
        return BlockIOError(errno.EINVAL, f"overlay bitmap {name}: {why}; recreate the overlay")

    if len(raw) < HEADER_SIZE:
        raise corrupt(f"header truncated to {len(raw)} bytes, expected {HEADER_SIZE}")
    if raw[:len(MAGIC)] != MAGIC:
        raise corrupt(f"bad magic {raw[:len(MAGIC)]!r}, expected {MAGIC!r}: not a repdisk overlay")
    text, _, padding = raw[len(MAGIC):HEADER_SIZE].partition(b"\0")
    if padding.strip(b"\0"):
        raise corrupt("garbage after the header's JSON")
    try:
        meta = json.loads(text)
    except ValueError:
        raise corrupt("header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise corrupt("header is not a JSON object")
    if meta.get("version") != FORMAT_VERSION:
        raise corrupt(f"format version {meta.get('version')!r}, this repdisk reads "
                      f"version {FORMAT_VERSION}")
    for key in ("cluster_size", "size", "backing_size"):
        if not isinstance(meta.get(key), int) or meta[key] <= 0:
            raise corrupt(f"header field {key!r} is {meta.get(key)!r}, expected a positive integer")
    return meta


def _load_bitmap(fd: int, nbytes: int) -> tuple[bytearray, set[int], int]:
    """Read the bitmap (only its data regions) and index its non-zero bytes.

    Returns ``(bitmap, indices of non-zero bytes, number of set bits)``.
    """
    bitmap = bytearray(nbytes)
    view = memoryview(bitmap)
    used: set[int] = set()
    count = 0
    for start, end, is_data in data_runs(fd, HEADER_SIZE, HEADER_SIZE + nbytes):
        if not is_data:
            continue
        lo, hi = start - HEADER_SIZE, end - HEADER_SIZE
        read_full(fd, view[lo:hi], start)
        for page in range(lo, hi, _SCAN_PAGE):
            page_end = min(page + _SCAN_PAGE, hi)
            if bitmap.count(0, page, page_end) == page_end - page:
                continue
            for i in range(page, page_end):
                if bitmap[i]:
                    used.add(i)
                    count += bitmap[i].bit_count()
    return bitmap, used, count


class Overlay:
    """A copy-on-write layer over ``backing``: see the module docstring for the design."""

    def __init__(self, path: str, backing: BlockDevice, data: RawImage, bitmap_fd: int,
                 cluster_size: int, loaded: tuple[bytearray, set[int], int]) -> None:
        self.path = path
        self.backing = backing
        self.size = backing.size
        self.cluster_size = cluster_size
        self._shift = cluster_size.bit_length() - 1
        self._nclusters = (self.size + cluster_size - 1) >> self._shift
        self._data = data
        self._bitmap_fd = bitmap_fd
        self._bitmap_name = path + ".bitmap"
        # See "Locks" in the module docstring.
        self._ranges = RangeLock()
        self._flush_lock = threading.Lock()
        self._meta = threading.Lock()
        self._bitmap, self._used, self._count = loaded
        self._pending: set[int] = set()  # allocated in memory, not yet in the bitmap file

    # --- creation and opening ---

    @classmethod
    def create(cls, path: str | os.PathLike[str], backing: BlockDevice,
               cluster_size: int = DEFAULT_CLUSTER_SIZE, exist_ok: bool = False) -> Overlay:
        """Create an empty overlay (``PATH`` and ``PATH.bitmap``) over ``backing``."""
        name = os.fspath(path)
        _check_cluster_size(cluster_size, f"overlay {name}")
        bitmap_name = name + ".bitmap"
        if not exist_ok:
            for existing in (name, bitmap_name):
                if os.path.lexists(existing):
                    raise BlockIOError(errno.EEXIST, f"overlay file {existing} already exists "
                                                     "and is not overwritten; move it away if "
                                                     "it is not wanted")
        nbytes = cls._bitmap_bytes(backing.size, cluster_size)
        data = RawImage.create(name, backing.size, exist_ok)
        try:
            fd = create_file(bitmap_name, exist_ok, "overlay bitmap")
            try:
                with os_errors(f"overlay {name}: create"):
                    # A reused data file starts empty; the bitmap file gets its header and an
                    # all-zero bitmap whose blocks are reserved (unwritten, so they still read
                    # and seek as holes): setting bits then never needs a free block, and a
                    # full file system cannot stop a failover from persisting them.
                    os.ftruncate(data.fd, 0)
                    os.ftruncate(data.fd, backing.size)
                    os.fdatasync(data.fd)
                    os.ftruncate(fd, 0)
                    write_full(fd, memoryview(_encode_header(cluster_size, backing.size)), 0)
                    os.ftruncate(fd, HEADER_SIZE + nbytes)
                    fallocate(fd, FALLOC_FL_KEEP_SIZE, HEADER_SIZE, whole_blocks(nbytes))
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            data.close()
            raise
        log.debug("created overlay %s over %r, cluster size %d", name, backing, cluster_size)
        return cls(name, backing, data, fd, cluster_size, (bytearray(nbytes), set(), 0))

    @classmethod
    def open(cls, path: str | os.PathLike[str], backing: BlockDevice,
             cluster_size: int | None = None) -> Overlay:
        """Open an existing overlay over ``backing``, validating everything before trusting it.

        ``cluster_size``, if given, must match the file's.
        """
        name = os.fspath(path)
        data = RawImage.open(name)
        try:
            fd = cls._open_bitmap(name + ".bitmap")
            try:
                meta = cls._validate(name, fd, data, backing, cluster_size)
                nbytes = cls._bitmap_bytes(backing.size, meta["cluster_size"])
                with os_errors(f"overlay bitmap {name}.bitmap: read"):
                    loaded = _load_bitmap(fd, nbytes)
                cls._check_tail_bits(name + ".bitmap", loaded[0], backing.size,
                                     meta["cluster_size"])
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            data.close()
            raise
        return cls(name, backing, data, fd, meta["cluster_size"], loaded)

    def lock(self) -> None:
        """Mark the data file and the bitmap in use for writing (:func:`lock_image`)."""
        self._data.lock()
        lock_image(self._bitmap_fd, self._bitmap_name)

    @staticmethod
    def _open_bitmap(name: str) -> int:
        try:
            return os.open(name, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise BlockIOError(err.errno or errno.EIO,
                               f"cannot open overlay bitmap {name}: {err.strerror}") from err

    @staticmethod
    def _bitmap_bytes(size: int, cluster_size: int) -> int:
        clusters = (size + cluster_size - 1) // cluster_size
        return (clusters + 7) // 8

    @classmethod
    def _validate(cls, name: str, fd: int, data: RawImage, backing: BlockDevice,
                  cluster_size: int | None) -> dict[str, int]:
        """Check header, sizes and bitmap length against the backing and the data file."""
        bitmap_name = name + ".bitmap"
        with os_errors(f"overlay bitmap {bitmap_name}: read header"):
            header = bytearray(HEADER_SIZE)
            got = os.preadv(fd, [header], 0)
        meta = _decode_header(bytes(header[:got]), bitmap_name)

        def refuse(why: str) -> BlockIOError:
            return BlockIOError(errno.EINVAL, f"overlay {name}: {why}")

        try:
            _check_cluster_size(meta["cluster_size"], f"overlay bitmap {bitmap_name}")
        except ValueError as err:
            raise refuse(str(err)) from None
        if cluster_size is not None and cluster_size != meta["cluster_size"]:
            raise refuse(f"cluster size is {meta['cluster_size']} but {cluster_size} was asked for")
        if meta["size"] != meta["backing_size"]:
            raise refuse(f"header size {meta['size']} differs from its backing size "
                         f"{meta['backing_size']}; recreate the overlay")
        if meta["size"] != backing.size:
            raise refuse(f"made for a {meta['size']}-byte disk but its backing "
                         f"{getattr(backing, 'path', 'disk')} is {backing.size} bytes; if this "
                         "overlay holds nothing you need, delete it (and its .bitmap) to have it "
                         "recreated empty")
        if data.size != meta["size"]:
            raise refuse(f"data file is {data.size} bytes, expected {meta['size']}")
        expected = HEADER_SIZE + cls._bitmap_bytes(meta["size"], meta["cluster_size"])
        actual = os.fstat(fd).st_size
        if actual != expected:
            state = "truncated" if actual < expected else "too long"
            raise refuse(f"bitmap {bitmap_name} is {state}: {actual} bytes, expected {expected}; "
                         f"recreate the overlay")
        return meta

    @staticmethod
    def _check_tail_bits(name: str, bitmap: bytearray, size: int, cluster_size: int) -> None:
        """Bits past the last cluster are never set by us: if they are, the file is corrupt."""
        clusters = (size + cluster_size - 1) // cluster_size
        if clusters % 8 and bitmap[-1] >> (clusters % 8):
            raise BlockIOError(errno.EINVAL, f"overlay bitmap {name}: bits set past the last "
                                             f"cluster {clusters - 1}; recreate the overlay")

    # --- life cycle ---

    def close(self) -> None:
        """Flush (data, then bitmap) and close both files; the backing stays open."""
        if self._bitmap_fd < 0:
            return
        try:
            self.flush()
        finally:
            self._data.close()
            os.close(self._bitmap_fd)
            self._bitmap_fd = -1

    def __enter__(self) -> Overlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Overlay({self.path!r}, size={self.size}, cluster_size={self.cluster_size})"

    # --- allocation state ---

    def _is_set(self, cluster: int) -> bool:
        return bool(self._bitmap[cluster >> 3] >> (cluster & 7) & 1)

    @property
    def bitmap(self) -> bytearray:
        """The allocation bitmap in memory, bit ``c & 7`` of byte ``c >> 3`` for cluster
        ``c``: changed in place, never replaced, a bit set only after its cluster's data
        is written, cleared only under the exclusive range lock of the whole overlay
        (make_empty, commit).  For readers outside Python (fastpath.py); not to write."""
        return self._bitmap

    def is_allocated(self, cluster: int) -> bool:
        if not 0 <= cluster < self._nclusters:
            raise ValueError(f"overlay {self.path}: cluster {cluster} is outside "
                             f"[0, {self._nclusters})")
        return self._is_set(cluster)

    def allocated_clusters(self) -> list[int]:
        """Every allocated cluster, ascending; O(allocated), not O(disk size)."""
        with self._meta:
            return self._allocated_locked()

    def _allocated_locked(self) -> list[int]:
        out: list[int] = []
        bitmap = self._bitmap
        for i in sorted(self._used):
            byte = bitmap[i]
            out.extend((i << 3) + bit for bit in range(8) if byte >> bit & 1)
        return out

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the virtual disk held by the overlay (the last cluster may be short)."""
        with self._meta:
            total = self._count << self._shift
            last = self._nclusters - 1
            if self._is_set(last):
                total -= (self._nclusters << self._shift) - self.size
            return total

    def _mark_allocated(self, first: int, end: int) -> None:
        with self._meta:
            bitmap = self._bitmap
            for cluster in range(first, end):
                i, bit = cluster >> 3, 1 << (cluster & 7)
                if not bitmap[i] & bit:
                    bitmap[i] |= bit
                    self._used.add(i)
                    self._pending.add(cluster)
                    self._count += 1

    def _state_runs(self, first: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(first, end, allocated)`` runs of clusters; call under ``_ranges``."""
        start, state = first, self._is_set(first)
        for cluster in range(first + 1, end):
            now = self._is_set(cluster)
            if now != state:
                yield start, cluster, state
                start, state = cluster, now
        yield start, end, state

    def _clusters(self, offset: int, length: int) -> tuple[int, int]:
        """The clusters ``[first, end)`` that a byte range touches."""
        return offset >> self._shift, (offset + length + self.cluster_size - 1) >> self._shift

    def _span(self, first: int, end: int) -> tuple[int, int]:
        """The bytes of clusters ``[first, end)``, the last one clamped to the disk's end."""
        return first << self._shift, min(end << self._shift, self.size)

    # --- BlockDevice ---

    def pread_into(self, buf: Buffer, offset: int) -> None:
        """One backing read per run of unallocated clusters, one data read per allocated run."""
        view = byte_view(buf)
        end = offset + len(view)
        check_range(self.size, offset, len(view))
        first, last = self._clusters(offset, len(view))
        with self._ranges.shared(first, last):
            for run_first, run_end, allocated in self._state_runs(first, last):
                lo, hi = self._span(run_first, run_end)
                lo, hi = max(lo, offset), min(hi, end)
                source = self._data if allocated else self.backing
                source.pread_into(view[lo - offset:hi - offset], lo)

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        view = byte_view(buf)
        check_range(self.size, offset, len(view), write=True)
        first, end = self._clusters(offset, len(view))
        with self._ranges.exclusive(first, end):
            self._fill_partial(offset, len(view), first, end)
            self._data.pwrite(view, offset)
            self._mark_allocated(first, end)
        if fua:
            self.flush()

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        """Allocate the clusters with zeros (a hole in the data file), hiding the backing."""
        check_range(self.size, offset, length, write=True)
        first, end = self._clusters(offset, length)
        with self._ranges.exclusive(first, end):
            self._fill_partial(offset, length, first, end)
            self._data.zero(offset, length)
            self._mark_allocated(first, end)
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Do nothing: trim is advisory, and deallocating a cluster here would not discard it.

        An unallocated cluster reads the backing, i.e. older data (for the hidden overlay:
        the primary's newer writes), never zeros; and the hidden overlay's clusters are
        the only copy of what a checkpoint must restore.  Keeping them is always correct.
        """
        check_range(self.size, offset, length, write=True)

    def flush(self) -> None:
        """Make written data durable, then persist the bits of the clusters it allocated."""
        with self._flush_lock:
            with self._meta:
                batch = set(self._pending)
            self._data.flush()
            if batch:
                self._write_bits(batch)
                with self._meta:
                    self._pending -= batch

    def _write_bits(self, batch: set[int]) -> None:
        """Write the bitmap bytes holding ``batch``'s bits; bits allocated since stay unset."""
        with self._meta:
            later: dict[int, int] = {}
            for cluster in self._pending - batch:
                later[cluster >> 3] = later.get(cluster >> 3, 0) | 1 << (cluster & 7)
            chunks = []
            for start, count in coalesce(sorted({c >> 3 for c in batch})):
                chunk = bytearray(self._bitmap[start:start + count])
                for i in range(start, start + count):
                    chunk[i - start] &= ~later.get(i, 0) & 0xFF
                chunks.append((start, chunk))
        with os_errors(f"overlay bitmap {self._bitmap_name}: write"):
            for start, chunk in chunks:
                write_full(self._bitmap_fd, memoryview(chunk), HEADER_SIZE + start)
            os.fdatasync(self._bitmap_fd)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocated clusters are data; elsewhere the backing answers (holes stay holes)."""
        check_range(self.size, offset, length)
        end = offset + length
        out: list[Extent] = []
        first, last = self._clusters(offset, length)
        with self._ranges.shared(first, last):
            for run_first, run_end, allocated in self._state_runs(first, last):
                lo, hi = self._span(run_first, run_end)
                lo, hi = max(lo, offset), min(hi, end)
                if allocated:  # zeroed clusters are holes in the data file
                    for extent in self._data.extents(lo, hi - lo):
                        add_extent(out, *extent)
                else:
                    for extent in self.backing.extents(lo, hi - lo):
                        add_extent(out, *extent)
        return out

    # --- copy-on-write ---

    def _fill_partial(self, offset: int, length: int, first: int, end: int) -> None:
        """Before a request covers part of an unallocated cluster, copy the cluster in whole."""
        for cluster in {first, end - 1}:
            lo, hi = self._span(cluster, cluster + 1)
            if (offset > lo or offset + length < hi) and not self._is_set(cluster):
                self._copy_clusters(cluster, cluster + 1)

    def _copy_clusters(self, first: int, end: int) -> int:
        """Copy every unallocated cluster of ``[first, end)`` from the backing; returns bytes.

        Where the backing is a hole (reads as zeros) the copy is a hole too: no byte is
        written into the data file, only the cluster's bit, so copy-before-write of a
        sparse disk (a zero or trim over holes, ``qemu-img convert``) fills nothing.
        Call with ``_ranges`` held exclusively over the clusters.
        """
        copied = 0
        for run_first, run_end, allocated in self._state_runs(first, end):
            if allocated:
                continue
            lo, hi = self._span(run_first, run_end)
            for start, end, zeros in self._backing_runs(lo, hi):
                if zeros:
                    self._data.zero(start, end - start)  # stale bytes of an earlier interval
                else:
                    copy_range(self.backing, self._data, start, end - start)
            self._mark_allocated(run_first, run_end)
            copied += hi - lo
        return copied

    def _backing_runs(self, lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, end, reads_as_zeros)`` runs of the backing over ``[lo, hi)``.  A raw
        image is asked with SEEK_DATA directly, one system call per cluster of data or
        run of holes, on every copy-before-write (its extents() costs several times that,
        and SEEK_HOLE as much as the disk after ``lo``: data_runs); a cluster's zeros
        after its data are copied."""
        if isinstance(self.backing, RawImage):
            with os_errors(f"raw image {self.backing.path}: extents at {lo}"):
                for start, end, data in data_runs(self.backing.fd, lo, hi, self.cluster_size):
                    yield start, end, not data
            return
        for offset, length, flags in self.backing.extents(lo, hi - lo):
            yield offset, offset + length, bool(flags & EXTENT_ZERO)

    def copy_from_backing(self, offset: int, length: int) -> int:
        """Allocate every cluster touching the range, filling new ones from the backing.

        This is the secondary's copy-before-write into the hidden overlay.  Returns the
        bytes copied (0 when every cluster was already allocated).
        """
        if length <= 0 or offset < 0 or offset + length > self.size:
            check_range(self.size, offset, length, write=True)  # raises: names what is wrong
        first, end = self._clusters(offset, length)
        if self._all_set(first, end):
            # Already copied (every replica write after the first one to a cluster in a
            # checkpoint interval): a bitmap lookup, no lock.  Bits are cleared only by
            # make_empty and commit, which the caller's own range lock excludes anyway.
            return 0
        with self._ranges.exclusive(first, end):
            return self._copy_clusters(first, end)

    def _all_set(self, first: int, end: int) -> bool:
        """True if every cluster of ``[first, end)`` is allocated."""
        bitmap = self._bitmap
        for cluster in range(first, end):  # noqa: SIM110 - no generator on every replica write
            if not bitmap[cluster >> 3] >> (cluster & 7) & 1:
                return False
        return True

    def make_empty(self) -> None:
        """Drop every allocated cluster (O(allocated)): reads fall through to the backing."""
        with self._ranges.exclusive(0, self._nclusters):
            self._make_empty_locked()

    def _make_empty_locked(self) -> None:
        with self._flush_lock:
            with self._meta:
                clusters = self._allocated_locked()
            if not clusters:
                return
            with os_errors(f"overlay {self.path}: make empty"):
                # The bitmap file first: once it is clear, a crash leaves an empty overlay.
                self._clear_bitmap_file()
                self._discard_data(clusters)
            with self._meta:
                for i in self._used:
                    self._bitmap[i] = 0
                self._used.clear()
                self._pending.clear()
                self._count = 0

    def _clear_bitmap_file(self) -> None:
        """Zero the on-disk bitmap, O(allocated).

        The file keeps its size throughout (holes are punched, or zeros written where the
        file system cannot punch), so a crash half way leaves a valid bitmap with some bits
        cleared, never a short file that would have to be refused; and punching needs no
        free block, so a full file system cannot stop a checkpoint or a failover here.
        """
        # One call over the whole body: the kernel's cost is in the blocks that hold data.
        # Zeroing a range keeps its blocks reserved (see create); punching frees them.
        # (Whole 4 KiB blocks, past the end of the file if need be: both keep the size.)
        body = whole_blocks(len(self._bitmap))
        if not (fallocate(self._bitmap_fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                     HEADER_SIZE, body)
                or punch_hole(self._bitmap_fd, HEADER_SIZE, body)):
            for first, count in coalesce(sorted(self._used)):
                os.pwrite(self._bitmap_fd, bytes(count), HEADER_SIZE + first)
        os.fdatasync(self._bitmap_fd)

    def _discard_data(self, clusters: list[int]) -> None:
        """Free the data of ``clusters``: unallocated data is never read, so this only
        saves space, and where holes cannot be punched the space is simply not freed."""
        for first, count in coalesce(clusters):
            lo, hi = self._span(first, first + count)
            if not punch_hole(self._data.fd, lo, hi - lo):
                return

    def commit(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Write every allocated cluster into the backing, flush it, then empty the overlay.

        Adjacent clusters are coalesced into writes of up to COPY_CHUNK bytes, ascending;
        zeroed clusters become ``backing.zero``.  ``progress(done, total)`` is called after
        each piece.  Holds the whole disk for its duration.  Returns the bytes committed.
        A crash before the final make_empty leaves the overlay as it was, over a backing
        that already holds its data: the same view, and commit can simply run again.
        """
        with self._ranges.exclusive(0, self._nclusters):
            clusters = self.allocated_clusters()
            runs = [self._span(first, first + count)
                    for first, count in coalesce(clusters, COPY_CHUNK >> self._shift)]
            total = sum(hi - lo for lo, hi in runs)
            done = 0
            for lo, hi in runs:
                self._commit_run(lo, hi)
                done += hi - lo
                if progress is not None:
                    progress(done, total)
            self.backing.flush()
            self._make_empty_locked()
        log.debug("%s: committed %d bytes into %r", self.path, total, self.backing)
        return total

    def _commit_run(self, lo: int, hi: int) -> None:
        """Copy ``[lo, hi)`` of the data file into the backing, zeroing where it has holes."""
        for offset, length, flags in self._data.extents(lo, hi - lo):
            if flags & EXTENT_ZERO:
                self.backing.zero(offset, length)
            else:
                copy_range(self._data, self.backing, offset, length)
