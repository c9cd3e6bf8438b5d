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

import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import nbd
import pytest

from conftest import MiB, NodeProc, Nodes, make_disk
from netns import Host, Link, Net, start_node, unavailable
from repdisk import cli, ctlclient, nodeproc, tls
from repdisk.config import NodeConfig
from repdisk.controller import Controller, ControllerConfig
from repdisk.errors import ConfigError, ControlError
from repdisk.qmp import QMPClient
from repdisk.tls import TLSSpec
from test_controller_helpers import Writer, file_bytes, wait_for
from test_node_pair import read_all

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    caplog.set_level(logging.INFO, logger="repdisk.tls")
    ctl_port = free_port()
    ctl = Controller(ControllerConfig(primary=address, secondary=address, tls=ca["ca"],
                                      control=os.path.join(nodes.folder, "ctl.qmp"),
                                      control_tcp=("127.0.0.1", ctl_port),
                                      control_tls=ca["ca"]))
    try:
        assert ctl.secondary.query()["role"] == "secondary"               # over TLS
        lines = ctlclient.status_lines(f"127.0.0.1:{ctl_port}", ca["ca"])
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
        ctlclient.connect(address, certs, timeout=2, connect_timeout=2).close()
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
