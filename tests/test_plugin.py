"""The nbdkit plugin (nbdplugin/repdisk.py) as NBD clients see it, through real nbdkit + libnbd.

Every export kind is checked: the primary's guest disk (its default export), the secondary's
``replica`` (the primary writes here) and ``active`` (the secondary VM's view).  Capabilities,
block sizes, extents on a sparse disk, trim/zero/flush/FUA, unaligned writes, a write past the
end and several connections at once; every byte read back and compared with a model, and on
the primary also with what arrived on the secondary.
"""

from __future__ import annotations

import ast
import random
import subprocess
import threading
from collections.abc import Iterator

import nbd
import pytest

from repdisk.cli.main import PLUGIN
from repdisk.node import config as cfgmod
from tests.helpers.nodes import SIZE, MiB, Nodes, random_bytes, read_all, read_export, start_pair

EXPORTS = ["primary", "replica", "active"]
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO
KiB = 1024


class Target:
    """One export of a started pair, plus where its writes must also show up."""

    def __init__(self, nodes: Nodes, which: str) -> None:
        self.pri, self.sec = start_pair(nodes)
        self.which = which
        self.node = self.pri if which == "primary" else self.sec
        self.export = "" if which == "primary" else which

    def connect(self, meta: bool = False) -> nbd.NBD:
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(self.node.uri(self.export))
        return h

    def check_replicated(self, expect: bytes) -> None:
        """Where this export's writes must show up, and where they must not.

        primary: the secondary's disk holds exactly what the guest sees; replica: the
        secondary VM does not see the primary's writes before a checkpoint; active: the
        secondary VM's writes never reach the disk.
        """
        elsewhere = {"primary": (self.sec, "replica", expect),
                     "replica": (self.sec, "active", bytes(SIZE)),
                     "active": (self.sec, "replica", bytes(SIZE))}[self.which]
        assert read_export(*elsewhere[:2]) == elsewhere[2]


@pytest.fixture(params=EXPORTS)
def target(request: pytest.FixtureRequest, nodes: Nodes) -> Target:
    return Target(nodes, request.param)


@pytest.fixture
def h(target: Target) -> Iterator[nbd.NBD]:
    handle = target.connect(meta=True)
    yield handle
    handle.shutdown()


def test_capabilities_and_block_size(h: nbd.NBD) -> None:
    assert h.get_size() == SIZE
    assert not h.is_read_only()
    caps = (h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_fast_zero(),
            h.can_multi_conn(), h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
    assert caps == (True,) * 7
    sizes = [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                           nbd.SIZE_MAXIMUM)]
    assert sizes == [1, 4096, 0xFFFFFFFF]


def extents(h: nbd.NBD) -> list[tuple[int, int, int]]:
    """base:allocation over the whole export as (offset, length, flags), merged."""
    out: list[tuple[int, int, int]] = []
    size, pos = h.get_size(), 0

    def collect(context: str, offset: int, entries: list[int], err: object) -> int:
        nonlocal pos
        assert context == nbd.CONTEXT_BASE_ALLOCATION and offset == pos
        for length, flags in zip(entries[::2], entries[1::2], strict=True):
            if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + length, flags)
            else:
                out.append((pos, length, flags))
            pos += length
        return 0

    while pos < size:
        h.block_status(size - pos, pos, collect)
    assert pos == size
    return out


def test_extents_on_a_sparse_disk(target: Target, h: nbd.NBD) -> None:
    assert extents(h) == [(0, SIZE, HOLE_ZERO)]
    h.pwrite(random_bytes(7, MiB), 4 * MiB)
    h.pwrite(b"\x01" * 64 * KiB, 10 * MiB)
    h.flush()
    assert extents(h) == [(0, 4 * MiB, HOLE_ZERO), (4 * MiB, MiB, 0),
                          (5 * MiB, 5 * MiB, HOLE_ZERO), (10 * MiB, 64 * KiB, 0),
                          (10 * MiB + 64 * KiB, SIZE - 10 * MiB - 64 * KiB, HOLE_ZERO)]
    h.zero(256 * KiB, 4 * MiB + 256 * KiB)
    data = read_all(h)
    for offset, length, flags in extents(h):    # what says "zero" must read as zeros
        if flags & nbd.STATE_ZERO:
            assert data[offset:offset + length] == bytes(length), (offset, length, flags)


def test_trim_zero_flush_fua_round_trip(target: Target, h: nbd.NBD) -> None:
    expect = bytearray(SIZE)
    blob = random_bytes(8, 6 * MiB)
    h.pwrite(blob, MiB, nbd.CMD_FLAG_FUA)
    expect[MiB:7 * MiB] = blob
    h.zero(128 * KiB, 2 * MiB + 3, nbd.CMD_FLAG_FUA)
    expect[2 * MiB + 3:2 * MiB + 3 + 128 * KiB] = bytes(128 * KiB)
    h.zero(MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
    expect[4 * MiB:5 * MiB] = bytes(MiB)
    h.zero(64 * KiB, 6 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    expect[6 * MiB:6 * MiB + 64 * KiB] = bytes(64 * KiB)
    h.flush()
    before_trim = bytes(expect)
    h.trim(256 * KiB, 3 * MiB, nbd.CMD_FLAG_FUA)       # advisory: old bytes or zeros
    h.flush()
    data = read_all(h)
    trimmed = data[3 * MiB:3 * MiB + 256 * KiB]
    assert trimmed in (before_trim[3 * MiB:3 * MiB + 256 * KiB], bytes(256 * KiB))
    expect[3 * MiB:3 * MiB + 256 * KiB] = trimmed
    assert data == expect
    target.check_replicated(data)


def test_unaligned_one_byte_writes(target: Target, h: nbd.NBD) -> None:
    expect = bytearray(SIZE)
    rng = random.Random(9)
    offsets = [0, 1, 511, 512, 4095, 4097, 64 * KiB - 1, 64 * KiB, SIZE - 1]
    offsets += [rng.randrange(SIZE) for _ in range(50)]
    for i, off in enumerate(offsets):
        value = bytes([i % 255 + 1])
        h.pwrite(value, off)
        expect[off] = value[0]
    h.pwrite(b"\xab\xcd", 64 * KiB - 1)                # across a cluster boundary
    expect[64 * KiB - 1:64 * KiB + 1] = b"\xab\xcd"
    h.flush()
    assert read_all(h) == expect
    target.check_replicated(bytes(expect))


def test_write_past_the_end_fails_and_changes_nothing(target: Target, h: nbd.NBD) -> None:
    h.pwrite(b"\x42" * 4096, SIZE - 4096)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)  # let the server judge it
    for length, offset in ((200, SIZE - 100), (1, SIZE), (4096, SIZE + 4096)):
        with pytest.raises(nbd.Error):
            h.pwrite(b"\x99" * length, offset)
        with pytest.raises(nbd.Error):
            h.zero(length, offset)
    assert read_all(h) == bytes(SIZE - 4096) + b"\x42" * 4096
    target.check_replicated(bytes(SIZE - 4096) + b"\x42" * 4096)


def test_several_connections_at_once(target: Target) -> None:
    """Four connections write and read back their own interleaved 64 KiB stripes at once."""
    stripe, conns = 64 * KiB, 4
    expect = bytearray(SIZE)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        h = target.connect()
        rng = random.Random(100 + k)
        try:
            for n in range(k, SIZE // stripe, conns):
                off = n * stripe + rng.randrange(stripe // 2)
                data = rng.randbytes(rng.randrange(1, stripe // 2))
                h.pwrite(data, off)
                expect[off:off + len(data)] = data
                assert h.pread(len(data), off) == data
            h.flush()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
        finally:
            h.shutdown()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    h = target.connect()
    try:
        assert read_all(h) == expect
    finally:
        h.shutdown()
    target.check_replicated(bytes(expect))


# -- the plugin's documentation ---------------------------------------------------------------

def test_dump_plugin_lists_every_key() -> None:
    run = subprocess.run(["nbdkit", "python", PLUGIN, "--dump-plugin"], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    keys = [line for line in run.stdout.splitlines() if line.startswith("repdisk_keys=")]
    assert keys == ["repdisk_keys=" + " ".join(k.name for k in cfgmod.KEYS)]
    assert cfgmod.help_text() in run.stdout
    assert "thread_model=parallel" in run.stdout


def test_plugin_header_holds_exactly_the_key_table() -> None:
    with open(PLUGIN) as f:
        doc = ast.get_docstring(ast.parse(f.read()), clean=False)
    assert doc is not None and doc.count(cfgmod.help_text()) == 1
    assert doc.count("role=primary|secondary  (required)") == 1  # one table, not two
    table = doc[doc.index(cfgmod.help_text()):]
    assert table.rstrip() == cfgmod.help_text()                 # and nothing stale after it
