"""Tests of dirtymap.py: granule semantics, O(dirty) cost, thread safety, persistence."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repdisk.block.dirtymap import DirtyMap

KiB, MiB, TiB = 1 << 10, 1 << 20, 1 << 40


def test_mark_rounds_out_to_granules_and_clamps_to_size() -> None:
    dm = DirtyMap(10 * 4096 + 100, 4096)
    assert not dm and dm.runs() == [] and dm.dirty_bytes == 0
    dm.mark(5000, 10)                         # granule 1
    dm.mark(4095, 2)                          # granules 0 and 1
    dm.mark(10 * 4096 + 50, 1)                # the short last granule
    assert dm
    assert dm.runs() == [(0, 8192), (10 * 4096, 100)]
    assert dm.dirty_bytes == 8192 + 100
    dm.mark(8192, 2 * 4096 + 1)               # joins the first run, touches granule 4
    assert dm.runs() == [(0, 5 * 4096), (10 * 4096, 100)]
    assert dm.dirty_bytes == 5 * 4096 + 100
    dm.mark(0, 0)                             # empty: nothing
    assert dm.dirty_bytes == 5 * 4096 + 100


def test_clear_takes_runs_and_keeps_partial_granules() -> None:
    dm = DirtyMap(64 * KiB - 1, 4096)         # last granule is 4095 bytes
    dm.mark(0, dm.size)
    assert dm.runs() == [(0, dm.size)] and dm.dirty_bytes == dm.size
    dm.clear(100, 3 * 4096)                   # only granules 1 and 2 are wholly inside
    assert dm.runs() == [(0, 4096), (3 * 4096, dm.size - 3 * 4096)]
    dm.clear(60 * KiB, 4095)                  # the short last granule, as runs() gives it
    assert dm.runs() == [(0, 4096), (3 * 4096, 12 * 4096)]
    for offset, length in dm.runs():          # clearing every run empties the map
        dm.clear(offset, length)
    assert not dm and dm.dirty_bytes == 0 and dm.runs() == []


def test_take_last_clears_the_ends_of_the_highest_runs() -> None:
    dm = DirtyMap(20 * 4096 + 100, 4096)
    assert dm.take_last(MiB, 64, MiB) == []
    dm.mark(4096, 5 * 4096)                   # granules 1..5
    dm.mark(10 * 4096, 2 * 4096)              # granules 10..11
    dm.mark(20 * 4096, 1)                     # the short last granule
    assert dm.take_last(MiB, 2, MiB) == [(20 * 4096, 100), (10 * 4096, 2 * 4096)]
    assert dm.runs() == [(4096, 5 * 4096)] and dm.dirty_bytes == 5 * 4096
    assert dm.take_last(2 * 4096, 64, MiB) == [(4 * 4096, 2 * 4096), (2 * 4096, 2 * 4096),
                                               (4096, 4096)]  # cut to the limit, in turn
    assert not dm and dm.dirty_bytes == 0
    dm.mark(0, 8 * 4096)
    assert dm.take_last(100, 64, 3 * 4096) == [(7 * 4096, 4096), (6 * 4096, 4096),
                                               (5 * 4096, 4096)]  # a granule each at least
    assert dm.take_last(MiB, 64, 1) == [(0, 5 * 4096)]  # the piece crossing the budget is in
    assert dm.runs() == [] and dm.dirty_bytes == 0
    dm.mark(4096, 3 * 4096)
    dm.clear(4096, 4096)                      # from a run's start, as the fast path does
    assert dm.runs() == [(2 * 4096, 2 * 4096)] and dm.dirty_bytes == 2 * 4096


def test_is_dirty() -> None:
    dm = DirtyMap(MiB, 64 * KiB)
    dm.mark(200 * KiB, 1)                     # granule 3: [192K, 256K)
    assert dm.is_dirty(192 * KiB, 1) and dm.is_dirty(255 * KiB, 10 * KiB)
    assert dm.is_dirty(0, MiB)
    assert not dm.is_dirty(0, 192 * KiB) and not dm.is_dirty(256 * KiB, 64 * KiB)
    assert not dm.is_dirty(200 * KiB, 0)


@pytest.mark.parametrize("offset,length", [(-1, 10), (0, MiB + 1), (MiB, 1), (10, -1)])
def test_bad_ranges_are_refused(offset: int, length: int) -> None:
    dm = DirtyMap(MiB)
    for call in (dm.mark, dm.clear, dm.is_dirty):
        with pytest.raises(ValueError, match=r"dirty map: range .* is outside the 1048576-byte"):
            call(offset, length)
    assert not dm


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        DirtyMap(0)
    with pytest.raises(ValueError, match="granularity 3000 is not a power of two"):
        DirtyMap(MiB, 3000)


def test_clear_all() -> None:
    dm = DirtyMap(MiB, 4096)
    dm.mark(0, 10_000)
    dm.mark(500 * KiB, 1)
    dm.clear_all()
    assert not dm and dm.dirty_bytes == 0


@pytest.mark.timeout(10)
def test_a_feed_is_taken_in_before_every_read_and_clear() -> None:
    """Marks made elsewhere (the C fast path's log) are in the map for every reader: each
    read or clear first marks what the feed has, and a feed is taken once."""
    pending: list[tuple[int, int]] = []
    calls = 0

    def feed() -> list[tuple[int, int]]:
        nonlocal calls
        calls += 1
        taken = pending[:]
        pending.clear()
        return taken

    d = DirtyMap(1 << 20, 4096)
    d.feed_from(feed)
    reads = [
        ("bool", lambda: bool(d), True),
        ("dirty_bytes", lambda: d.dirty_bytes, 4096),
        ("is_dirty", lambda: d.is_dirty(8192, 1), True),
        ("runs", d.runs, [(8192, 4096)]),
        ("take_last", lambda: d.take_last(4096, 4, 1 << 20), [(8192, 4096)]),
    ]
    for name, read, want in reads:
        pending.append((8192 + 100, 10))  # inside one granule: marks it whole
        assert read() == want, name
        assert not pending, name
        d.clear_all()
    pending.append((0, 3 * 4096))
    d.clear(4096, 4096)                 # taken in first, then cleared: the rest stays
    assert d.runs() == [(0, 4096), (8192, 4096)]
    pending.append((0, 4096))
    d.clear_all()
    assert (d.runs(), pending) == ([], [])
    assert calls == 5 * 2 + 4


def test_cost_is_per_run_not_per_byte() -> None:
    """A fully dirty 1 PiB disk at 4 KiB granules is one run, not 2**38 entries."""
    dm = DirtyMap(1024 * TiB, 4096)
    dm.mark(0, dm.size)
    assert dm.runs() == [(0, dm.size)] and dm.dirty_bytes == dm.size
    for i in range(1000):                     # punch 1000 clean gaps
        dm.clear(i * TiB, 4096)
    runs = dm.runs()
    assert len(runs) == 1000 and runs[0] == (4096, TiB - 4096)
    assert dm.dirty_bytes == dm.size - 1000 * 4096
    assert len(dm._starts) == 1000


def test_concurrent_marks_and_clears_are_exact() -> None:
    dm = DirtyMap(64 * MiB, 4096)
    granules = 64 * MiB // 4096

    def work(k: int) -> None:
        mine = range(k, granules, 8)
        for g in mine:
            dm.mark(g * 4096 + 1, 10)
        for g in mine[::2]:                   # and clear every other one of its own
            dm.clear(g * 4096, 4096)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {g for k in range(8) for g in range(k, granules, 8)} - \
        {g for k in range(8) for g in range(k, granules, 8)[::2]}
    assert dm.dirty_bytes == len(expected) * 4096
    got = {off // 4096 + i for off, length in dm.runs() for i in range(length // 4096)}
    assert got == expected


# --- property test against a set of granules -------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 50_000), shift=st.integers(0, 12),
       ops=st.lists(st.tuples(st.sampled_from(["mark", "clear", "clear_run", "clear_all",
                                               "take_last"]),
                              st.integers(0, 49_999), st.integers(0, 20_000)), max_size=30))
def test_matches_a_set_of_granules(size: int, shift: int,
                                   ops: list[tuple[str, int, int]]) -> None:
    g = 1 << shift
    dm = DirtyMap(size, g)
    model: set[int] = set()
    last = (size - 1) // g
    for name, offset, length in ops:
        offset %= size
        length = min(length, size - offset)
        if name == "mark":
            dm.mark(offset, length)
            if length:
                model |= set(range(offset // g, (offset + length - 1) // g + 1))
        elif name == "clear":
            dm.clear(offset, length)
            end = offset + length
            first, stop = -(-offset // g), (last + 1 if end == size else end // g)
            model -= set(range(first, stop))
        elif name == "clear_run" and dm.runs():
            run = dm.runs()[offset % len(dm.runs())]
            dm.clear(*run)
            model -= set(range(run[0] // g, -(-(run[0] + run[1]) // g)))
        elif name == "clear_all":
            dm.clear_all()
            model.clear()
        elif name == "take_last":  # offset and length pick the count and the limit
            pieces = dm.take_last(length, offset % 5 + 1, length + 1)
            taken = set()
            for lo, n in pieces:
                piece = set(range(lo // g, -(-(lo + n) // g)))
                assert piece <= model and len(piece) <= max(length // g, 1)
                assert not taken or max(piece) < min(taken)  # highest first
                taken |= piece
            count, total = offset % 5 + 1, sum(n for _, n in pieces)
            assert len(pieces) <= count
            assert total - (pieces[-1][1] if pieces else 0) <= length  # then the budget is used
            assert len(pieces) == count or total > length or taken == model  # ...or all is
            assert all(gr < min(taken) for gr in model - taken)  # the highest granules
            assert bool(pieces) == bool(model)
            model -= taken
        # the whole state, every time
        expected_runs = []
        for granule in sorted(model):
            lo, hi = granule * g, min((granule + 1) * g, size)
            if expected_runs and expected_runs[-1][0] + expected_runs[-1][1] == lo:
                expected_runs[-1] = (expected_runs[-1][0], hi - expected_runs[-1][0])
            else:
                expected_runs.append((lo, hi - lo))
        assert dm.runs() == expected_runs
        assert dm.dirty_bytes == sum(n for _, n in expected_runs)
        assert bool(dm) == bool(model)
        probe = min(max(1, length), size - offset)
        touched = set(range(offset // g, (offset + probe - 1) // g + 1))
        assert dm.is_dirty(offset, probe) == bool(touched & model)


# --- persistence ----------------------------------------------------------------------------

def test_save_and_load_roundtrip_atomically(tmp_path: Path) -> None:
    path = tmp_path / "disk.dirty"
    dm = DirtyMap(10 * MiB + 5, 64 * KiB)
    dm.mark(0, 1)
    dm.mark(5 * MiB, MiB)
    dm.mark(10 * MiB, 5)
    dm.save(path)
    assert sorted(os.listdir(tmp_path)) == ["disk.dirty"]       # no temporary left behind
    loaded = DirtyMap.load(path, dm.size, 64 * KiB)
    assert loaded.runs() == dm.runs() and loaded.dirty_bytes == dm.dirty_bytes
    doc = json.loads(path.read_text())
    assert doc["runs"] == [[0, 64 * KiB], [5 * MiB, MiB], [10 * MiB, 5]]
    inode = path.stat().st_ino
    dm.clear_all()
    dm.save(path)                                               # replaced, not rewritten
    assert path.stat().st_ino != inode
    assert not DirtyMap.load(path, dm.size, 64 * KiB)


def test_load_at_another_granularity_is_a_superset(tmp_path: Path) -> None:
    path = tmp_path / "d"
    dm = DirtyMap(MiB, 4096)
    dm.mark(70 * KiB, 1)
    dm.save(path)
    coarse = DirtyMap.load(path, MiB, 64 * KiB)
    assert coarse.runs() == [(64 * KiB, 64 * KiB)]
    fine = DirtyMap.load(path, MiB, 512)
    assert fine.runs() == [(68 * KiB, 4096)]


def test_load_refuses_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "d"
    with pytest.raises(FileNotFoundError):
        DirtyMap.load(path, MiB)
    DirtyMap(MiB).save(path)
    with pytest.raises(ValueError, match=f"dirty map {path}: saved for a {MiB}-byte disk, "
                                         f"but the disk is {2 * MiB} bytes"):
        DirtyMap.load(path, 2 * MiB)
    good = json.loads(path.read_text())
    for change, why in [({"magic": "x"}, "not a repdisk dirty map"),
                        ({"version": 9}, "format version 9"),
                        ({"granularity": 0}, "field 'granularity' is 0"),
                        ({"runs": {}}, "field 'runs' is not a list"),
                        ({"runs": [[MiB - 1, 2]]}, r"bad run \[1048575, 2\]"),
                        ({"runs": [[0, 0]]}, r"bad run \[0, 0\]")]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=f"dirty map {path}: {why}"):
            DirtyMap.load(path, MiB)
    path.write_text("{truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        DirtyMap.load(path, MiB)
