"""Fuzzing the plugin's request path through a real replicated pair (nbdkit + repdisk).

Random sequences of reads, writes, zeroes, trims and flushes (random offsets and lengths,
unaligned ones, ones that cross or start past the end, FUA on or off) go to the primary
with libnbd's client-side checks off, so every request reaches the server as sent.  A
model (a bytearray) says what the disk holds: a request that does not fit must fail and
change nothing; every read must match the model byte for byte; after each sequence the
secondary's disk must equal the model too (the replication path saw the same requests).

Trim is advisory (DESIGN: "may do nothing"), so after a trim the model accepts, per byte,
the old value or zero and then learns what the primary reads; the secondary must still
end up equal to the primary.

Bounded for CI: a fixed number of derandomized examples; the module runs in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import nbd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.nodes import NodeProc, Nodes, checkpoint, read_file, start_pair

SIZE = 1 << 20
FLAGS = {True: nbd.CMD_FLAG_FUA, False: 0}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProc, NodeProc, Any]]:
    nodes = Nodes(str(tmp_path_factory.mktemp("fuzzplugin")))
    try:
        pri, sec = start_pair(nodes, SIZE)
        h = pri.client()
        h.set_strict_mode(0)          # let bad requests reach nbdkit and the plugin
        yield pri, sec, h
        h.shutdown()
    finally:
        nodes.close()


@pytest.fixture(scope="module")
def model(pair: Any) -> bytearray:
    return bytearray(SIZE)


offsets = st.one_of(st.integers(0, SIZE - 1), st.integers(SIZE - 4096, SIZE + 4096),
                    st.sampled_from([0, 511, 512, 4095, 4096, SIZE - 1, SIZE, SIZE + 1]))
lengths = st.one_of(st.integers(1, 9000), st.sampled_from([1, 511, 512, 4096, 65536, 65537]))
ops = st.tuples(st.sampled_from(["read", "write", "zero", "trim", "flush"]), offsets, lengths,
                st.booleans(), st.binary(min_size=1, max_size=1))


def apply(h: nbd.NBD, model: bytearray, op: str, off: int, length: int, fua: bool,
          seed: bytes) -> None:
    fits = off + length <= SIZE
    if op == "flush":
        h.flush()
        return
    if not fits:
        with pytest.raises(nbd.Error):
            _request(h, op, off, length, fua, seed)
        return
    before = bytes(model[off:off + length])
    got = _request(h, op, off, length, fua, seed)
    if op == "read":
        assert got == before, f"read [{off}, {off + length}) differs from the model"
    elif op == "write":
        model[off:off + length] = _payload(seed, length)
    elif op == "zero":
        model[off:off + length] = bytes(length)
    else:
        now = h.pread(length, off)
        assert all(b in (old, 0) for b, old in zip(now, before, strict=True)), "trim invented data"
        model[off:off + length] = now


def _payload(seed: bytes, length: int) -> bytes:
    pattern = bytes((seed[0] + i * 7) & 0xFF for i in range(256))
    return (pattern * (length // 256 + 1))[:length]


def _request(h: nbd.NBD, op: str, off: int, length: int, fua: bool, seed: bytes) -> Any:
    if op == "read":
        return h.pread(length, off)
    if op == "write":
        return h.pwrite(_payload(seed, length), off, FLAGS[fua])
    if op == "zero":
        return h.zero(length, off, FLAGS[fua])
    return h.trim(length, off, FLAGS[fua])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(ops, min_size=1, max_size=25))
def test_random_requests_match_the_model_on_both_nodes(pair: Any, model: bytearray,
                                                       sequence: list[Any]) -> None:
    pri, sec, h = pair
    for op in sequence:
        apply(h, model, *op)
    h.flush()
    assert h.pread(SIZE, 0) == model
    assert read_file(sec.disks[0]) == model
    assert not pri.ctl("query-replication")["disks"][0]["degraded"]


def test_a_checkpoint_after_fuzzing_is_accepted(pair: Any, model: bytearray) -> None:
    """Bad requests leave no trace in the replication state: the pair still checkpoints."""
    pri, sec, h = pair
    checkpoint(pri, sec)
    sec.ctl("replication-get-error")
    assert read_file(sec.disks[0]) == model


@pytest.mark.parametrize("op,off,length", [
    ("write", SIZE - 1, 2), ("zero", SIZE, 1), ("trim", SIZE + 1, 4096),
    ("read", SIZE - 4095, 4096), ("read", SIZE, 1),
    ("write", 0, 0), ("zero", 0, 0),
])
def test_regression_requests(pair: Any, model: bytearray, op: str, off: int, length: int) -> None:
    """Edge requests kept as explicit cases: past the end fails and changes nothing; an
    empty request fails or does nothing."""
    _, sec, h = pair
    try:
        _request(h, op, off, length, False, b"\x01")
        assert length == 0 or off + length <= SIZE, "an out-of-range request succeeded"
    except nbd.Error:
        assert length == 0 or off + length > SIZE
    h.flush()
    assert h.pread(SIZE, 0) == model
    assert read_file(sec.disks[0]) == model
