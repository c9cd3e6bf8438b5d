"""What a primary disk is built with (:class:`PrimarySettings`): a module of its own so
that a reader of the node's keys (``repdisk.node.config``, and through it the OCF agent
and the CLI) does not load the data path to name them."""

from __future__ import annotations

from dataclasses import dataclass

from repdisk.replication.resyncrate import ResyncRate


@dataclass(frozen=True)
class PrimarySettings:
    """What a primary disk is built with, each one required: their defaults live in the
    node's key table alone (``repdisk.node.config.primary_settings`` reads them, for the
    node and for library users such as tests and bench/).

    ``write_mode``: "sync" or "async"; ``timeout``: seconds the secondary may take;
    ``window``: most requests in flight to it; ``max_lag``: async, most bytes unsent;
    ``resync_rate``: how fast a resync copies.
    """

    write_mode: str
    timeout: float
    window: int
    max_lag: int
    resync_rate: ResyncRate
