"""Which node commands each role answers: the table, row by row, on in-process ``Node``
objects over real disk files (no peer: every refusal comes before the link is used).

A command a role does not serve is refused with one ConfigError naming the key ``role``
and changes nothing: the node keeps its role, its state file and its exports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from repdisk.errors import ConfigError
from repdisk.node.config import PRIMARY, SECONDARY
from repdisk.node.node import Node
from repdisk.node.state import NodeState
from repdisk.replication.framework import ReplicationError
from tests.helpers.nodes import MiB, make_disk

FOR_PRIMARY = ("role: this command is for a primary node, and this one is a secondary: send "
               "it to the primary's control socket")
ALREADY_PRIMARY = "role: this node is already a primary"

#: command -> (how it is called, what a secondary answers, what a primary answers); None:
#: the role serves it (the call is not made here: it would need a peer).
TABLE: dict[str, tuple[Callable[[Node], Any], str | None, str | None]] = {
    "replication-resume": (lambda n: n.resume(), FOR_PRIMARY, None),
    "replication-resync": (lambda n: n.resync(), FOR_PRIMARY, None),
    "replication-mark-dirty": (lambda n: n.mark_dirty(None, [[0, 4096]]), FOR_PRIMARY, None),
    "replication-verify": (lambda n: n.verify(None, None, False), FOR_PRIMARY, None),
    "replication-fence": (lambda n: n.fence("test"), FOR_PRIMARY, None),
    "replication-demote": (lambda n: n.demote(), FOR_PRIMARY, None),
    "replication-promote": (lambda n: n.promote("nbd+unix:///replica?socket=/nowhere"),
                            None, ALREADY_PRIMARY),
}


@pytest.fixture
def nodes(tmp_path: Any) -> Iterator[dict[str, Node]]:
    made = {}
    for role in (SECONDARY, PRIMARY):
        keys = [("role", role), ("disk", make_disk(str(tmp_path / f"{role}.img"), MiB)),
                ("control", str(tmp_path / f"{role}.qmp"))]
        if role == PRIMARY:
            keys += [("secondary", f"nbd+unix:///replica?socket={tmp_path}/nowhere.sock"),
                     ("timeout", "200ms")]
        made[role] = Node.from_keys(keys)
    yield made
    for node in made.values():
        node.close()


REFUSED = [(role, command, refusal) for command, (_, *answers) in sorted(TABLE.items())
           for role, refusal in zip((SECONDARY, PRIMARY), answers, strict=True)
           if refusal is not None]


@pytest.mark.parametrize(("role", "command", "refusal"), REFUSED)
def test_a_command_for_the_other_role_is_refused_and_changes_nothing(
        nodes: dict[str, Node], role: str, command: str, refusal: str) -> None:
    call = TABLE[command][0]
    node = nodes[role]
    before = (node.query(), NodeState.load(node.cfg.state))
    with pytest.raises(ConfigError) as err:
        call(node)
    assert str(err.value) == refusal
    after = (node.query(), NodeState.load(node.cfg.state))
    assert after == before
    assert node.role == role


def test_both_roles_answer_the_shared_commands(nodes: dict[str, Node]) -> None:
    for role, node in nodes.items():
        assert node.query()["role"] == role
        assert node.heartbeat()["role"] == role
        assert node.allocation(None, 0, None) == []
        assert len(node.digests(None, 0, MiB, MiB)) == 1
        with pytest.raises(ReplicationError) as err:
            node.get_error()    # not started: both roles say so the same way
        assert str(err.value) == "disk0: replication is not running"
