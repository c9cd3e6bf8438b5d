"""A repdisk node: one nbdkit process serving the disks of one consistency group.

The node turns checked keys (:class:`~repdisk.config.NodeConfig`) into replicas,
registers each in the node's own :class:`~repdisk.replication.Registry` (so the
``*_all`` calls act on every disk of the group together), names their exports,
keeps the persisted epoch, and serves the control socket.  It holds no
replication logic of its own: every transition is the replicas'.

Exports: a primary serves each disk as ``NAME`` (the first one is the default
export).  A secondary serves ``replica/NAME`` (the primary writes here) and
``active/NAME`` (a secondary VM's view) for each disk, with ``replica`` and
``active`` naming the first disk and ``active`` the default export.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

from .config import PRIMARY, SECONDARY, NodeConfig
from .errors import BlockIOError, ConfigError, ForwardError, RepdiskError
from .images import BlockDevice, RawImage
from .primary import PrimaryReplica
from .replication import Registry, ReplicationMode
from .secondary import SecondaryReplica
from .state import NodeState

log = logging.getLogger(__name__)

Replica = Union[PrimaryReplica, SecondaryReplica]


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.mode = ReplicationMode(cfg.role)
        self.state = NodeState.load(cfg.state)
        self.registry = Registry()
        self.replicas: dict[str, Replica] = {}
        self.exports: dict[str, BlockDevice] = {}
        self._server: Any = None  # the QMP server, once serving
        for spec in cfg.disks:
            replica = self._open_replica(spec.name, spec.path)
            self.replicas[spec.name] = replica
            replica.register(self.registry)
        self._name_exports()

    # -- building -------------------------------------------------------------

    def _open_replica(self, name: str, path: str) -> Replica:
        try:
            if self.mode is ReplicationMode.SECONDARY:
                return SecondaryReplica.open(name, path, self.cfg.hidden, self.cfg.active,
                                             cluster_size=self.cfg.cluster_size, events=self.emit)
            suffix = f"/{name}" if len(self.cfg.disks) > 1 else ""
            return PrimaryReplica(name, RawImage.open(path), self.cfg.secondary,
                                  write_mode=self.cfg.write_mode, timeout=self.cfg.timeout,
                                  window=self.cfg.window, events=self.emit, export_suffix=suffix)
        except ConfigError:
            raise
        except (RepdiskError, OSError, ValueError) as err:
            raise ConfigError("disk", f"{path}: {err}") from err

    def _name_exports(self) -> None:
        if self.mode is ReplicationMode.PRIMARY:
            for name, rep in self.replicas.items():
                self.exports[name] = rep.view  # type: ignore[union-attr]
            self.default_export = self.cfg.disks[0].name
            return
        for i, (name, rep) in enumerate(self.replicas.items()):
            assert isinstance(rep, SecondaryReplica)
            for view in ("replica", "active"):
                self.exports[f"{view}/{name}"] = getattr(rep, view)
                if i == 0:
                    self.exports[view] = getattr(rep, view)
        self.default_export = "active"

    def probe_secondary(self) -> None:
        """Primary: check at start-up that the secondary answers with equal sizes."""
        for rep in self.replicas.values():
            if isinstance(rep, PrimaryReplica):
                try:
                    rep.probe()
                except (ForwardError, RepdiskError) as err:
                    raise ConfigError("secondary", f"{err}; start the secondary first, or fix "
                                                   "the URI") from err

    # -- serving ----------------------------------------------------------------

    def export(self, name: str) -> BlockDevice:
        dev = self.exports.get(name or self.default_export)
        if dev is None:
            import errno
            raise BlockIOError(errno.ENOENT, f"no export named {name!r}; this node serves "
                                             f"{', '.join(sorted(self.exports))}")
        return dev

    def list_exports(self) -> list[tuple[str, str]]:
        return [(name, self._describe(name)) for name in self.exports]

    def _describe(self, name: str) -> str:
        view, _, disk = name.partition("/")
        if self.mode is ReplicationMode.PRIMARY:
            return f"repdisk primary disk {name}"
        disk = disk or self.cfg.disks[0].name
        return (f"repdisk secondary disk {disk}: "
                + ("the primary writes here" if view == "replica" else "the secondary VM's view"))

    def serve_control(self) -> None:
        """Start the control socket (call after nbdkit forked: it starts threads)."""
        from . import control
        from .qmp import QMPServer
        server = QMPServer(control.node_commands(self), name=f"repdisk-{self.cfg.role}")
        server.serve_unix(self.cfg.control)
        self._server = server

    def emit(self, name: str, data: dict[str, Any]) -> None:
        if self._server is not None:
            self._server.emit(name, data)

    # -- replication: each maps to one *_all call of the node's registry ---------

    def start(self, mode: ReplicationMode, epoch: Optional[int] = None) -> None:
        self.state.check_start(self.cfg.role, epoch)
        self.registry.start_all(mode)
        if epoch is not None and epoch > self.state.epoch:
            self.state.failed_over = False
            self.state.epoch = epoch
        self.state.role = self.cfg.role
        self.state.save(self.cfg.state)

    def checkpoint(self) -> None:
        self.registry.do_checkpoint_all()

    def resume(self) -> None:
        """Primary: end the checkpoint hold (the second half of a checkpoint)."""
        for rep in self._primaries():
            rep.resume()

    def get_error(self) -> None:
        self.registry.get_error_all()

    def stop(self, failover: bool) -> None:
        if failover and self.mode is ReplicationMode.SECONDARY:
            self._failover()
        else:
            self.registry.stop_all(failover)

    def _failover(self) -> None:
        """All disks of the group fail over, or none: refuse before committing any."""
        for rep in self.replicas.values():
            rep.check_failover()  # type: ignore[union-attr]
        self.registry.stop_all(True)
        self.state.epoch += 1
        self.state.failed_over = True
        self.state.save(self.cfg.state)
        self.emit("EPOCH_CHANGED", {"epoch": self.state.epoch})

    def resync(self) -> int:
        return sum(rep.resync() for rep in self._primaries())

    def _primaries(self) -> list[PrimaryReplica]:
        if self.mode is not ReplicationMode.PRIMARY:
            raise ConfigError("role", "this command is for a primary node")
        return [r for r in self.replicas.values() if isinstance(r, PrimaryReplica)]

    def query(self) -> dict[str, Any]:
        return {
            "role": self.cfg.role,
            "epoch": self.state.epoch,
            "failed-over": self.state.failed_over,
            "default-export": self.default_export,
            "exports": sorted(self.exports),
            "disks": [rep.query() for rep in self.replicas.values()],
        }

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for rep in self.replicas.values():
            rep.close()

    @classmethod
    def from_keys(cls, pairs: list[tuple[str, str]]) -> "Node":
        return cls(NodeConfig.from_keys(pairs))


__all__ = ["Node", "PRIMARY", "SECONDARY"]
