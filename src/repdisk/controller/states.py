"""The controller's state machine: its states, its operations, and which runs when.

The controller's state is a :class:`ControllerState`, written only by
:meth:`StateMachine._set_state` (which logs and emits ``CONTROLLER_STATE_CHANGED``), and
only while an operation runs.  Every operation is an :class:`Operation` whose row in
:data:`TRANSITIONS` says the states it may run in, the state shown while it runs and the
states it may leave; :func:`gate` is the only check, and :meth:`StateMachine._operation`
runs one operation at a time under one lock (a second one waits, then is gated against
the state the first left).  A failed operation leaves its ``on_error`` state.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from repdisk.errors import ControlError

__all__ = ["TRANSITIONS", "ControllerState", "Operation", "Rule", "StateMachine", "gate"]


class ControllerState(enum.StrEnum):
    STARTING = "starting"        # the pair is not adopted yet, or not started: adopt, bring up
    RUNNING = "running"          # protected: a checkpoint every interval
    DEGRADED = "degraded"        # the primary serves alone: re-protection retried with back-off
    RESYNCING = "resyncing"      # re-protection under way: start, sync, copy, checkpoint
    FAILED_OVER = "failed-over"  # the secondary won: waits for controller-promote
    PROMOTING = "promoting"      # controller-promote under way
    FENCED = "fenced"            # the primary is fenced and no winner to promote: an operator
    STOPPED = "stopped"          # the controller closed


class Operation(enum.Enum):
    ADOPT = "adopt"              # learn roles, epoch and state from the nodes (changes nothing)
    START = "start"              # bring up a pair that is not started: sync, start, checkpoint
    HEARTBEAT = "heartbeat"      # one round: look at both nodes, decide the next operation
    CHECKPOINT = "checkpoint"    # one pair checkpoint
    RESYNC = "resync"            # re-protect: start what is not started, copy, checkpoint
    FAILOVER = "failover"        # the secondary takes over (a reachable primary fenced first)
    FENCE = "fence"              # fence the failover's loser when it answers
    PROMOTE = "promote"          # the winner becomes the primary of a new pair
    VERIFY = "verify"            # compare both disks (repair: copy what differs)
    SWITCHOVER = "switchover"    # a planned role swap: nothing lost, nothing copied
    STOP = "stop"                # close the controller


@dataclass(frozen=True)
class Rule:
    """One operation's row: where it may run and what it may leave behind."""

    runs_in: frozenset[ControllerState]
    #: States it may end in on success; None stands for the state it ran in.
    leaves: frozenset[ControllerState | None]
    #: The state shown while it runs (None: unchanged).
    during: ControllerState | None = None
    #: The state a failure leaves (None: the state it ran in).
    on_error: ControllerState | None = None


_S = ControllerState


#: The controller's transition table.  Adding an operation (switchover, verify) is one row
#: here, one function that runs its body under ``self._operation(op)``, and one row in
#: tests/test_controller_states.py and docs/DESIGN.md.
TRANSITIONS: dict[Operation, Rule] = {
    Operation.ADOPT: Rule(frozenset({_S.STARTING, _S.FAILED_OVER, _S.FENCED}),
                          frozenset({_S.STARTING, _S.RUNNING, _S.DEGRADED, _S.FAILED_OVER,
                                     _S.FENCED})),
    Operation.START: Rule(frozenset({_S.STARTING}), frozenset({_S.RUNNING})),
    Operation.HEARTBEAT: Rule(frozenset({_S.STARTING, _S.RUNNING, _S.DEGRADED, _S.FAILED_OVER,
                                         _S.FENCED}),
                              frozenset({None, _S.DEGRADED, _S.FENCED, _S.FAILED_OVER})),
    Operation.CHECKPOINT: Rule(frozenset({_S.RUNNING}), frozenset({_S.RUNNING})),
    Operation.RESYNC: Rule(frozenset({_S.RUNNING, _S.DEGRADED}), frozenset({_S.RUNNING}),
                           during=_S.RESYNCING, on_error=_S.DEGRADED),
    Operation.FAILOVER: Rule(frozenset({_S.RUNNING, _S.DEGRADED}),
                             frozenset({_S.FAILED_OVER})),
    Operation.FENCE: Rule(frozenset({_S.FAILED_OVER}), frozenset({_S.FAILED_OVER})),
    Operation.PROMOTE: Rule(frozenset({_S.FAILED_OVER}), frozenset({_S.RUNNING, _S.DEGRADED}),
                            during=_S.PROMOTING, on_error=_S.FAILED_OVER),
    Operation.VERIFY: Rule(frozenset({_S.RUNNING}), frozenset({_S.RUNNING})),
    Operation.SWITCHOVER: Rule(frozenset({_S.RUNNING}), frozenset({_S.RUNNING})),
    Operation.STOP: Rule(frozenset(_S), frozenset({_S.STOPPED})),
}


#: What to do instead, when an operator's command arrives in the wrong state.
_HINTS = {
    Operation.PROMOTE: "controller-promote is for a pair that failed over",
    Operation.CHECKPOINT: "a checkpoint needs a protected pair; the controller re-protects "
                          "a degraded pair by itself (or: controller-resync), and a failed-over "
                          "one once its winner is promoted (controller-promote)",
    Operation.RESYNC: "a resync needs a pair that replicates; after a failover, "
                      "controller-promote the winner (it copies what the new secondary lacks)",
    Operation.FAILOVER: "a failover needs a pair that replicates",
    Operation.VERIFY: "a verify compares a protected pair",
    Operation.SWITCHOVER: "a switchover needs a protected pair (running)",
}


def gate(op: Operation, state: ControllerState) -> Rule:
    """The row of ``op`` if it may run in ``state``; else a ControlError saying why.

    The only check of which operation runs when: every operation calls it first."""
    rule = TRANSITIONS[op]
    if state not in rule.runs_in:
        allowed = ", ".join(sorted(s.value for s in rule.runs_in))
        hint = f"; {_HINTS[op]}" if op in _HINTS else ""
        raise ControlError(f"cannot {op.value}: the controller is {state.value} "
                           f"({op.value} runs in: {allowed}){hint}")
    return rule


class StateMachine:
    """The controller's state and the operation under way (the base of ``Controller``).

    ``state`` is written only by :meth:`_set_state`, inside :meth:`_operation`; the
    subclass supplies :meth:`_event`, through which every change is logged and sent."""

    def __init__(self) -> None:
        self.state = ControllerState.STARTING
        self.operation: Operation | None = None   # the operation under way
        # Serializes operations (_operation: heartbeat rounds and control commands).
        self._lock = threading.RLock()
        self._generation = 0                     # operations ended: a round older is stale

    def _event(self, name: str, level: int = logging.INFO, /, **data: Any) -> None:
        """Log, remember and send one event (the subclass says where)."""
        raise NotImplementedError

    def _set_state(self, state: ControllerState, why: str = "") -> None:
        """The only writer of ``state``: logs and emits CONTROLLER_STATE_CHANGED.

        Only an operation changes the state: called outside one, it raises AssertionError
        (where an operation may leave the state is checked when it ends)."""
        if self.operation is None:
            raise AssertionError(f"the state set to {state.value} outside an operation")
        if state is not self.state:
            old, self.state = self.state, state
            self._event("CONTROLLER_STATE_CHANGED", **{"from": old.value, "to": state.value,
                                                       "why": why})

    @contextmanager
    def _operation(self, op: Operation) -> Iterator[None]:
        """Run one operation: wait for the one under way, gate, run, check where it ended.

        Raises the gate's ControlError in a wrong state; a failure of the body leaves the
        row's ``on_error`` state (the state it began in, if none) and is raised."""
        with self._lock:
            if self.operation is not None:
                raise AssertionError(f"{op.value} inside {self.operation.value}: operations "
                                     "do not nest")
            rule = gate(op, self.state)
            began = self.state
            self.operation = op
            try:
                if rule.during is not None:
                    self._set_state(rule.during, op.value)
                yield
            except BaseException as err:
                self._set_state(rule.on_error or began, f"{op.value} failed: {err}")
                raise
            finally:
                self.operation = None
                self._generation += 1
            allowed = {began if s is None else s for s in rule.leaves}
            if self.state not in allowed:
                raise AssertionError(f"{op.value} left {self.state.value}, outside its row")
