"""The controller's state machine: the transition table, the gate, and how an operation runs.

No nodes: the table is checked exhaustively against the one written out here (as
tests/test_secondary.py checks the secondary's ``gate``), and ``_operation`` is driven with
bodies that succeed, fail or misbehave.
"""

from __future__ import annotations

import itertools

import pytest

from repdisk.controller.config import ControllerConfig
from repdisk.controller.controller import Controller
from repdisk.controller.states import TRANSITIONS, ControllerState, Operation, gate
from repdisk.errors import ConfigError, ControlError

S = ControllerState
Op = Operation
ALL = set(S)

#: op -> (runs in, leaves (None = where it ran), shown while running, left on error)
EXPECTED = {
    Op.ADOPT: ({S.STARTING, S.FAILED_OVER, S.FENCED},
              {S.STARTING, S.RUNNING, S.DEGRADED, S.FAILED_OVER, S.FENCED}, None, None),
    Op.START: ({S.STARTING}, {S.RUNNING}, None, None),
    Op.HEARTBEAT: ({S.STARTING, S.RUNNING, S.DEGRADED, S.FAILED_OVER, S.FENCED},
                  {None, S.DEGRADED, S.FENCED, S.FAILED_OVER}, None, None),
    Op.CHECKPOINT: ({S.RUNNING}, {S.RUNNING}, None, None),
    Op.RESYNC: ({S.RUNNING, S.DEGRADED}, {S.RUNNING}, S.RESYNCING, S.DEGRADED),
    Op.FAILOVER: ({S.RUNNING, S.DEGRADED}, {S.FAILED_OVER}, None, None),
    Op.FENCE: ({S.FAILED_OVER}, {S.FAILED_OVER}, None, None),
    Op.PROMOTE: ({S.FAILED_OVER}, {S.RUNNING, S.DEGRADED}, S.PROMOTING, S.FAILED_OVER),
    Op.VERIFY: ({S.RUNNING}, {S.RUNNING}, None, None),
    Op.SWITCHOVER: ({S.RUNNING}, {S.RUNNING}, None, None),
    Op.STOP: (ALL, {S.STOPPED}, None, None),
}


@pytest.mark.parametrize("op,state", list(itertools.product(Op, S)),
                         ids=lambda v: v.value)
def test_gate_is_the_table(op: Operation, state: ControllerState) -> None:
    runs_in = EXPECTED[op][0]
    if state in runs_in:
        assert gate(op, state) is TRANSITIONS[op]
    else:
        with pytest.raises(ControlError, match=f"cannot {op.value}: the controller is "
                                               f"{state.value} \\({op.value} runs in: "):
            gate(op, state)


def test_every_row_is_as_written() -> None:
    assert set(TRANSITIONS) == set(Op)
    for op, (runs_in, leaves, during, on_error) in EXPECTED.items():
        rule = TRANSITIONS[op]
        assert (set(rule.runs_in), set(rule.leaves), rule.during, rule.on_error) == \
            (runs_in, leaves, during, on_error), op


def test_transient_states_are_only_shown_during_an_operation() -> None:
    """resyncing and promoting are entered only as an operation's ``during`` and no
    operation may start in them: a second operation waits for the first to end."""
    transient = {S.RESYNCING, S.PROMOTING}
    assert {r.during for r in TRANSITIONS.values()} - {None} == transient
    for op, rule in TRANSITIONS.items():
        if op is not Op.STOP:
            assert not rule.runs_in & transient, op
        assert not {s for s in rule.leaves if s is not None} & transient, op


def test_every_state_is_left_by_some_operation() -> None:
    """No state but stopped is a dead end."""
    for state in ALL - {S.STOPPED}:
        leaving = [op for op, rule in TRANSITIONS.items()
                   if state in rule.runs_in and op is not Op.STOP
                   and ({s for s in rule.leaves if s is not None} - {state}
                        or rule.during not in (None, state))]
        assert leaving or state in (S.RESYNCING, S.PROMOTING), state


def _controller(tmp_path) -> Controller:
    return Controller(ControllerConfig(primary=str(tmp_path / "p.qmp"),
                                       secondary=str(tmp_path / "s.qmp"), heartbeat=0.1,
                                       heartbeat_timeout=1.2))


def _changes(ctl: Controller) -> list[tuple[str, str]]:
    return [(e["data"]["from"], e["data"]["to"]) for e in ctl.events
            if e["event"] == "CONTROLLER_STATE_CHANGED"]


def test_an_operation_shows_its_state_and_leaves_on_error_when_it_fails(tmp_path) -> None:
    ctl = _controller(tmp_path)
    ctl.state = S.DEGRADED
    with pytest.raises(RuntimeError, match="boom"), ctl._operation(Op.RESYNC):
        assert ctl.state is S.RESYNCING and ctl.query()["operation"] == "resync"
        raise RuntimeError("boom")
    assert ctl.state is S.DEGRADED and ctl.operation is None
    assert _changes(ctl) == [("degraded", "resyncing"), ("resyncing", "degraded")]
    assert ctl.events[-1]["data"]["why"] == "resync failed: boom"
    with ctl._operation(Op.RESYNC):
        ctl._set_state(S.RUNNING)
    assert ctl.state is S.RUNNING and ctl.query()["operation"] is None


def test_a_failed_promotion_goes_back_to_failed_over(tmp_path) -> None:
    ctl = _controller(tmp_path)
    ctl.state = S.FAILED_OVER
    primary, secondary = ctl.primary, ctl.secondary
    with pytest.raises(ControlError, match="cannot promote: the failover's winner .* does not "
                                           "answer"):
        ctl.promote(str(tmp_path / "new.qmp"), "nbd+unix:///replica?socket=/nowhere")
    assert ctl.state is S.FAILED_OVER
    assert (ctl.primary, ctl.secondary) == (primary, secondary)    # peers never swapped
    assert _changes(ctl) == [("failed-over", "promoting"), ("promoting", "failed-over")]


def test_an_operation_may_not_leave_a_state_outside_its_row(tmp_path) -> None:
    ctl = _controller(tmp_path)
    ctl.state = S.RUNNING
    with pytest.raises(AssertionError, match="checkpoint left failed-over, outside its row"), \
            ctl._operation(Op.CHECKPOINT):
        ctl._set_state(S.FAILED_OVER)


def test_the_state_changes_only_inside_an_operation(tmp_path) -> None:
    ctl = _controller(tmp_path)
    with pytest.raises(AssertionError, match="the state set to running outside an operation"):
        ctl._set_state(S.RUNNING)
    assert ctl.state is S.STARTING and not _changes(ctl)


def test_operations_do_not_nest(tmp_path) -> None:
    ctl = _controller(tmp_path)
    ctl.state = S.RUNNING
    with pytest.raises(AssertionError, match="checkpoint inside resync"), \
            ctl._operation(Op.RESYNC), ctl._operation(Op.CHECKPOINT):
        pass


def test_operator_commands_in_the_wrong_state_change_nothing(tmp_path) -> None:
    ctl = _controller(tmp_path)
    with pytest.raises(ControlError, match="cannot promote: the controller is starting.*"
                                           "controller-promote is for a pair that failed over"):
        ctl.promote(str(tmp_path / "n.qmp"), "nbd+unix:///replica?socket=/x")
    with pytest.raises(ControlError, match="cannot checkpoint: the controller is starting"):
        ctl.checkpoint()
    with pytest.raises(ControlError, match="cannot verify: the controller is starting.*a "
                                           "verify compares a protected pair"):
        ctl.verify()
    with pytest.raises(ControlError, match="cannot switchover: the controller is starting"):
        ctl.switchover("nbd+unix:///replica?socket=/a", "nbd+unix:///replica?socket=/b")
    assert ctl.state is S.STARTING and not _changes(ctl)
    ctl.state = S.FAILED_OVER          # what to do instead is a promotion, not a resync
    with pytest.raises(ControlError, match="cannot checkpoint: the controller is failed-over.*"
                                           "once its winner is promoted .controller-promote.$"):
        ctl.checkpoint()
    with pytest.raises(ControlError, match="cannot resync: the controller is failed-over.*"
                                           "after a failover, controller-promote the winner"):
        ctl.resync()
    assert ctl.state is S.FAILED_OVER and not _changes(ctl)


def test_the_same_node_twice_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="secondary: .* is the same node as --primary"):
        ControllerConfig(primary=str(tmp_path / "a.qmp"),
                         secondary=str(tmp_path / ".." / tmp_path.name / "a.qmp")).check()


def test_a_lost_node_is_one_line_then_a_reminder_then_one_line_back(tmp_path, caplog,
                                                                     monkeypatch) -> None:
    """Not a line per heartbeat: lost once, reminded at most every REMIND_EVERY."""
    import logging
    import time

    from repdisk.controller import peer as peermod
    monkeypatch.setattr(peermod, "REMIND_EVERY", 0.3)
    caplog.set_level(logging.WARNING, logger="repdisk.controller.peer")
    ctl = _controller(tmp_path)
    peer = ctl.secondary
    deadline = time.monotonic() + 0.5
    beats = 0
    while time.monotonic() < deadline:
        assert peer.beat() is None
        beats += 1
        time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records]
    assert beats > 10
    assert sum(" lost: " in m for m in lines) == 1
    assert 1 <= sum(" still lost (for " in m for m in lines) <= 2
    peer.seen({"instance": "x", "role": "secondary"})
    assert caplog.records[-1].getMessage().startswith(f"secondary node {peer.socket} answers "
                                                      "again after ")
    assert peer.info()["ok"] is True
