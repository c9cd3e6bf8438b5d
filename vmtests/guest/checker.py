"""Check a guest disk on the host, without mounting it: the records and the filesystem.

The records workload (workload.sh) appends record N to /data/records.log and fsyncs, then
writes it to slot N of the raw region and fsyncs, then prints ``REPDISK-RECORD N``. So on any
disk state the guest could have left, including a crash or a failover to a checkpoint:

- the file holds exactly records 1..F, each line byte-exact (the payload and the sha256 are
  recomputed here), nothing after them;
- the raw region holds exactly records 1..R in slots 1..R and zeros after them;
- R == F or R == F - 1 (a crash between the file's fsync and the raw slot's);
- the durable count is R, and it is at least every N the console announced before the crash.

"Clean" for ext4. A cleanly powered-off guest (workload ``poweroff-after``: sync, remount
read-only, poweroff) must pass ``e2fsck -fn`` as it is: :func:`fsck_clean`. A crashed guest
(SIGKILLed QEMU, failover) leaves a journal to replay and possibly orphan inodes; such a disk
is clean when, on a copy, ``e2fsck -p`` (preen: replays the journal and releases orphans, i.e.
exactly what the kernel's next mount would do, and refuses anything more) succeeds and a
forced read-only ``e2fsck -fn`` then finds nothing at all: :func:`crash_fsck_clean`.
``e2fsck -fy`` is not the criterion, since it "fixes" real corruption until it passes.
Records are always read from the disk as the next mount would see it: if the journal needs
recovery, from a replayed copy (debugfs alone does not replay the journal).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .build import CONF_PATH, RECORDS_PATH, SLOT_SIZE

Image = Path | str | bytes | bytearray | memoryview
# The payload of record N is these four 32-bit words of N * k, in hex (as in workload.sh).
PAYLOAD_FACTORS = (2654435761, 2246822519, 3266489917, 668265263)
EXT4_SUPERBLOCK = 1024
EXT4_MAGIC = 0xEF53
INCOMPAT_RECOVER = 0x0004


def record_line(seq: int) -> bytes:
    """The canonical line (without newline) of record ``seq``."""
    payload = "".join("%08x" % ((seq * k) & 0xFFFFFFFF) for k in PAYLOAD_FACTORS)
    body = f"REC {seq} {payload}"
    return f"{body} {hashlib.sha256(body.encode()).hexdigest()}".encode()


@contextmanager
def image_file(image: Image) -> Iterator[Path]:
    """A path holding ``image``: the path itself, or a temporary file with the bytes."""
    if isinstance(image, (str, Path)):
        yield Path(image)
        return
    with tempfile.NamedTemporaryFile(prefix="repdisk-image-", suffix=".img") as f:
        f.write(image)
        f.flush()
        yield Path(f.name)


def needs_recovery(path: Path) -> bool:
    """True if the ext4 superblock says the journal must be replayed before use."""
    with open(path, "rb") as f:
        sb = os.pread(f.fileno(), 1024, EXT4_SUPERBLOCK)
    if int.from_bytes(sb[0x38:0x3A], "little") != EXT4_MAGIC:
        raise ValueError(f"{path}: no ext4 superblock at offset {EXT4_SUPERBLOCK}")
    return bool(int.from_bytes(sb[0x60:0x64], "little") & INCOMPAT_RECOVER)


def e2fsck(path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", *flags, str(path)], capture_output=True, text=True)


@contextmanager
def preened_copy(path: Path) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """A temporary copy of the image after ``e2fsck -p`` (journal replay, orphan release)."""
    with tempfile.TemporaryDirectory(prefix="repdisk-fsck-") as tmp:
        copy = Path(tmp, "copy.img")
        shutil.copyfile(path, copy)
        yield copy, e2fsck(copy, "-p")


@contextmanager
def mountable_view(path: Path) -> Iterator[Path]:
    """The image as the next mount would see it: itself, or a replayed copy."""
    if not needs_recovery(path):
        yield path
        return
    with preened_copy(path) as (copy, proc):
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"{path}: e2fsck -p on a copy failed (exit {proc.returncode}): "
                               f"{proc.stdout.strip()} {proc.stderr.strip()}")
        yield copy


def debugfs_cat(path: Path, name: str) -> bytes | None:
    """A file's contents read with debugfs (no mount), or None if it does not exist."""
    proc = subprocess.run(["debugfs", "-R", f"cat {name}", str(path)], capture_output=True)
    if proc.returncode != 0 or b"not found" in proc.stderr:
        return None
    return proc.stdout


def file_records(data: bytes | None, problems: list[str]) -> int:
    """How many records 1..F lead the records file; anything else is a problem."""
    if not data:
        return 0
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    count = 0
    while count < len(lines) and lines[count] == record_line(count + 1):
        count += 1
    if count < len(lines):
        problems.append(f"{RECORDS_PATH}: line {count + 1} is not record {count + 1}: "
                        f"{lines[count][:120]!r} ({len(lines) - count} lines from there)")
    if tail:
        problems.append(f"{RECORDS_PATH}: torn last line {tail[:120]!r}")
    return count


def raw_records(region: memoryview, where: str, problems: list[str]) -> int:
    """How many records 1..R lead the raw region's slots; after them it must be zero."""
    slots = len(region) // SLOT_SIZE
    count = 0
    while count < slots:
        slot = region[count * SLOT_SIZE:(count + 1) * SLOT_SIZE]
        line = record_line(count + 1) + b"\n"
        if slot[:len(line)] != line or slot[len(line):] != bytes(SLOT_SIZE - len(line)):
            break
        count += 1
    rest = region[count * SLOT_SIZE:]
    if rest != bytes(len(rest)):
        nonzero = len(rest) - len(bytes(rest).lstrip(b"\0"))
        first = nonzero // SLOT_SIZE + count + 1
        problems.append(f"{where}: slot {first} is not zero after {count} valid records: "
                        f"{bytes(region[(first - 1) * SLOT_SIZE:][:80])!r}")
    return count


def read_region(path: Path, offset: int, length: int) -> memoryview:
    buf = bytearray(length)
    with open(path, "rb") as f:
        got = os.preadv(f.fileno(), [buf], offset)
    return memoryview(buf)[:got]


def raw_layout(view: Path) -> tuple[int, int]:
    """(offset, length) of the raw region inside the root disk, from /etc/repdisk.conf."""
    conf = debugfs_cat(view, CONF_PATH)
    if conf is None:
        raise ValueError(f"{view}: no {CONF_PATH}: not a disk made by build_disk")
    values = dict(line.split("=", 1) for line in conf.decode().split())
    return int(values["RAW_OFFSET"]), int(values["RAW_SLOTS"]) * SLOT_SIZE


def check_records(image: Image, raw_image: Image | None = None) -> tuple[int, list[str]]:
    """Return (durable record count, problems) of a guest's disk(s); see the module doc.

    ``raw_image`` is the second disk (/dev/vdb in the guest) when one was attached; without
    it the raw region is the tail of ``image``. An empty problem list means the disk is a
    state the workload can have left.
    """
    problems: list[str] = []
    with image_file(image) as path, mountable_view(path) as view:
        count_fs = file_records(debugfs_cat(view, RECORDS_PATH), problems)
        if raw_image is None:
            offset, length = raw_layout(view)
            count_raw = raw_records(read_region(path, offset, length), "raw region", problems)
    if raw_image is not None:
        with image_file(raw_image) as raw_path:
            region = read_region(raw_path, 0, raw_path.stat().st_size)
            count_raw = raw_records(region, "raw disk", problems)
    if count_raw not in (count_fs, count_fs - 1):
        problems.append(f"the file holds {count_fs} records but the raw region {count_raw}: "
                        f"the raw region must hold the same number or one fewer")
    return min(count_fs, count_raw), problems


def fsck_clean(image: Image) -> bool:
    """True if ``e2fsck -fn`` finds nothing to do: the state after a clean poweroff."""
    with image_file(image) as path:
        return e2fsck(path, "-fn").returncode == 0


def crash_fsck_clean(image: Image) -> tuple[bool, str]:
    """(clean, e2fsck output) for a crashed disk, by the module doc's rule.

    A copy is preened (``e2fsck -p``: journal replay and orphan release, as the next mount
    would do; exit 0 or 1) and must then pass ``e2fsck -fn`` with nothing to report. The
    image itself is not modified.
    """
    with image_file(image) as path, preened_copy(path) as (copy, preen):
        if preen.returncode not in (0, 1):
            return False, f"e2fsck -p: exit {preen.returncode}\n{preen.stdout}{preen.stderr}"
        check = e2fsck(copy, "-fn")
        return check.returncode == 0, f"{preen.stdout}{check.stdout}{check.stderr}"
