"""A Corosync + Pacemaker cluster (helpers/cluster.py) running the README's "Running under
Pacemaker" configuration word for word, seen through the nodes' own files, and a guest that
writes through whichever node is primary."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import psutil
import pytest

from repdisk.errors import RepdiskError
from repdisk.qmp.client import QMPClient
from tests.helpers.cluster import Cluster, ClusterNode
from tests.helpers.netns import Net, unavailable
from tests.helpers.nodes import MiB

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = Path(ROOT, "README.md").read_text()

SIZE = 32 * MiB
DISK = "/var/lib/repdisk/disk.img"
CONTROL = "/var/lib/repdisk/repdisk.qmp"
RUN = "/var/lib/repdisk/run"
NBD_PORT = 10809
WRITER_AREA = 16 * MiB      # the writer thread's blocks: [16 MiB, 32 MiB), each used once


def readme_block(marker: str) -> str:
    part = README.split(f"<!-- pacemaker:{marker} -->", 1)[1]
    return part.split("```sh", 1)[1].split("```", 1)[0]


@dataclass
class Pair:
    """A cluster running the README's configuration, seen through the nodes' own files."""
    cluster: Cluster
    folder: str
    pair: list[ClusterNode] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.cluster.note(what)

    def query(self, node: ClusterNode) -> dict | None:
        if not node.up:
            return None
        try:
            client = QMPClient(timeout=5).connect(node.path(CONTROL))
        except (OSError, RepdiskError):
            return None
        try:
            return client.execute("query-replication", {})
        except Exception:
            return None
        finally:
            client.close()

    def roles(self) -> dict[str, str]:
        out = {}
        for n in self.pair:
            q = self.query(n)
            if q is not None:
                out[n.name] = q["role"]
        return out

    def healthy(self) -> tuple[ClusterNode, ClusterNode] | None:
        """(primary, secondary) once the pair runs: a primary replicating and a consistent
        secondary of its epoch, the guest resource on the primary's node."""
        qs = {n.name: self.query(n) for n in self.pair}
        if any(q is None for q in qs.values()):
            return None
        prim = [n for n in self.pair if qs[n.name]["role"] == "primary"]
        if len(prim) != 1:
            return None
        p = prim[0]
        s = next(n for n in self.pair if n is not p)
        qp, qs_ = qs[p.name], qs[s.name]
        if {d["stage"] for d in qp["disks"]} != {"running"} or qp["disks"][0]["degraded"]:
            return None
        if {d["stage"] for d in qs_["disks"]} != {"running"} or \
                not all(d["consistent"] for d in qs_["disks"]) or qs_["epoch"] != qp["epoch"]:
            return None
        where = p.run(["crm_resource", "--locate", "--resource", "guest"], check=False).stdout
        if f"running on: {p.name}" not in where:
            return None
        return p, s

    def wait_healthy(self, timeout: float = 90) -> tuple[ClusterNode, ClusterNode]:
        got: list[tuple[ClusterNode, ClusterNode]] = []

        def ok() -> bool:
            h = self.healthy()
            if h:
                got.append(h)
            return bool(h)
        self.cluster.wait(ok, timeout, "a primary with a consistent secondary")
        return got[-1]

    def checkpoints(self, secondary: ClusterNode) -> int:
        q = self.query(secondary)
        return -1 if q is None else q["disks"][0]["counters"]["checkpoints"]

    def wait_checkpoints(self, secondary: ClusterNode, n: int = 2, timeout: float = 30) -> None:
        """Wait for ``n`` more checkpoints of the secondary (the second began after now)."""
        c0 = self.checkpoints(secondary)
        self.cluster.wait(lambda: self.checkpoints(secondary) >= c0 + n, timeout,
                          f"{n} checkpoints on {secondary.name}")

    def disk(self, node: ClusterNode) -> bytes:
        with open(node.path(DISK), "rb") as f:
            return f.read()

    def guest(self, node: ClusterNode) -> nbd.NBD:
        """An NBD client of the node's default export, from inside its namespace."""
        def connect() -> nbd.NBD:
            h = nbd.NBD()
            h.connect_uri(f"nbd://{node.address}:{NBD_PORT}/")
            return h
        return node.host.call(connect)

    def write(self, node: ClusterNode, data: bytes, offset: int) -> None:
        h = self.guest(node)
        try:
            h.pwrite(data, offset)
            h.flush()
        finally:
            h.shutdown()

    def checkpointer(self, node: ClusterNode) -> psutil.Process:
        with open(node.path(f"{RUN}/rd.ckpt.pid")) as f:
            return psutil.Process(int(f.read()))

    def serves_writes(self, node: ClusterNode, offset: int, data: bytes) -> bool:
        """A write acknowledged by ``node`` as the primary (a secondary's default export
        is its secondary VM's view, which would take writes too)."""
        q = self.query(node)
        if q is None or q["role"] != "primary":
            return False
        try:
            self.write(node, data, offset)
            return True
        except (nbd.Error, RuntimeError, OSError):
            return False

    def wait_serving(self, node: ClusterNode, offset: int, data: bytes,
                     timeout: float = 60) -> float:
        """Poll until a write through ``node`` is acknowledged; the time it took."""
        took = self.cluster.wait(lambda: self.serves_writes(node, offset, data), timeout,
                                 f"{node.name} serving writes")
        self.note(f"first write served by {node.name}")
        return took


class Writer:
    """A guest that writes one fresh 4 KiB block after another through whichever node is
    primary, reconnecting when refused; remembers every acknowledged write and when."""

    def __init__(self, pair: Pair, node: ClusterNode, seed: int, follow: bool = True) -> None:
        self.pair, self.node, self.follow = pair, node, follow
        self.rng = random.Random(seed)
        self.acked: list[tuple[float, str, int, bytes]] = []   # (time, node, offset, data)
        self.next = 0
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        self.thread.start()
        return self

    def _run(self) -> None:
        h: nbd.NBD | None = None
        node = self.node
        while not self.stop_ev.is_set() and self.next < WRITER_AREA // 4096:
            if h is None:
                try:
                    h = self.pair.guest(node)
                except Exception:
                    h = None
                    if self.follow:
                        node = self._primary() or node
                    time.sleep(0.05)
                    continue
            offset = WRITER_AREA + self.next * 4096
            self.next += 1
            data = self.rng.randbytes(4096)
            try:
                h.pwrite(data, offset)
            except nbd.Error:
                with contextlib.suppress(nbd.Error):
                    h.shutdown()
                h = None
                if self.follow:
                    node = self._primary() or node
                time.sleep(0.01)
                continue
            self.acked.append((time.time(), node.name, offset, data))
            time.sleep(0.002)
        if h is not None:
            with contextlib.suppress(nbd.Error):
                h.shutdown()

    def _primary(self) -> ClusterNode | None:
        roles = self.pair.roles()
        return next((n for n in self.pair.pair if roles.get(n.name) == "primary"), None)

    def stop(self) -> None:
        self.stop_ev.set()
        self.thread.join(timeout=30)


def make_pair(n: int, token_ms: int | None = None,
              make_disk: Callable[[str], None] | None = None) -> Iterator[Pair]:
    """A cluster of ``n`` nodes running the README's configuration; each pair node's disk
    is SIZE of zeros, or what ``make_disk(path)`` writes there."""
    why = unavailable()
    if why:
        pytest.skip(why)
    for tool in ("corosync", "pacemakerd", "cibadmin", "crm_resource"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: make setup installs it (scripts/setup.sh)")
    folder = tempfile.mkdtemp(prefix="rdpm-")
    with Net() as net:
        cluster = Cluster(net, folder, n, token_ms=token_ms)
        pair = Pair(cluster, folder, cluster.nodes[:2])
        failed = True
        try:
            for node in pair.pair:
                if make_disk is not None:
                    make_disk(node.path(DISK))
                    continue
                with open(node.path(DISK), "wb") as f:
                    f.truncate(SIZE)
            cluster.boot()
            n1 = cluster.nodes[0]
            n1.run(["sh", "-ec", readme_block("pair")])
            if n == 3:
                n1.run(["sh", "-ec", readme_block("third-node")])
            cluster.note("configured (README)")
            yield pair
            failed = False
        finally:
            cluster.close()
            if not failed and os.environ.get("REPDISK_KEEP_CLUSTER") is None:
                shutil.rmtree(folder, ignore_errors=True)

