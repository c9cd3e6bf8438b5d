"""What a node's roles share: its keys, its persisted state, its exports and its events.

A :class:`~repdisk.node.node.Node` holds one :class:`NodeContext` for its whole life and
hands it to each role it takes (:mod:`repdisk.node.primaryrole`,
:mod:`repdisk.node.secondaryrole`); a role switch replaces the role, never the context.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from repdisk.block.device import BlockDevice
from repdisk.block.overlay import Overlay
from repdisk.block.rawimage import RawImage
from repdisk.errors import BlockIOError, ConfigError
from repdisk.node.config import NodeConfig
from repdisk.node.exports import Admission
from repdisk.node.state import NodeState
from repdisk.qmp.server import QMPServer
from repdisk.replication import sessions


class NodeContext:
    """The node's checked keys, state file, export table, guest-write admission and event
    sink; every role reads and changes them through this object."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        #: This process (a restart is a new one): in ``query-replication`` and in every
        #: export's description, so a peer or the controller can tell nodes apart.
        self.instance = uuid.uuid4().hex
        self.state = NodeState.load(cfg.state)
        # Guards every change and save of ``state``: control connections and nbdkit's
        # threads (a seal, a writer session voiding one) change it concurrently.
        self._state_lock = threading.Lock()
        self.admission = Admission()
        #: Export name -> the device nbdkit serves under it (the plugin's table).
        self.exports: dict[str, BlockDevice] = {}
        #: Secondary: the session fence of each replica export name (aliases share one).
        self.fences: dict[str, sessions.SessionFence] = {}
        self.default_export = ""
        self.server: QMPServer | None = None  # the control server, once serving

    def fence(self, disk: str) -> sessions.SessionFence | None:
        """The session fence of ``disk``'s replica export (None on a primary)."""
        return self.fences.get(f"replica/{disk}")

    @contextlib.contextmanager
    def changing_state(self) -> Iterator[NodeState]:
        """Change the state and save it durably, under the state's lock; nothing is saved
        if the block raises."""
        with self._state_lock:
            yield self.state
            self.state.save(self.cfg.state)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Send an event to the control socket's clients (dropped before it serves)."""
        if self.server is not None:
            self.server.emit(name, data)

    @staticmethod
    def lock(*files: RawImage | Overlay) -> None:
        """Mark every file a replica writes in use, as QEMU does (imagelock.lock_image): a
        second node, or a QEMU tool opening one for writing, is refused, naming this one."""
        try:
            for f in files:
                f.lock()
        except BlockIOError as err:
            raise ConfigError("disk", str(err)) from err
