"""Initial sync and re-protection: what differs between two disks, found without copying them.

Node side (both roles answer): :func:`disk_digests` hashes a range of the node's own disk in
granules, and :func:`data_runs` lists where that disk holds data (SEEK_DATA).  Neither reads
a byte over the network: a secondary hashes its disk locally, the controller compares the
primary's digests with the secondary's and marks the granules that differ dirty in the
primary's DirtyMap; the primary's ordinary ``start``/``resync`` then copies them.  One copy
mechanism serves the dirty-region resync, the checksum sync and the full sync.

The controller's side, which asks both nodes piece by piece and marks what differs, is
repdisk.controller.syncplan.

The hashes are BLAKE2b with a 16-byte digest: a collision between two different 64 KiB
granules is not a practical concern, and hashing runs at memory speed.  A granule that
lies wholly in a hole is not read: its digest is that of zeros (cached per length).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import time
from collections.abc import Callable
from functools import lru_cache, partial

import nbd

from repdisk import tls
from repdisk.block.device import EXTENT_HOLE
from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError, ForwardError, check_range
from repdisk.replication.nbdclient import pump
from repdisk.uri import with_export_suffix

log = logging.getLogger(__name__)

__all__ = ["disk_digests", "data_runs", "merge_runs", "differing_runs", "GRANULARITY", "PIECE",
           "DigestView", "differing_granules", "DIGEST_SUFFIX"]

DIGEST_SIZE = 16
#: The default digest granule: the primary's dirty-map granule, so a differing granule is
#: exactly one dirty granule.
GRANULARITY = 64 << 10
#: Disks are compared this many bytes at a time (1024 digests per message or read).
PIECE = 64 << 20
#: Most bytes one query-digests call hashes (bounds a call's duration and reply size).
MAX_DIGEST_LENGTH = 1 << 30

Run = tuple[int, int]
Buffer = bytes | bytearray | memoryview


@lru_cache(maxsize=8)
def _zero_digest(length: int) -> str:
    return hashlib.blake2b(bytes(length), digest_size=DIGEST_SIZE).hexdigest()


def _holes(image: RawImage, offset: int, length: int) -> list[Run]:
    return [(o, n) for o, n, flags in image.extents(offset, length) if flags & EXTENT_HOLE]


def disk_digests(image: RawImage, offset: int, length: int, granularity: int) -> list[str]:
    """Hex digests of ``[offset, offset+length)`` in granules (the last one may be short).

    Reads each granule once into one reused buffer; granules inside holes are not read.
    """
    if granularity <= 0 or length <= 0 or offset < 0 or offset + length > image.size:
        raise ValueError(f"{image.path}: cannot hash [{offset}, {offset + length}) in "
                         f"{granularity}-byte granules of a {image.size}-byte disk")
    if length > MAX_DIGEST_LENGTH:
        raise ValueError(f"{image.path}: hash at most {MAX_DIGEST_LENGTH} bytes per call, "
                         f"not {length}; ask in pieces")
    holes = _holes(image, offset, length)
    buf = memoryview(bytearray(granularity))
    out: list[str] = []
    h = 0
    end = offset + length
    for pos in range(offset, end, granularity):
        n = min(granularity, end - pos)
        while h < len(holes) and holes[h][0] + holes[h][1] <= pos:
            h += 1
        if h < len(holes) and holes[h][0] <= pos and pos + n <= holes[h][0] + holes[h][1]:
            out.append(_zero_digest(n))
            continue
        view = buf[:n]
        image.pread_into(view, pos)
        out.append(hashlib.blake2b(view, digest_size=DIGEST_SIZE).hexdigest())
    return out


def data_runs(image: RawImage, offset: int, length: int) -> list[Run]:
    """Where the disk holds data in ``[offset, offset+length)`` (holes read as zeros)."""
    return [(o, n) for o, n, flags in image.extents(offset, length) if not flags & EXTENT_HOLE]


def merge_runs(runs: list[Run]) -> list[Run]:
    """Sorted, coalesced union of byte runs."""
    out: list[Run] = []
    for o, n in sorted(runs):
        if out and o <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[1], o + n - last[0]))
        else:
            out.append((o, n))
    return out


def differing_bytes(offset: int, ours: Buffer, theirs: Buffer, block: int = 4096) -> list[Run]:
    """The exact byte runs where two equally long buffers of ``[offset, ...)`` differ,
    coalesced (compared a ``block`` at a time; byte by byte only inside differing blocks)."""
    a, b = memoryview(ours).cast("B"), memoryview(theirs).cast("B")
    if a.nbytes != b.nbytes:
        raise ValueError(f"buffers of {a.nbytes} and {b.nbytes} bytes at offset {offset}")
    runs: list[Run] = []
    for start in range(0, a.nbytes, block):
        end = min(start + block, a.nbytes)
        if a[start:end] == b[start:end]:
            continue
        i = start
        while i < end:
            if a[i] == b[i]:
                i += 1
                continue
            j = i + 1
            while j < end and a[j] != b[j]:
                j += 1
            runs.append((offset + i, j - i))
            i = j
    return merge_runs(runs)


def differing_runs(offset: int, granularity: int, ours: list[str], theirs: list[str],
                   size: int) -> list[Run]:
    """The byte runs of granules whose digests differ, coalesced."""
    if len(ours) != len(theirs):
        raise ValueError(f"digest lists of different lengths ({len(ours)} and {len(theirs)}) "
                         f"at offset {offset}: the disks or granularities differ")
    runs = [(offset + i * granularity, min(granularity, size - offset - i * granularity))
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    return merge_runs(runs)


# -- the primary's own comparison (a restart after it did not stop cleanly) ---------------

#: What ``replica/NAME`` becomes for its digests (the secondary serves it next to the replica).
DIGEST_SUFFIX = "+digest"


class DigestView:
    """A read-only ``BlockDevice`` whose bytes are a disk's digests: bytes
    ``[DIGEST_SIZE * k, DIGEST_SIZE * (k + 1))`` are the digest of granule ``k`` (GRANULARITY
    bytes of the disk, the last one short), as :func:`disk_digests` computes them.

    A secondary serves it as ``replica/NAME+digest`` so that a primary that did not stop
    cleanly can compare its disk with the secondary's over the NBD link it already has,
    moving 16 bytes per 64 KiB granule (:func:`differing_granules`).  Reads must be
    aligned to whole digests; writes are refused.
    """

    def __init__(self, image: RawImage, granularity: int = GRANULARITY) -> None:
        self.image = image
        self.granularity = granularity
        self.size = -(-image.size // granularity) * DIGEST_SIZE

    def pread_into(self, buf: memoryview, offset: int) -> None:
        check_range(self.size, offset, len(buf))
        if offset % DIGEST_SIZE or len(buf) % DIGEST_SIZE:
            raise BlockIOError(errno.EINVAL, f"{self.image.path} digests: read whole "
                                             f"{DIGEST_SIZE}-byte digests, not [{offset}, "
                                             f"{offset + len(buf)})")
        g = self.granularity
        first, count = offset // DIGEST_SIZE, len(buf) // DIGEST_SIZE
        start = first * g
        digests = disk_digests(self.image, start, min(count * g, self.image.size - start), g)
        buf[:] = b"".join(bytes.fromhex(d) for d in digests)

    def _refuse(self, *_: object) -> None:
        raise BlockIOError(errno.EROFS, f"{self.image.path} digests are read-only")

    pwrite = zero = trim = _refuse

    def flush(self) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        check_range(self.size, offset, length)
        return [(offset, length, 0)]


def _completed(h: nbd.NBD, cookie: int) -> bool:
    return bool(h.aio_command_completed(cookie))


def differing_granules(image: RawImage, uri: str, timeout: float,
                       progress: Callable[[int, int], None] | None = None) -> list[Run]:
    """Compare ``image`` with the secondary's disk behind ``uri`` (its replica export, to
    which DIGEST_SUFFIX is appended) by digest, PIECE bytes at a time; the byte runs of
    the granules that differ.  Each wait is bounded by ``timeout``.  Raises ForwardError
    naming the URI if the secondary does not answer or is not a repdisk secondary."""
    target = with_export_suffix(uri, DIGEST_SUFFIX)
    h = nbd.NBD()

    def wait(until: Callable[[], bool], what: str) -> None:
        if not pump(h, until, time.monotonic() + timeout):
            raise ForwardError(f"secondary {uri} does not answer: no {what} within {timeout}s")

    try:
        tls.prepare_client(h, target)
        h.aio_connect_uri(target)
        wait(lambda: not h.aio_is_connecting(), "NBD handshake")
        want = DigestView(image).size
        if not h.aio_is_ready() or h.get_size() != want:
            raise ForwardError(f"secondary {uri} serves no digests of a {image.size}-byte "
                               "disk (is it a repdisk secondary of this version?)")
        runs: list[Run] = []
        for offset in range(0, image.size, PIECE):
            length = min(PIECE, image.size - offset)
            ours = disk_digests(image, offset, length, GRANULARITY)
            buf = nbd.Buffer(len(ours) * DIGEST_SIZE)
            cookie = h.aio_pread(buf, offset // GRANULARITY * DIGEST_SIZE)
            wait(partial(_completed, h, cookie), "digests")
            raw = buf.to_bytearray()
            theirs = [raw[i:i + DIGEST_SIZE].hex() for i in range(0, len(raw), DIGEST_SIZE)]
            runs += differing_runs(offset, GRANULARITY, ours, theirs, image.size)
            if progress is not None:
                progress(offset + length, image.size)
        return merge_runs(runs)
    except nbd.Error as err:
        raise ForwardError(f"secondary {uri} does not answer: {err}") from None
