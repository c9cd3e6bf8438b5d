"""Three hosts on one machine: primary, secondary and controller, each in its own network
namespace, with every link over TCP and TLS (NBD with a PSK, control with x509 client
certificates), and what cuts of those links do.

    pri 10.213.1.1 ---- 10.213.1.2 sec      replication (NBD, TLS PSK)
    pri 10.213.2.1 ---- 10.213.2.2 ctl      primary's control port (QMP, TLS x509)
    sec 10.213.3.1 ---- 10.213.3.2 ctl      secondary's control port (QMP, TLS x509)

The controller is ``repdisk controller`` run inside "ctl"; it reaches the nodes only by
``HOST:PORT`` with its client certificate.  The test watches through Unix sockets (the
controller's and the nodes' 0600 control sockets, the primary's guest socket): a path
reaches into a namespace without any network traffic.  Every address exists only inside
the namespaces the test made (netns.py: no default route).

The first test needs no namespace: control over TCP on loopback, node and controller,
who is refused and that it is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nbd
import pytest

from repdisk import tls
from repdisk.cli import main as cli
from repdisk.cli import nodeproc
from repdisk.cli.status import status_lines
from repdisk.controller.config import ControllerConfig
from repdisk.controller.controller import Controller
from repdisk.errors import ConfigError, ControlError
from repdisk.node.config import NodeConfig
from repdisk.qmp.client import QMPClient, connect
from repdisk.tls import TLSSpec
from tests.helpers.controller import Writer, file_bytes, wait_for
from tests.helpers.netns import Host, Link, Net
from tests.helpers.nodes import MiB, NodeProc, Nodes, free_port, make_disk, start_node

pytestmark = pytest.mark.timeout(60)

SIZE = 8 * MiB
NBD_PORT = 10809
CONTROL_PORT = 7000
# The failure matrix's timing rules, short: a cut-off primary holds its writes after
# ISOLATION, a hung link is given up after TIMEOUT, both before the controller fails over.
TIMEOUT, ISOLATION = "0.5s", "0.6s"
HEARTBEAT, HEARTBEAT_TIMEOUT = "0.1s", "1.2s"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The pair's CA (a certificate naming every address used) and another CA."""
    d = tmp_path_factory.mktemp("pki")
    hosts = ["127.0.0.1", *(f"10.213.{n}.{h}" for n in (1, 2, 3) for h in (1, 2))]
    out = {"ca": str(d / "ca"), "other": str(d / "other")}
    tls.make_ca(out["ca"], hosts)
    tls.make_ca(out["other"], hosts)
    return out


# -- control over TCP on loopback: node, controller, repdisk ctl -----------------------------

def test_control_ports_of_node_and_controller_refuse_clients_without_certificates(
        nodes: Nodes, ca: dict[str, str], capsys: Any, caplog: Any) -> None:
    """A node's control-tcp and a controller's --control-tcp serve `repdisk ctl HOST:PORT
    --tls DIR`; a client without a certificate, or with another CA's, is refused before any
    command and the refusal is in the server's log; the Unix sockets stay 0600."""
    disk = make_disk(os.path.join(nodes.folder, "s.img"), MiB)
    port = free_port()
    sec = nodes.secondary(disk, control_tcp=f"127.0.0.1:{port}",
                          control_tls=f"x509:{ca['ca']}")
    address = f"127.0.0.1:{port}"
    wait_for(lambda: _answers(address, ca["ca"]), 10, "the node's control port")
    assert cli.main(["ctl", address, "query-replication", "--json", "--tls", ca["ca"]]) == 0
    assert '"role": "secondary"' in capsys.readouterr().out
    assert cli.main(["ctl", address, "query-replication"]) == 1           # TCP needs --tls
    assert "give --tls DIR" in capsys.readouterr().err
    for client in _bad_clients(ca):
        with pytest.raises(ControlError):
            QMPClient(timeout=5).connect(address, timeout=5, tls=client).execute(
                "replication-start", mode="secondary")
    wait_for(lambda: sec.log_text().count("refused control client") >= 2, 5, "refusals logged")
    assert "TLS handshake failed" in sec.log_text()
    assert sec.ctl("query-replication")["disks"][0]["stage"] == "none"    # nothing ran
    assert stat.S_IMODE(os.stat(sec.control).st_mode) == 0o600
    # The controller: its own TCP port, and the node reached by HOST:PORT with --tls.
    caplog.set_level(logging.INFO, logger="repdisk.qmp.tlsrelay")
    ctl_port = free_port()
    ctl = Controller(ControllerConfig(primary=f"127.0.0.1:{free_port()}", secondary=address,
                                      tls=ca["ca"],
                                      control=os.path.join(nodes.folder, "ctl.qmp"),
                                      control_tcp=("127.0.0.1", ctl_port),
                                      control_tls=ca["ca"]))
    try:
        assert ctl.secondary.query()["role"] == "secondary"               # over TLS
        lines = status_lines(f"127.0.0.1:{ctl_port}", ca["ca"])
        assert lines[0].startswith("controller starting")
        with pytest.raises(ControlError):
            QMPClient(timeout=5).connect(("127.0.0.1", ctl_port), timeout=5,
                                         tls=_bad_clients(ca)[0]).execute("query-controller")
        wait_for(lambda: "refused control client" in caplog.text, 5, "controller refusal")
        assert stat.S_IMODE(os.stat(os.path.join(nodes.folder, "ctl.qmp")).st_mode) == 0o600
    finally:
        ctl.close()


def test_plain_tcp_control_needs_insecure_loopback_included(ca: dict[str, str],
                                                            tmp_path: Any) -> None:
    disk = make_disk(str(tmp_path / "d.img"), MiB)
    base = [("role", "secondary"), ("disk", disk), ("control", str(tmp_path / "c.qmp"))]
    with pytest.raises(ConfigError, match="control-tcp: .*any local user.*insecure"):
        NodeConfig.from_keys(base + [("control-tcp", "127.0.0.1:7000")])
    cfg = NodeConfig.from_keys(base + [("control-tcp", "127.0.0.1:7000"), ("insecure", "yes")])
    assert cfg.control_tcp == ("127.0.0.1", 7000) and cfg.control_tls is None
    with pytest.raises(ConfigError, match="control-tls: is for control-tcp"):
        NodeConfig.from_keys(base + [("control-tls", f"x509:{ca['ca']}")])
    with pytest.raises(ConfigError, match="control-tls: .*not a PSK"):
        NodeConfig.from_keys(base + [("control-tcp", "127.0.0.1:7000"),
                                     ("control-tls", f"psk:{tmp_path}/k.psk")])
    with pytest.raises(ConfigError, match="control-tcp: cannot parse 'nowhere'"):
        NodeConfig.from_keys(base + [("control-tcp", "nowhere")])
    with pytest.raises(ConfigError, match="primary: 127.0.0.1:7000 is a TCP control port"):
        ControllerConfig(primary="127.0.0.1:7000", secondary="s.qmp").check()


def _answers(address: str, certs: str) -> bool:
    try:
        connect(address, certs, timeout=2, connect_timeout=2).close()
        return True
    except ControlError:
        return False


def _bad_clients(ca: dict[str, str]) -> list[ssl.SSLContext]:
    """A client without a certificate and one with another CA's certificate."""
    nocert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    nocert.load_verify_locations(os.path.join(ca["ca"], "ca-cert.pem"))
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    other.load_verify_locations(os.path.join(ca["ca"], "ca-cert.pem"))
    other.load_cert_chain(os.path.join(ca["other"], "client-cert.pem"),
                          os.path.join(ca["other"], "client-key.pem"))
    return [nocert, other]


# -- three namespaces ------------------------------------------------------------------------

@dataclass
class Trio:
    """Primary, secondary and controller on their own hosts, and the links between them."""
    nodes: Nodes
    hosts: dict[str, Host]
    pri_sec: Link
    pri_ctl: Link
    sec_ctl: Link
    psk: str
    certs: str
    pri: NodeProc
    sec: NodeProc
    control: str                               # the controller's Unix control socket
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ctl(self, command: str, **args: Any) -> Any:
        with QMPClient(timeout=30).connect(self.control) as c:
            return c.execute(command, args)

    def query(self) -> dict[str, Any]:
        return self.ctl("query-controller")

    def wait_state(self, state: str, timeout: float = 10.0) -> dict[str, Any]:
        wait_for(lambda: self.query()["state"] == state, timeout, f"controller {state}")
        return self.query()

    def nbd_uri(self, address: str, export: str) -> str:
        """A TLS URI of a node's NBD export (reachable from inside a namespace only)."""
        return TLSSpec("psk", self.psk).client_uri("uri", f"nbd://{address}:{NBD_PORT}/{export}")

    def start_controller(self) -> None:
        folder = self.nodes.folder
        cmd = [sys.executable, "-m", "repdisk.cli.main", "controller",
               "--primary", f"{self.pri_ctl.addr_a}:{CONTROL_PORT}",
               "--secondary", f"{self.sec_ctl.addr_a}:{CONTROL_PORT}", "--tls", self.certs,
               "--control", self.control, "--interval", "0.5s", "--heartbeat", HEARTBEAT,
               "--heartbeat-timeout", HEARTBEAT_TIMEOUT, "--log", os.path.join(folder, "ctl.log")]
        self.procs.append(subprocess.Popen(self.hosts["ctl"].cmd(cmd), stdin=subprocess.DEVNULL))
        wait_for(lambda: os.path.exists(self.control), 20, "the controller's socket")

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.nodes.close()        # every process out of the namespaces before they go


@pytest.fixture
def trio(net: Net, nodes: Nodes, ca: dict[str, str]) -> Iterator[Trio]:
    """The pair on its hosts, started and checkpointed by a controller on a third host."""
    hosts = {name: net.host(name) for name in ("pri", "sec", "ctl")}
    pri_sec = net.link(hosts["pri"], hosts["sec"])
    pri_ctl = net.link(hosts["pri"], hosts["ctl"])
    sec_ctl = net.link(hosts["sec"], hosts["ctl"])
    psk = os.path.join(nodes.folder, "pair.psk")
    tls.make_psk(psk)
    control = [("control-tls", f"x509:{ca['ca']}")]
    sec_disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE)
    pri_disk = make_disk(os.path.join(nodes.folder, "pri.img"), SIZE)
    listen = nodeproc.Listen(port=NBD_PORT, address=pri_sec.addr_b, tls=TLSSpec("psk", psk))
    sec = start_node(nodes, "secondary", "sec",
                     [("disk", sec_disk), ("control-tcp", f"{sec_ctl.addr_a}:{CONTROL_PORT}"),
                      *control], listen, hosts["sec"])
    pri = start_node(nodes, "primary", "pri",
                     [("disk", pri_disk), ("secondary", listen.uri("replica")),
                      ("secondary-tls", f"psk:{psk}"), ("timeout", TIMEOUT),
                      ("isolation-timeout", ISOLATION),
                      ("control-tcp", f"{pri_ctl.addr_a}:{CONTROL_PORT}"), *control],
                     nodeproc.Listen(socket=os.path.join(nodes.folder, "pri.sock")),
                     hosts["pri"])
    t = Trio(nodes, hosts, pri_sec, pri_ctl, sec_ctl, psk, ca["ca"], pri, sec,
             os.path.join(nodes.folder, "ctl.qmp"))
    try:
        t.start_controller()
        t.wait_state("running", 20)
        yield t
    finally:
        t.close()


def test_normal_run_with_controller_checkpoints(trio: Trio) -> None:
    """Checkpoints across three hosts, the controller reaching both nodes only by TLS."""
    writer = Writer(trio.pri.uri(), SIZE, threads=2).start()
    start = trio.query()["counters"]["checkpoints"]
    wait_for(lambda: trio.query()["counters"]["checkpoints"] >= start + 3, 10, "checkpoints")
    image = writer.pause()
    trio.ctl("replication-do-checkpoint")
    writer.stop()
    assert writer.writes > 0 and not writer.errors
    q = trio.query()
    assert q["state"] == "running" and q["counters"]["checkpoint_failures"] == 0
    assert q["nodes"]["primary"]["control"] == f"{trio.pri_ctl.addr_a}:{CONTROL_PORT}"
    assert all(n["reachable"] for n in q["nodes"].values())
    assert file_bytes(trio.pri.disks[0]) == file_bytes(trio.sec.disks[0]) == image
    sec = trio.sec.ctl("query-replication")["disks"][0]
    assert sec["consistent"] and sec["hidden_bytes"] == 0     # a checkpoint emptied it


def test_cut_of_the_primary_secondary_link_degrades_without_failover_then_reprotects(
        trio: Trio) -> None:
    """The controller sees both nodes: the primary degrades and goes on, no failover; when
    the link returns the controller resyncs and the disks are equal again."""
    writer = Writer(trio.pri.uri(), SIZE, threads=2, max_len=16 << 10).start()
    time.sleep(0.2)
    trio.pri_sec.cut()
    trio.wait_state("degraded", 5)
    time.sleep(1.5)                    # past heartbeat-timeout and isolation-timeout
    count = writer.writes
    time.sleep(0.3)
    assert writer.writes > count and not writer.errors
    q = trio.query()
    assert q["failover"] is None and q["counters"]["failovers"] == 0
    pri = trio.pri.ctl("query-replication")
    assert pri["disks"][0]["degraded"] and not pri["isolation"]["suspended"]
    trio.pri_sec.heal()
    trio.wait_state("running", 20)
    image = writer.pause()
    trio.ctl("replication-do-checkpoint")
    writer.stop()
    assert file_bytes(trio.pri.disks[0]) == file_bytes(trio.sec.disks[0]) == image
    assert trio.sec.ctl("query-replication")["epoch"] == trio.pri.ctl("query-replication")["epoch"]


class AckWriter:
    """One guest writing 4 KiB blocks through the primary, noting when each was acknowledged."""

    def __init__(self, uri: str) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.acks: list[float] = []          # wall-clock times, to compare with the controller's
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.h.pwrite(bytes([n % 251 + 1]) * 4096, n % 256 * 4096)
            except nbd.Error as err:
                self.error = f"{err.errno}: {err}"
                return
            self.acks.append(time.time())
            n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with contextlib.suppress(nbd.Error):
            self.h.shutdown()


def isolate_primary(trio: Trio) -> tuple[AckWriter, dict[str, Any]]:
    """Cut the primary off from both others while a guest writes; return the writer and the
    controller's failover record."""
    writer = AckWriter(trio.pri.uri())
    wait_for(lambda: len(writer.acks) > 20, 5, "guest writes")
    trio.pri_sec.cut()
    trio.pri_ctl.cut()
    q = trio.wait_state("failed-over", 10)
    return writer, q["failover"]


def test_primary_isolated_from_both_fences_itself_and_secondary_takes_over(trio: Trio) -> None:
    """The primary holds guest writes after isolation-timeout, before the controller fails
    over: every write it acknowledged came before the failover began (epoch 1), the
    secondary serves epoch 2, and the old primary is fenced when it is reachable again."""
    writer, failover = isolate_primary(trio)
    began = failover["time"] - failover["failover"]
    assert writer.acks[-1] < began, "the isolated primary acknowledged a write after failover"
    count = len(writer.acks)
    time.sleep(0.5)
    assert len(writer.acks) == count and writer.error is None        # held, not failed
    pri = trio.pri.ctl("query-replication")
    assert pri["isolation"]["suspended"] and pri["epoch"] == 1
    assert trio.sec.ctl("query-replication")["epoch"] == failover["epoch"] == 2
    # The secondary serves the new epoch, from inside its own host.
    active = trio.nbd_uri(trio.pri_sec.addr_b, "active")
    data = os.urandom(65536)
    trio.hosts["sec"].call(_write_and_read, active, data, 5 * MiB)
    # Contact returns: the controller fences the old primary and its held write fails.
    trio.pri_ctl.heal()
    wait_for(lambda: trio.query()["old_primary_fenced"], 5, "fence")
    wait_for(lambda: writer.error is not None, 5, "held write refused")
    assert "EPERM" in str(writer.error)      # EROFS in the node; NBD's wire has only EPERM
    writer.stop()
    assert len(writer.acks) == count
    pri = trio.pri.ctl("query-replication")
    assert pri["fenced"] and pri["epoch"] == 1
    print(f"\nisolated primary: last write acknowledged {began - writer.acks[-1]:.2f}s before "
          f"the failover began; loss to serving {failover['loss_to_serving']:.2f}s")


def _write_and_read(uri: str, data: bytes, offset: int) -> None:
    h = nbd.NBD()
    tls.prepare_client(h, uri)
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
        assert h.pread(len(data), offset) == data
    finally:
        h.shutdown()


def test_healed_partition_resyncs_and_reprotects(trio: Trio) -> None:
    """After the isolation and failover, the network heals: the old primary is fenced, comes
    back as the winner's secondary, promotion compares the disks by checksum over TLS and
    copies what differs (its rolled-back writes), and the pair is protected again."""
    writer, failover = isolate_primary(trio)
    trio.pri_sec.heal()
    trio.pri_ctl.heal()
    wait_for(lambda: trio.query()["old_primary_fenced"], 5, "fence")
    writer.stop()
    old_disk = trio.pri.disks[0]
    trio.pri.kill()
    trio.nodes.started.remove(trio.pri)
    listen = nodeproc.Listen(port=NBD_PORT, address=trio.pri_sec.addr_a,
                             tls=TLSSpec("psk", trio.psk))
    start_node(trio.nodes, "secondary", "newsec",
               [("disk", old_disk), ("control-tcp", f"{trio.pri_ctl.addr_a}:{CONTROL_PORT}"),
                ("control-tls", f"x509:{trio.certs}")], listen, trio.hosts["pri"])
    assert file_bytes(old_disk) != file_bytes(trio.sec.disks[0])      # rolled-back writes
    trio.ctl("controller-promote", secondary=f"{trio.pri_ctl.addr_a}:{CONTROL_PORT}",
             uri=trio.nbd_uri(trio.pri_sec.addr_a, "replica"))
    q = trio.wait_state("running", 20)
    assert q["epoch"] == 2
    # The winner's guest writes are replicated to the old primary's host again.
    data = os.urandom(65536)
    trio.hosts["sec"].call(_write_and_read, trio.nbd_uri(trio.pri_sec.addr_b, "active"), data,
                           2 * MiB)
    trio.ctl("replication-do-checkpoint")
    winner = file_bytes(trio.sec.disks[0])
    assert winner[2 * MiB:2 * MiB + len(data)] == data
    assert file_bytes(old_disk) == winner
