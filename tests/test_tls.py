"""TLS on repdisk's links: credentials (PSK file, small CA), the replication link with real
nbdkit and libnbd on loopback TCP, the plain-TCP rule, and QMP control over TLS.

Who may connect is checked from the outside, as an attacker would try: plain clients,
wrong keys, certificates of another CA, a client that never finishes its handshake.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from repdisk import tls, uri
from repdisk.cli import main as cli
from repdisk.cli import nodeproc
from repdisk.errors import ConfigError, ControlError
from repdisk.node.config import NodeConfig
from repdisk.qmp.client import QMPClient
from repdisk.qmp.client import connect as qmp_connect
from repdisk.qmp.protocol import ArgSpec, Command
from repdisk.qmp.server import QMPServer
from repdisk.tls import TLSSpec
from tests.helpers.nodes import (
    MiB,
    Nodes,
    checkpoint,
    free_port,
    make_disk,
    random_bytes,
    read_file,
    start_node,
)

SIZE = 4 * MiB


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A PSK file, a second (wrong) PSK file, the pair's CA directory and another CA."""
    d = tmp_path_factory.mktemp("creds")
    out = {"psk": str(d / "pair.psk"), "wrong": str(d / "wrong.psk"), "ca": str(d / "ca"),
           "other": str(d / "other-ca")}
    tls.make_psk(out["psk"])
    tls.make_psk(out["wrong"])
    hosts = ["localhost", "127.0.0.1", "10.213.1.1", "10.213.1.2"]
    tls.make_ca(out["ca"], hosts)
    tls.make_ca(out["other"], hosts)
    return out


# -- credentials --------------------------------------------------------------------------

def test_psk_file_is_private_well_formed_and_never_overwritten(tmp_path: Any) -> None:
    path = str(tmp_path / "k.psk")
    tls.make_psk(path, "alice")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    user, key = Path(path).read_text().strip().split(":")
    assert user == "alice" and len(key) == 2 * tls.PSK_BYTES and int(key, 16) >= 0
    with pytest.raises(ConfigError, match="exists"):
        tls.make_psk(path)
    assert Path(path).read_text().startswith("alice:")           # untouched
    tls.make_psk(path, force=True)
    assert tls.read_psk_users("k", path) == ["repdisk"]


def test_psk_file_readable_by_others_or_malformed_is_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "k.psk")
    tls.make_psk(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others.*chmod 600"):
        TLSSpec.parse("tls", f"psk:{path}").check("tls", "server")  # type: ignore[union-attr]
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="no key for user 'bob'"):
        TLSSpec.parse("t", f"psk:{path}:bob").check("t", "client")  # type: ignore[union-attr]
    with open(path, "w") as f:
        f.write("repdisk:nothex\n")
    with pytest.raises(ConfigError, match="line 1 is not USER:HEXKEY"):
        tls.read_psk_users("t", path)
    with pytest.raises(ConfigError, match="does not exist.*repdisk tls psk"):
        tls.read_psk_users("t", str(tmp_path / "missing"))


def test_ca_directory_has_nbdkit_layout_private_keys_and_host_names(creds: dict[str, str]) -> None:
    ca = creds["ca"]
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
                 "client-key.pem", "ca-key.pem"):
        mode = stat.S_IMODE(os.stat(os.path.join(ca, name)).st_mode)
        assert mode & 0o077 == 0 if name.endswith("key.pem") else mode & 0o004
    cert = ssl._ssl._test_decode_cert(os.path.join(ca, "server-cert.pem"))  # type: ignore
    assert set(cert["subjectAltName"]) == {("DNS", "localhost"), ("IP Address", "127.0.0.1"),
                                           ("IP Address", "10.213.1.1"),
                                           ("IP Address", "10.213.1.2")}
    tls.server_context(ca)
    tls.client_context(ca)
    with pytest.raises(ConfigError, match="already holds certificates"):
        tls.make_ca(ca, ["x"])


def test_cli_creates_psk_and_ca(tmp_path: Any, capsys: Any) -> None:
    assert cli.main(["tls", "psk", str(tmp_path / "k.psk"), "--user", "pair1"]) == 0
    assert tls.read_psk_users("k", str(tmp_path / "k.psk")) == ["pair1"]
    assert cli.main(["tls", "ca", str(tmp_path / "ca"), "--hosts", "10.0.0.1,node-b"]) == 0
    tls.check_cert_dir("d", str(tmp_path / "ca"), "server")
    tls.check_cert_dir("d", str(tmp_path / "ca"), "client")
    assert cli.main(["tls", "ca", str(tmp_path / "ca2")]) == 1
    assert "--hosts" in capsys.readouterr().err


def test_tls_spec_parsing_and_client_uris(tmp_path: Any) -> None:
    assert TLSSpec.parse("k", "off") is None
    assert TLSSpec.parse("k", "psk:/k.psk") == TLSSpec("psk", "/k.psk", "repdisk")
    assert TLSSpec.parse("k", "psk:/k.psk:al-1") == TLSSpec("psk", "/k.psk", "al-1")
    assert TLSSpec.parse("k", "x509:/d") == TLSSpec("x509", "/d")
    for bad in ("psk", "psk:", "x509:", "on", "psk:/k:b@d"):
        with pytest.raises(ConfigError, match="^k: "):
            TLSSpec.parse("k", bad)
    psk = TLSSpec("psk", "/etc/r d/k.psk")
    assert (psk.client_uri("s", "nbd://10.0.0.2:10809/replica")
            == "nbds://repdisk@10.0.0.2:10809/replica?tls-psk-file=/etc/r%20d/k.psk")
    assert (psk.client_uri("s", "nbd+unix:///replica?socket=/run/s.sock")
            == "nbds+unix://repdisk@/replica?socket=/run/s.sock&tls-psk-file=/etc/r%20d/k.psk")
    assert (TLSSpec("x509", "/d").client_uri("s", "nbd://h/replica")
            == "nbds://h/replica?tls-certificates=/d&tls-verify-peer=true")
    with pytest.raises(ConfigError, match="already carries TLS"):
        psk.client_uri("s", "nbds://u@h/replica?tls-psk-file=/x")
    assert uri.uri_tcp_host("nbds://u@[fd00::2]:10809/r") == "fd00::2"
    assert uri.uri_tcp_host("nbd+unix:///r?socket=/s") is None


def test_plain_tcp_between_hosts_needs_insecure(tmp_path: Any, creds: dict[str, str]) -> None:
    disk = make_disk(str(tmp_path / "d.img"), MiB)
    base = [("role", "primary"), ("disk", disk), ("control", str(tmp_path / "c.qmp"))]
    with pytest.raises(ConfigError, match="secondary: the secondary 10.213.1.2 is plain TCP"):
        NodeConfig.from_keys(base + [("secondary", "nbd://10.213.1.2:10809/replica")])
    cfg = NodeConfig.from_keys(base + [("secondary", "nbd://10.213.1.2/replica"),
                                       ("insecure", "yes")])
    assert cfg.secondary == "nbd://10.213.1.2/replica"
    cfg = NodeConfig.from_keys(base + [("secondary", "nbd://127.0.0.1:1/replica")])
    assert cfg.secondary == "nbd://127.0.0.1:1/replica"                # loopback stays local
    cfg = NodeConfig.from_keys(base + [("secondary", "nbd://10.213.1.2/replica"),
                                       ("secondary-tls", f"psk:{creds['psk']}")])
    assert cfg.secondary.startswith("nbds://repdisk@10.213.1.2/replica?tls-psk-file=/")
    with pytest.raises(ConfigError, match="tls: a listener on 10.213.1.2 is plain TCP"):
        nodeproc.nbdkit_command("p.py", [], nodeproc.Listen(port=1, address="10.213.1.2"))
    nodeproc.Listen(port=1, address="10.213.1.2", insecure=True).check()
    nodeproc.Listen(port=1, address="10.213.1.2", tls=TLSSpec("x509", creds["ca"])).check()
    assert cli.main(["secondary", "--disk", disk, "--control", str(tmp_path / "s.qmp"),
                     "--port", "10809", "--address", "10.213.1.2"]) == 1


# -- the replication link -------------------------------------------------------------------

def tls_pair(nodes: Nodes, spec: TLSSpec, client: str,
             write_mode: str = "sync") -> tuple[Any, Any]:
    """A secondary requiring TLS on 127.0.0.1, a primary using ``client`` credentials."""
    sec_disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE)
    pri_disk = make_disk(os.path.join(nodes.folder, "pri.img"), SIZE)
    listen = nodeproc.Listen(port=free_port(), tls=spec)
    sec = start_node(nodes, "secondary", "sec", [("disk", sec_disk)], listen)
    sec.ctl("replication-start", mode="secondary")
    pri = start_node(nodes, "primary", "pri",
                     [("disk", pri_disk), ("secondary", listen.uri("replica")),
                      ("secondary-tls", client), ("write-mode", write_mode)],
                     nodeproc.Listen(socket=os.path.join(nodes.folder, "pri.sock")))
    pri.ctl("replication-start", mode="primary")
    return pri, sec


@pytest.mark.parametrize("kind", ["psk", "x509"])
def test_replication_link_over_tls_delivers_every_byte(nodes: Nodes, creds: dict[str, str],
                                                      kind: str) -> None:
    spec = TLSSpec(kind, creds["psk"] if kind == "psk" else creds["ca"])
    pri, sec = tls_pair(nodes, spec, f"{kind}:{spec.path}")
    data = random_bytes(7, SIZE)
    h = pri.client()
    for off in range(0, SIZE, 256 * 1024):
        h.pwrite(data[off:off + 256 * 1024], off)
    h.flush()
    assert read_file(sec.disks[0]) == data
    checkpoint(pri, sec)
    h.pwrite(b"\x5a" * 4096, 12345)
    h.shutdown()
    q = pri.ctl("query-replication")
    assert q["disks"][0]["stage"] == "running" and not q["disks"][0]["degraded"]
    assert read_file(sec.disks[0]) == read_file(pri.disks[0])


def test_async_write_back_over_tls_sends_batch_records(nodes: Nodes,
                                                       creds: dict[str, str]) -> None:
    """The async primary's batch records go to the replica's batch twin over the same TLS
    link, session tag and all: scattered writes reach the secondary by the checkpoint."""
    spec = TLSSpec("psk", creds["psk"])
    pri, sec = tls_pair(nodes, spec, f"psk:{spec.path}", write_mode="async")
    data = bytearray(read_file(pri.disks[0]))
    h = pri.client()
    for i in range(300):  # all in flight at once: the write-back gathers them in rounds
        off = (i * 7919 % (SIZE // 4096)) * 4096
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i % 251 + 1]) * 4096), off)
        data[off:off + 4096] = bytes([i % 251 + 1]) * 4096
    while h.aio_in_flight():
        h.poll(-1)
    h.shutdown()
    checkpoint(pri, sec)
    assert read_file(sec.disks[0]) == bytes(data) == read_file(pri.disks[0])
    link = pri.ctl("query-replication")["disks"][0]["link"]
    assert link["pulled"] >= 1 and link["batches"] >= 1


def _connect(uri: str, **settings: Any) -> nbd.NBD:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    for name, value in settings.items():
        getattr(h, f"set_{name}")(value)
    h.connect_uri(uri)
    return h


def test_tls_listener_refuses_plain_and_wrong_credentials(nodes: Nodes,
                                                          creds: dict[str, str]) -> None:
    """Nobody without the pair's key reaches an export: not plain NBD, not another key."""
    for kind in ("psk", "x509"):
        spec = TLSSpec(kind, creds["psk"] if kind == "psk" else creds["ca"])
        disk = make_disk(os.path.join(nodes.folder, f"{kind}.img"), SIZE)
        listen = nodeproc.Listen(port=free_port(), tls=spec)
        start_node(nodes, "secondary", kind, [("disk", disk)], listen)
        plain = listen.uri("replica")
        with pytest.raises(nbd.Error, match="requires TLS"):
            _connect(plain)
        good = spec.client_uri("s", plain)
        bad = (TLSSpec("psk", creds["wrong"]).client_uri("s", plain) if kind == "psk"
               else TLSSpec("x509", creds["other"]).client_uri("s", plain))
        with pytest.raises(nbd.Error):
            _connect(bad)
        if kind == "x509":   # the right CA but no client certificate: --tls-verify-peer
            nocert = os.path.join(nodes.folder, "nocert")
            os.makedirs(nocert)
            os.link(os.path.join(creds["ca"], "ca-cert.pem"), os.path.join(nocert, "ca-cert.pem"))
            with pytest.raises(nbd.Error):
                _connect(TLSSpec("x509", nocert).client_uri("s", plain))
        h = _connect(good)
        assert h.get_tls_negotiated() and h.get_size() == SIZE
        h.shutdown()


def test_primary_with_the_wrong_key_does_not_start(nodes: Nodes, creds: dict[str, str]) -> None:
    sec_disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE)
    listen = nodeproc.Listen(port=free_port(), tls=TLSSpec("psk", creds["psk"]))
    start_node(nodes, "secondary", "sec", [("disk", sec_disk)], listen)
    pri_disk = make_disk(os.path.join(nodes.folder, "pri.img"), SIZE)
    with pytest.raises(Exception, match="secondary: .*gnutls_handshake.*; the TLS handshake "
                                        "failed: give both nodes the same PSK file"):
        start_node(nodes, "primary", "pri",
                   [("disk", pri_disk), ("secondary", listen.uri("replica")),
                    ("secondary-tls", f"psk:{creds['wrong']}")],
                   nodeproc.Listen(socket=os.path.join(nodes.folder, "pri.sock")))


# -- control over TCP -----------------------------------------------------------------------

class Recorder:
    """A control server's commands that record every call, so a refused client provably ran
    nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def commands(self) -> list[Command]:
        def echo(args: dict[str, Any]) -> Any:
            self.calls.append("echo")
            return {"text": args["text"]}
        return [Command("echo", echo, {"text": ArgSpec(str)})]


@pytest.fixture
def tls_server(creds: dict[str, str]) -> Iterator[tuple[QMPServer, tuple[str, int], Recorder]]:
    rec = Recorder()
    server = QMPServer(rec.commands(), name="repdisk-test")
    addr = server.serve_tls("127.0.0.1", 0, tls.server_context(creds["ca"]))
    try:
        yield server, addr, rec
    finally:
        server.close()


def test_control_over_tls_runs_commands_and_relays_large_messages_and_events(
        tls_server: Any, creds: dict[str, str]) -> None:
    server, addr, rec = tls_server
    with QMPClient(timeout=10).connect(addr, tls=tls.client_context(creds["ca"])) as c:
        assert c.greeting and c.greeting["QMP"]["version"]["package"].startswith("repdisk-test")
        big = "x" * 600_000 + "end"        # several TLS records and relay chunks each way
        assert c.execute("echo", text=big) == {"text": big}
        server.emit("TEST_EVENT", {"n": 1})
        assert c.wait_event("TEST_EVENT", timeout=5)["data"] == {"n": 1}
    assert rec.calls == ["echo"]


def test_control_refuses_clients_without_valid_certificates_and_logs_it(
        tls_server: Any, creds: dict[str, str], tmp_path: Any, caplog: Any) -> None:
    server, addr, rec = tls_server
    caplog.set_level(logging.INFO, logger="repdisk.qmp.tlsrelay")
    nocert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    nocert.load_verify_locations(os.path.join(creds["ca"], "ca-cert.pem"))
    attempts = {"no client certificate": nocert,
                "another CA's certificate": _other_ca_client(creds)}
    for what, ctx in attempts.items():
        with pytest.raises(ControlError):
            c = QMPClient(timeout=5).connect(addr, timeout=5, tls=ctx)
            c.execute("echo", text="should never run")     # TLS 1.3 fails at first read
        assert _wait_for(lambda: "refused control client" in caplog.text), what
        caplog.clear()
    with socket.create_connection(addr, timeout=5) as s:     # plain QMP, no TLS at all
        s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "echo", '
                  b'"arguments": {"text": "plain"}}\n')
        assert b"QMP" not in _read_to_end(s)      # no greeting: closed (maybe after an alert)
    assert _wait_for(lambda: "TLS handshake failed" in caplog.text)
    assert rec.calls == []


def _read_to_end(s: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _other_ca_client(creds: dict[str, str]) -> ssl.SSLContext:
    """A client that trusts the pair's CA but presents a certificate from another CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(creds["ca"], "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(creds["other"], "client-cert.pem"),
                        os.path.join(creds["other"], "client-key.pem"))
    return ctx


def _wait_for(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_control_client_checks_the_server_certificate(tls_server: Any,
                                                      creds: dict[str, str]) -> None:
    """A client of another pair (other CA) does not talk to this server."""
    _, addr, rec = tls_server
    with pytest.raises(ControlError, match="certificate"):
        QMPClient(timeout=5).connect(addr, tls=tls.client_context(creds["other"]))
    assert rec.calls == []


def test_a_tls_client_of_a_plain_control_port_is_told_to_give_insecure(
        creds: dict[str, str]) -> None:
    """`--tls DIR` against a port served --insecure: one line that says so, not OpenSSL's
    WRONG_VERSION_NUMBER alone."""
    server = QMPServer([], name="repdisk-test")
    host, port = server.serve_tcp("127.0.0.1", 0)
    try:
        with pytest.raises(ControlError, match=rf"^{host}:{port}: the port answered without "
                                               r"TLS \(it is served --insecure\): give "
                                               "--insecure instead of --tls$"):
            qmp_connect(f"{host}:{port}", tls=creds["ca"])
        with qmp_connect(f"{host}:{port}", insecure=True) as c:
            assert c.greeting
    finally:
        server.close()


def test_a_plain_client_of_a_tls_control_port_is_told_to_give_tls(
        tls_server: Any, tmp_path: Any) -> None:
    """`--insecure` against a port served with TLS: the server, given no TLS hello within
    tlsrelay.SILENT_CLIENT, says in plain text that the port needs TLS, and the client
    says what to give, in one line, long before its own timeout; with a shorter timeout,
    the timeout says what is missing.  A --tls folder without certificates names the
    option the user gave."""
    _, (host, port), rec = tls_server
    began = time.monotonic()
    with pytest.raises(ControlError, match=rf"^{host}:{port}: the port is served with TLS: "
                                           r"give --tls DIR \(client certificates\) instead "
                                           "of --insecure$"):
        qmp_connect(f"{host}:{port}", insecure=True, connect_timeout=10.0)
    assert time.monotonic() - began < 5.0
    with pytest.raises(ControlError, match=r"connect: no answer within 1(\.0)? s: a control port "
                                           "served with TLS says nothing to a client without "
                                           "it; give --tls DIR"):
        qmp_connect(f"{host}:{port}", insecure=True, connect_timeout=1.0)
    with pytest.raises(ConfigError, match=r"^tls: .*ca-cert\.pem"):
        qmp_connect(f"{host}:{port}", tls=str(tmp_path / "missing"))
    assert rec.calls == []


def test_control_handshake_of_a_stalled_client_blocks_nobody(tls_server: Any,
                                                             creds: dict[str, str]) -> None:
    _, addr, rec = tls_server
    stalled = [socket.create_connection(addr) for _ in range(3)]   # connect, send nothing
    try:
        t0 = time.monotonic()
        with QMPClient(timeout=5).connect(addr, tls=tls.client_context(creds["ca"])) as c:
            assert c.execute("echo", text="ok") == {"text": "ok"}
        assert time.monotonic() - t0 < 2.0
    finally:
        for s in stalled:
            s.close()


def test_control_unix_socket_stays_0600(nodes: Nodes) -> None:
    disk = make_disk(os.path.join(nodes.folder, "s.img"), MiB)
    sec = nodes.secondary(disk)
    assert stat.S_IMODE(os.stat(sec.control).st_mode) == 0o600


def test_tls_relay_survives_many_clients_coming_and_going(tls_server: Any,
                                                         creds: dict[str, str]) -> None:
    _, addr, rec = tls_server
    ctx = tls.client_context(creds["ca"])
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with QMPClient(timeout=10).connect(addr, tls=ctx) as c:
                for j in range(5):
                    assert c.execute("echo", text=f"{i}.{j}") == {"text": f"{i}.{j}"}
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(rec.calls) == 40
