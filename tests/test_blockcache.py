"""BlockCache on its own: what it keeps, what it forgets, its bound (the rules of when the
primary may put are tested with a real primary in test_primary.py)."""

from __future__ import annotations

from repdisk.block.blockcache import BLOCK, BlockCache

TiB = 1 << 40


def test_keeps_whole_aligned_blocks_until_taken() -> None:
    cache = BlockCache(limit=8)
    assert cache.fits(BLOCK * 3, BLOCK) and not cache.fits(100, BLOCK)
    assert not cache.fits(0, 2 * BLOCK) and not cache.fits(0, 512)
    data = bytearray(b"a" * BLOCK)
    cache.put(BLOCK * 3, memoryview(data))
    data[:] = b"b" * BLOCK  # the writer's buffer is reused: the cache kept a copy
    assert cache.take(BLOCK * 3, BLOCK) == b"a" * BLOCK
    assert cache.take(BLOCK * 3, BLOCK) is None and cache.taken == 1 and len(cache) == 0


def test_a_larger_piece_forgets_the_blocks_inside_it() -> None:
    cache = BlockCache(limit=8)
    for block in (0, 1, 2, 5):
        cache.put(block * BLOCK, memoryview(bytes([block]) * BLOCK))
    assert cache.take(BLOCK // 2, 2 * BLOCK) is None  # touches blocks 0, 1 and 2
    assert len(cache) == 1 and cache.take(5 * BLOCK, BLOCK) == bytes([5]) * BLOCK
    assert cache.taken == 1


def test_drop_of_a_huge_range_looks_only_at_the_entries() -> None:
    cache = BlockCache(limit=8)
    for offset in (0, TiB // 2, TiB - BLOCK):
        cache.put(offset, memoryview(bytes(BLOCK)))
    cache.drop(BLOCK, TiB - 2 * BLOCK + 1)  # 2^28 blocks: returns at once
    assert len(cache) == 1 and cache.take(0, BLOCK) is not None
    cache.put(TiB - BLOCK, memoryview(bytes(BLOCK)))
    cache.drop(TiB - 1, 1)  # the last byte of a block: the whole block goes
    assert len(cache) == 0


def test_full_cache_keeps_no_new_block_but_replaces_a_kept_one() -> None:
    cache = BlockCache(limit=2)
    cache.put(0, memoryview(b"a" * BLOCK))
    cache.put(BLOCK, memoryview(b"b" * BLOCK))
    cache.put(2 * BLOCK, memoryview(b"c" * BLOCK))
    assert len(cache) == 2 and cache.take(2 * BLOCK, BLOCK) is None
    cache.put(0, memoryview(b"d" * BLOCK))
    assert cache.take(0, BLOCK) == b"d" * BLOCK
