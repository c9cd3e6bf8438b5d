"""The framework of replication.h: order, first-error stop, skipped callbacks, removal."""

from __future__ import annotations

import threading

import pytest

from repdisk.replication.framework import (
    Registry,
    ReplicationError,
    ReplicationMode,
    ReplicationOps,
)


def recording_ops(log: list, name: str, fail: str | None = None) -> ReplicationOps:
    def make(op):
        def fn(rs, *args):
            log.append((name, op, args))
            if op == fail:
                raise RuntimeError(f"{name} {op} broke")
        return fn
    return ReplicationOps(start=make("start"), stop=make("stop"),
                          checkpoint=make("checkpoint"), get_error=make("get_error"))


def test_newest_state_is_visited_first_with_the_arguments() -> None:
    reg, log = Registry(), []
    for name in ("a", "b", "c"):
        reg.new(name, recording_ops(log, name))
    reg.start_all(ReplicationMode.SECONDARY)
    reg.do_checkpoint_all()
    reg.get_error_all()
    reg.stop_all(True)
    assert log == [
        ("c", "start", (ReplicationMode.SECONDARY,)), ("b", "start", (ReplicationMode.SECONDARY,)),
        ("a", "start", (ReplicationMode.SECONDARY,)),
        ("c", "checkpoint", ()), ("b", "checkpoint", ()), ("a", "checkpoint", ()),
        ("c", "get_error", ()), ("b", "get_error", ()), ("a", "get_error", ()),
        ("c", "stop", (True,)), ("b", "stop", (True,)), ("a", "stop", (True,)),
    ]


def test_first_error_stops_the_walk_and_is_chained() -> None:
    reg, log = Registry(), []
    reg.new("a", recording_ops(log, "a"))
    bad = reg.new("b", recording_ops(log, "b", fail="checkpoint"))
    reg.new("c", recording_ops(log, "c"))
    with pytest.raises(ReplicationError) as info:
        reg.do_checkpoint_all()
    assert log == [("c", "checkpoint", ()), ("b", "checkpoint", ())]
    assert info.value.state is bad
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value) == "b: checkpoint failed: b checkpoint broke"


def test_missing_callbacks_are_skipped() -> None:
    reg, log = Registry(), []
    reg.new("a", recording_ops(log, "a"))
    reg.new("empty", ReplicationOps())
    reg.new("only-stop", ReplicationOps(stop=lambda rs, f: log.append(("only-stop", "stop", (f,)))))
    reg.start_all(ReplicationMode.PRIMARY)
    reg.stop_all(False)
    assert log == [("a", "start", (ReplicationMode.PRIMARY,)),
                   ("only-stop", "stop", (False,)), ("a", "stop", (False,))]


def test_removal_during_a_walk_is_safe() -> None:
    reg, log = Registry(), []
    victim = reg.new("a", recording_ops(log, "a"))

    def remove_victim(rs):
        log.append(("b", "checkpoint", ()))
        reg.remove(victim)
        reg.remove(rs)  # and itself

    reg.new("b", ReplicationOps(checkpoint=remove_victim))
    reg.do_checkpoint_all()
    assert log == [("b", "checkpoint", ())]
    assert len(reg) == 0
    reg.remove(victim)  # removing an unknown state is a no-op


def test_concurrent_registration_and_walks() -> None:
    reg = Registry()
    counts: list[int] = []
    lock = threading.Lock()

    def cb(rs):
        with lock:
            counts.append(1)

    def register(n: int) -> None:
        for i in range(200):
            rs = reg.new((n, i), ReplicationOps(checkpoint=cb))
            if i % 2:
                reg.remove(rs)

    threads = [threading.Thread(target=register, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        reg.do_checkpoint_all()
    for t in threads:
        t.join()
    counts.clear()
    reg.do_checkpoint_all()
    assert len(counts) == len(reg) == 400

