"""What a node does in each role, shared part: its replicas and their registry.

A node holds one role object at a time (:class:`~repdisk.node.primaryrole.PrimaryRole` or
:class:`~repdisk.node.secondaryrole.SecondaryRole`) and replaces it on promotion and
demotion; the role owns the replicas of that role, the node owns what outlives a switch
(:class:`~repdisk.node.context.NodeContext`).  The defaults here are what a role does
not take part in: a secondary has no link to probe, a primary never ignores a request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from repdisk.block.rawimage import RawImage
from repdisk.errors import ConfigError
from repdisk.node.context import NodeContext
from repdisk.replication import nbdclient
from repdisk.replication.framework import Registry, ReplicationMode, ReplicationState
from repdisk.replication.stage import Stage

_DESCRIBED = re.compile(r"^repdisk (?:primary|secondary) disk \S+ in epoch (\d+) "
                       r"of node ([0-9a-f]+)( \(its writer\))?")


def describe_disk(role: str, disk: str, ctx: NodeContext) -> str:
    """The start of an export's NBD description: the node's role, the disk, the node's
    epoch and process, which peers read (:func:`described`): a restarting primary its
    secondary's epoch, a node being promoted whether a URI leads back to itself."""
    state = ctx.state
    # A failover commit under way already refuses the old primary: name the epoch it makes.
    epoch = state.epoch if state.failover_commit is None else state.failover_commit + 1
    writer = role == "primary" or state.failed_over or state.failover_commit is not None
    return (f"repdisk {role} disk {disk} in epoch {epoch} of node {ctx.instance}"
            + (" (its writer)" if writer else ""))


def newer_writer(descriptions: Iterable[str], epoch: int) -> int | None:
    """The newest epoch above ``epoch`` whose writer one of these descriptions names (a
    primary, or a secondary that won or is winning a failover), or None.  A secondary
    merely started in a newer epoch (an ``epoch=`` typo) writes nothing in it."""
    found = [int(m.group(1)) for m in map(_DESCRIBED.match, descriptions)
             if m is not None and m.group(3) and int(m.group(1)) > epoch]
    return max(found, default=None)


def newer_writer_at(uri: str, epoch: int, timeout: float) -> int | None:
    """:func:`newer_writer` of the exports the node at ``uri`` lists, asked for at most
    ``timeout`` (and 2 s: a host that is down must not hold anything up); None if it does
    not answer."""
    listed = nbdclient.list_exports(uri, min(timeout, 2.0)) or {}
    return newer_writer(listed.values(), epoch)


def serving_nodes(listed: Mapping[str, str]) -> set[str]:
    """The node instances that the exports ``listed`` (name -> description, as
    ``nbdclient.list_exports`` gives them) describe: the node serving them."""
    return {d[1] for d in map(described, listed.values()) if d is not None}


def described(description: str) -> tuple[int, str] | None:
    """The (epoch, node instance) a :func:`describe_disk` description names (None: not
    one of ours)."""
    m = _DESCRIBED.match(description)
    return (int(m.group(1)), m.group(2)) if m else None


class Replica(Protocol):
    """What the node needs of every replica, primary or secondary."""

    name: str
    disk: RawImage

    @property
    def stage(self) -> Stage: ...

    def register(self, registry: Registry) -> ReplicationState: ...

    def query(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


R = TypeVar("R", bound=Replica)


class Role(Generic[R]):
    """The replicas of one role, registered together (the ``*_all`` calls act on the whole
    consistency group)."""

    name: str                 # config.PRIMARY or config.SECONDARY
    mode: ReplicationMode

    def __init__(self, ctx: NodeContext, replicas: dict[str, R]) -> None:
        self.ctx = ctx
        self.replicas = replicas
        self.registry = Registry()
        for rep in replicas.values():
            rep.register(self.registry)

    def image(self, disk: str | None) -> RawImage:
        """The disk named ``disk`` (None: the first); ConfigError if there is none."""
        name = disk or self.ctx.cfg.disks[0].name
        rep = self.replicas.get(name)
        if rep is None:
            raise ConfigError("disk", f"no disk named {name!r}; this node has "
                                      f"{', '.join(self.replicas)}")
        return rep.disk

    def replication_over(self) -> str:
        """Why replication requests are ignored here ("" if they are not)."""
        return ""

    def before_start(self, epoch: int | None) -> None:
        """Called by ``replication-start`` once the state allowed it, before the replicas
        start."""

    def stop(self, failover: bool) -> None:
        self.registry.stop_all(failover)

    def probe_secondary(self) -> None:
        """At start-up, before serving: check the link to the peer, if the role has one."""

    def serving(self) -> None:
        """The control socket serves (nbdkit has forked): start the role's threads."""

    def contact(self) -> None:
        """The controller was heard from."""

    def check_checkpoint(self) -> None:
        """Raise (changing nothing) if a checkpoint may not be taken now."""

    def checkpointed(self) -> None:
        """Every disk took a checkpoint (replication-do-checkpoint succeeded)."""

    def isolation(self) -> dict[str, Any] | None:
        """The isolation guard's report, if the role has one."""
        return None

    def link_timeout(self) -> float | None:
        """How long the peer may take to answer, if the role waits for one."""
        return None

    def close(self) -> None:
        for rep in self.replicas.values():
            rep.close()
