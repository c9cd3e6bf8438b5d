"""The primary's write gate (writepath.gate): the route of every guest write and flush, by
write mode, link state and checkpoint hold, row by row."""

from __future__ import annotations

import pytest

from repdisk.replication.link import LinkState
from repdisk.replication.writepath import Op, Route, WriteMode, gate

SYNC, ASYNC = WriteMode.SYNC, WriteMode.ASYNC
W, F = Op.WRITE, Op.FLUSH
UP, DOWN, DEGRADED = LinkState.UP, LinkState.DOWN, LinkState.DEGRADED
FORWARD, MARK, WRITE_BACK, HELD, LOCAL = (Route.FORWARD, Route.MARK, Route.WRITE_BACK,
                                          Route.HELD, Route.LOCAL)

GATE_TABLE = {
    # (mode, op): {(link, holding): route}
    (SYNC, W): {(UP, False): FORWARD, (UP, True): FORWARD,     # the forwarder holds
                (DOWN, False): MARK, (DOWN, True): MARK,
                (DEGRADED, False): MARK, (DEGRADED, True): MARK},
    (SYNC, F): {(UP, False): FORWARD, (UP, True): FORWARD,
                (DOWN, False): LOCAL, (DOWN, True): LOCAL,
                (DEGRADED, False): LOCAL, (DEGRADED, True): LOCAL},
    (ASYNC, W): {(UP, False): WRITE_BACK, (UP, True): HELD,
                 (DOWN, False): WRITE_BACK, (DOWN, True): HELD,
                 (DEGRADED, False): WRITE_BACK, (DEGRADED, True): HELD},
    (ASYNC, F): {(UP, False): LOCAL, (UP, True): LOCAL,
                 (DOWN, False): LOCAL, (DOWN, True): LOCAL,
                 (DEGRADED, False): LOCAL, (DEGRADED, True): LOCAL},
}


@pytest.mark.parametrize("mode,op,link,holding",
                         [(m, o, lk, h) for (m, o) in GATE_TABLE for lk in LinkState
                          for h in (False, True)])
def test_gate_table(mode: WriteMode, op: Op, link: LinkState, holding: bool) -> None:
    assert gate(mode, op, link, holding) is GATE_TABLE[(mode, op)][(link, holding)]


def test_the_table_covers_every_mode_and_op() -> None:
    assert set(GATE_TABLE) == {(m, o) for m in WriteMode for o in Op}
