"""The QMP server against QEMU's own clients (qemu.qmp, its legacy sync wrapper, qmp-shell)
and against a raw socket for everything a well-behaved client never sends."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp import QMPClient as AsyncQMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from repdisk.errors import ControlError
from repdisk.qmp.client import QMPClient
from repdisk.qmp.protocol import GATE, MAX_MESSAGE, ArgSpec, Command, Phase, QMPProtocol, gate
from repdisk.qmp.server import MAX_QUEUED, QMPServer

pytestmark = pytest.mark.timeout(30)

GREETING = {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
                                "package": "repdisk 0.1.0"}, "capabilities": []}}


class Handlers:
    """Test commands, with events that let a test see when the slow one runs."""

    def __init__(self) -> None:
        self.sleep_started = threading.Event()
        self.sleep_done = threading.Event()

    def sleep(self, args: dict[str, Any]) -> dict[str, Any]:
        self.sleep_started.set()
        time.sleep(args.get("seconds", 1.0))
        self.sleep_done.set()
        return {"slept": True}

    def commands(self) -> list[Command]:
        def fail(_: dict[str, Any]) -> None:
            raise ControlError("disk foo not found", "DeviceNotFound")

        def crash(_: dict[str, Any]) -> None:
            raise RuntimeError("boom")

        return [
            Command("echo", lambda a: a, {"x": ArgSpec(int, False), "flag": ArgSpec(bool, False),
                                          "name": ArgSpec(str, False),
                                          "ratio": ArgSpec(float, False)}),
            Command("stop", lambda a: None, {"mode": ArgSpec(str), "failover": ArgSpec(bool)}),
            Command("fail", fail),
            Command("crash", crash),
            Command("not-json", lambda a: {"x": object()}),
            Command("sleep", self.sleep, {"seconds": ArgSpec(float, False)}),
        ]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qmpt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def server(sockdir: Path, handlers: Handlers) -> Iterator[QMPServer]:
    srv = QMPServer(handlers.commands())
    srv.serve_unix(str(sockdir / "ctl"))
    yield srv
    srv.close()


@pytest.fixture
def path(sockdir: Path, server: QMPServer) -> str:
    return str(sockdir / "ctl")


class Raw:
    """A bare socket client: sends exactly the bytes a test gives, reads one message a line."""

    def __init__(self, path: str, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()
        if negotiate:
            assert self.call("qmp_capabilities") == {"return": {}}

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), f"incomplete message {line!r}"
        return json.loads(line)

    def call(self, name: str, **fields: Any) -> dict[str, Any]:
        self.send({"execute": name, **fields})
        return self.recv()

    def at_eof(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def error(desc: str, cls: str = "GenericError", **extra: Any) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}, **extra}


def emit_from_thread(server: QMPServer, name: str, data: dict[str, Any] | None) -> None:
    thread = threading.Thread(target=server.emit, args=(name, data))
    thread.start()
    thread.join()


# -- QEMU's clients ---------------------------------------------------------------------------

def test_qemu_async_client_commands_and_events(server: QMPServer, path: str) -> None:
    async def session() -> None:
        qmp = AsyncQMPClient("test")
        await qmp.connect(path)
        assert qmp.greeting is not None and qmp.greeting._asdict() == GREETING
        assert await qmp.execute("echo", {"x": 7, "name": "a"}) == {"x": 7, "name": "a"}
        assert await qmp.execute("echo") == {}
        names = [c["name"] for c in await qmp.execute("query-commands")]  # type: ignore[union-attr]
        assert names == sorted(["qmp_capabilities", "query-commands", "query-version", "echo",
                                "stop", "fail", "crash", "not-json", "sleep"])
        assert await qmp.execute("query-version") == GREETING["QMP"]["version"]
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("fail")
        assert (err.value.error_class, str(err.value)) == ("DeviceNotFound", "disk foo not found")
        before = time.time()
        await asyncio.to_thread(emit_from_thread, server, "REPLICATION_ERROR", {"disk": "d0"})
        event = await asyncio.wait_for(qmp.events.get(), 5)
        assert event["event"] == "REPLICATION_ERROR" and event["data"] == {"disk": "d0"}
        stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
        assert before - 1 <= stamp <= time.time() + 1
        assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
        await qmp.disconnect()

    asyncio.run(session())


def test_qemu_legacy_client(server: QMPServer, path: str) -> None:
    qmp = QEMUMonitorProtocol(path)
    try:
        assert qmp.connect() == GREETING
        assert qmp.cmd("echo", x=1, flag=False) == {"x": 1, "flag": False}
        assert qmp.cmd_obj({"execute": "echo", "arguments": {"x": 2}, "id": "abc"}) == \
            {"return": {"x": 2}, "id": "abc"}
        assert qmp.cmd_raw("stop", {"mode": "primary"}) == \
            error("Parameter 'failover' is missing")
        emit_from_thread(server, "CHECKPOINT_COMPLETED", None)
        event = qmp.pull_event(wait=5.0)
        assert event is not None and event["event"] == "CHECKPOINT_COMPLETED"
        assert "data" not in event   # like QEMU, an event without data has no data member
    finally:
        qmp.close()


def test_qmp_shell(sockdir: Path, path: str) -> None:
    shell = shutil.which("qmp-shell", path=os.path.dirname(sys.executable))
    if shell is None:
        pytest.skip("qmp-shell is not installed in this environment")
    out = subprocess.run([shell, path], input="echo x=5 name=disk0\nfail\n", text=True,
                         capture_output=True, timeout=20, env={**os.environ, "HOME": str(sockdir)})
    assert out.returncode == 0, out.stderr
    assert "Connected to QEMU 0.1.0" in out.stdout
    replies = [json.loads(line.split("(QEMU) ", 1)[1]) for line in out.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies == [{"return": {"x": 5, "name": "disk0"}},
                       error("disk foo not found", "DeviceNotFound")]


# -- repdisk's own client ---------------------------------------------------------------------

def test_repdisk_client(server: QMPServer, path: str, handlers: Handlers) -> None:
    with QMPClient(timeout=5).connect(path) as client:
        assert client.greeting == GREETING
        assert client.execute("echo", {"x": 3}, flag=True) == {"x": 3, "flag": True}
        with pytest.raises(ControlError) as err:
            client.execute("fail")
        assert (str(err.value), err.value.error_class) == ("disk foo not found", "DeviceNotFound")
        emit_from_thread(server, "A", {"n": 1})
        emit_from_thread(server, "B", {"n": 2})
        assert client.wait_event("B", 5)["data"] == {"n": 2}
        assert [e["event"] for e in client.events] == ["A"]
        client.timeout = 0.3
        with pytest.raises(ControlError, match="no answer within 0.3 s"):
            client.execute("sleep", seconds=1.0)
        client.timeout = 5
        assert handlers.sleep_done.wait(5)
        assert client.execute("echo", x=4) == {"x": 4}   # the late reply was dropped


def _greet(listener: socket.socket, greeting: bytes) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(greeting)
        conn.recv(1)  # until the client hangs up


def test_repdisk_client_errors(sockdir: Path) -> None:
    missing = str(sockdir / "missing")
    with pytest.raises(ControlError) as info:
        QMPClient(timeout=2).connect(missing)
    assert (str(info.value), info.value.error_class) == (
        f"{missing}: nothing answers there (No such file or directory): start the node (or "
        "controller) first, or give its --control socket", "")
    with socket.socket() as closed:               # a TCP port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for given in (f"127.0.0.1:{port}", ("127.0.0.1", port)):   # named as a user types it
        with pytest.raises(ControlError) as info:
            QMPClient(timeout=2).connect(given)
        assert str(info.value) == (f"127.0.0.1:{port}: nothing answers there (Connection "
                                   "refused): start the node (or controller) first, or give "
                                   "its --control socket")
    # A server that greets with something else is refused at its first byte, not after
    # the connect timeout (60 s here).
    for greeting, what in ((b"NBDMAGICIHAVEOPT\0\3", "an NBD socket"),
                           (b"SSH-2.0-x\r\n", "a socket whose server does not speak QMP")):
        with socket.socket(socket.AF_UNIX) as other:
            where = str(sockdir / "other")
            other.bind(where)
            other.listen()
            talker = threading.Thread(target=_greet, args=(other, greeting))
            talker.start()
            with pytest.raises(ControlError) as info:
                QMPClient(timeout=60).connect(where)
            talker.join()
            assert str(info.value) == (f"{where} is {what}, not a control socket: give the "
                                       "node's --control socket")
            os.unlink(where)
    with socket.socket(socket.AF_UNIX) as mute:       # accepts, never greets
        mute.bind(str(sockdir / "mute"))
        mute.listen()
        client = QMPClient(timeout=0.3)
        with pytest.raises(ControlError, match="no answer within 0.3 s"):
            client.connect(str(sockdir / "mute"))
        client.close()


def test_serve_tcp_socket(handlers: Handlers) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    srv = QMPServer(handlers.commands())
    srv.serve_socket(listener)
    try:
        port = listener.getsockname()[1]
        with QMPClient(timeout=5).connect(f"127.0.0.1:{port}") as client:
            assert client.execute("echo", x=9) == {"x": 9}
    finally:
        srv.close()


# -- the protocol, byte by byte ---------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_protocol_splits_any_chunking(handlers: Handlers, chunk: int) -> None:
    proto = QMPProtocol(QMPServer(handlers.commands()))
    assert json.loads(proto.greeting()) == GREETING
    stream = (b'{"execute": "qmp_capabilities"}\n'
              b'  {"execute": "echo", "arguments": {"name": "a}\\"{["}, "id": 1}'
              b'{"execute": "echo", "arguments": {"name": "\\\\"}, "id": [2]}\r\n'
              b'\n   \n'
              b'"x"\n'
              b'{"execute": "echo", "arguments": {"x": -1}}')   # complete without a newline
    replies = [r for i in range(0, len(stream), chunk) for r in proto.receive(stream[i:i + chunk])]
    assert all(r.endswith(b"\r\n") and r.count(b"\n") == 1 for r in replies)
    assert [json.loads(r) for r in replies] == [
        {"return": {}},
        {"return": {"name": 'a}"{['}, "id": 1},
        {"return": {"name": "\\"}, "id": [2]},
        error("QMP input must be a JSON object"),
        {"return": {"x": -1}},
    ]


def test_gate_table() -> None:
    """Which command runs in which phase, and what answers the others."""
    first = ("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
    done = ("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    closing = ("GenericError", "the connection is closing: its input broke the protocol")
    expected = {Phase.NEGOTIATING: (None, first), Phase.RUNNING: (done, None),
                Phase.CLOSED: (closing, closing)}
    for phase, answers in expected.items():
        for name, answer in zip(("qmp_capabilities", "query-version"), answers, strict=True):
            if answer is None:
                gate(phase, name)
                continue
            with pytest.raises(ControlError) as refused:
                gate(phase, name)
            assert (refused.value.error_class, str(refused.value)) == answer, (phase, name)
    assert set(GATE) == {(p, c) for p in Phase for c in (True, False)}


def test_phases_change_in_order_through_one_setter(handlers: Handlers, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="repdisk.qmp.protocol")
    proto = QMPProtocol(QMPServer(handlers.commands(), max_message=64))
    assert (proto.phase, proto.negotiated, proto.closed) == (Phase.NEGOTIATING, False, False)
    assert [json.loads(r) for r in proto.receive(b'{"execute": "echo"}\n')] == [
        error("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")]
    assert proto.phase is Phase.NEGOTIATING                     # a refusal changes nothing
    proto.receive(b'{"execute": "qmp_capabilities"}\n')
    assert (proto.phase, proto.negotiated, proto.closed) == (Phase.RUNNING, True, False)
    assert [json.loads(r) for r in proto.receive(b'{"execute": "echo", "arguments": '
                                                 b'{"name": "' + b"a" * 64)] == [
        error("QMP input longer than 64 bytes; closing the connection")]
    assert (proto.phase, proto.negotiated, proto.closed) == (Phase.CLOSED, False, True)
    assert proto.receive(b'{"execute": "echo"}\n') == []       # nothing runs once closed
    assert [r.getMessage() for r in caplog.records if r.name == "repdisk.qmp.protocol"] == [
        "qmp: connection negotiating -> running", "qmp: connection running -> closed"]


def test_malformed_json_then_recovers(path: str) -> None:
    raw = Raw(path)
    for bad in (b'{"execute": }\n', b'{bad\n', b'{"execute": "echo", "id": NaN}\n',
                b'{"execute": "echo", "execute": "echo"}\n', b'{"execute": "\xff"}\n'):
        raw.send(bad)
        reply = raw.recv()
        assert set(reply) == {"error"}, bad          # no id, like QEMU
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"].startswith("JSON parse error, "), reply
    assert raw.call("echo", arguments={"x": 1}, id=5) == {"return": {"x": 1}, "id": 5}
    raw.close()


@pytest.mark.parametrize("msg, desc", [
    ([1, 2], "QMP input must be a JSON object"),
    ("execute", "QMP input must be a JSON object"),
    ({"arguments": {}}, "QMP input lacks member 'execute'"),
    ({"execute": 1}, "QMP input member 'execute' must be a string"),
    ({"execute": "echo", "arguments": [1]}, "QMP input member 'arguments' must be an object"),
    ({"execute": "echo", "exec-oob": "echo"}, "QMP input member 'exec-oob' is unexpected"),
    ({"execute": "echo", "arguments": {"x": True}}, "Parameter 'x' expects integer"),
    ({"execute": "echo", "arguments": {"x": 1.5}}, "Parameter 'x' expects integer"),
    ({"execute": "echo", "arguments": {"flag": 1}}, "Parameter 'flag' expects boolean"),
    ({"execute": "echo", "arguments": {"flag": None}}, "Parameter 'flag' expects boolean"),
    ({"execute": "echo", "arguments": {"ratio": False}}, "Parameter 'ratio' expects number"),
    ({"execute": "echo", "arguments": {"name": 3}}, "Parameter 'name' expects string"),
    ({"execute": "stop", "arguments": {"failover": True}}, "Parameter 'mode' is missing"),
    ({"execute": "stop", "arguments": {"mode": "x", "failover": 0}},
     "Parameter 'failover' expects boolean"),
    ({"execute": "stop", "arguments": {"mode": "x", "failover": True, "foo": 1}},
     "Parameter 'foo' is unexpected"),
    ({"execute": "echo", "arguments": {"foo": 1}}, "Parameter 'foo' is unexpected"),
    ({"execute": "crash"}, "boom"),
])
def test_invalid_requests(path: str, msg: Any, desc: str) -> None:
    raw = Raw(path)
    expected = error(desc)
    if isinstance(msg, dict):
        msg = {**msg, "id": "req"}
        expected["id"] = "req"                       # echoed whenever the input is an object
    raw.send(msg)
    assert raw.recv() == expected
    assert raw.call("echo", arguments={"x": 1, "ratio": 2}) == {"return": {"x": 1, "ratio": 2}}
    raw.close()


def test_unknown_command_and_handler_failures(path: str) -> None:
    raw = Raw(path)
    assert raw.call("nope", id=1) == error("The command nope has not been found",
                                           "CommandNotFound", id=1)
    assert raw.call("fail") == error("disk foo not found", "DeviceNotFound")
    reply = raw.call("not-json", id=2)
    assert reply["id"] == 2 and reply["error"]["desc"].startswith("the command's result is not")
    assert raw.call("stop", arguments={"mode": "primary", "failover": False}) == {"return": {}}
    raw.close()


def test_negotiation(server: QMPServer, path: str) -> None:
    raw = Raw(path, negotiate=False)
    assert raw.greeting == GREETING
    first = "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert raw.call("query-version", id=1) == error(first, "CommandNotFound", id=1)
    assert raw.call("nope") == error(first, "CommandNotFound")
    assert raw.call("qmp_capabilities", arguments={"enable": ["oob"]}) == \
        error("Capability 'oob' not available")
    assert raw.call("qmp_capabilities", arguments={"enable": "oob"}) == \
        error("Parameter 'enable' expects array")
    server.emit("EARLY", {})                          # not negotiated: not for this client
    assert raw.call("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
    assert raw.call("qmp_capabilities") == \
        error("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    server.emit("LATE", {"n": 1})
    assert raw.recv()["event"] == "LATE"
    raw.close()


def test_huge_line_is_refused_and_dropped(path: str) -> None:
    raw = Raw(path)
    raw.send(b'{"execute": "echo", "arguments": {"name": "' + b"a" * MAX_MESSAGE)
    assert raw.recv() == error(f"QMP input longer than {MAX_MESSAGE} bytes; closing the "
                               "connection")
    assert raw.at_eof()
    raw.close()
    other = Raw(path)
    assert other.call("echo")["return"] == {}
    other.close()


# -- concurrency ------------------------------------------------------------------------------

def test_disconnect_mid_command(server: QMPServer, path: str, handlers: Handlers) -> None:
    """A client that leaves during a blocking command: the command finishes, its reply is
    dropped, and another client keeps running commands and getting events meanwhile."""
    quitter, other = Raw(path), Raw(path)
    quitter.send({"execute": "sleep", "id": 1})
    assert handlers.sleep_started.wait(5)
    quitter.close()
    emit_from_thread(server, "DURING", {"n": 1})
    assert other.recv()["event"] == "DURING"
    assert other.call("echo", arguments={"x": 1}) == {"return": {"x": 1}}
    assert not handlers.sleep_done.is_set()           # all of that happened mid-command
    assert handlers.sleep_done.wait(5)
    emit_from_thread(server, "AFTER", None)
    assert other.recv()["event"] == "AFTER"
    assert other.call("echo", id=2) == {"return": {}, "id": 2}
    deadline = time.monotonic() + 5
    while len(server._clients) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server._clients) == 1
    other.close()


def test_events_flow_while_own_command_blocks(server: QMPServer, path: str,
                                              handlers: Handlers) -> None:
    raw = Raw(path)
    raw.send({"execute": "sleep", "arguments": {"seconds": 0.5}, "id": "s"})
    assert handlers.sleep_started.wait(5)
    server.emit("TICK", {"n": 1})
    assert raw.recv()["event"] == "TICK"
    assert not handlers.sleep_done.is_set()
    assert raw.recv() == {"return": {"slept": True}, "id": "s"}
    raw.close()


def test_concurrent_emitters_lose_nothing(server: QMPServer, path: str) -> None:
    # Fewer events than a client may have queued: emitters outrunning this reader must not
    # get it dropped as a client that stopped reading (that rule has its own test below).
    per_thread = 200
    assert 4 * per_thread < MAX_QUEUED
    raw = Raw(path)
    threads = [threading.Thread(target=lambda t=t: [server.emit("E", {"t": t, "i": i})
                                                    for i in range(per_thread)])
               for t in range(4)]
    for thread in threads:
        thread.start()
    got = [raw.recv()["data"] for _ in range(4 * per_thread)]
    for thread in threads:
        thread.join()
    for t in range(4):
        assert [d["i"] for d in got if d["t"] == t] == list(range(per_thread))
    raw.close()


def test_client_that_stops_reading_is_dropped(sockdir: Path, handlers: Handlers) -> None:
    srv = QMPServer(handlers.commands(), max_queued=50)
    srv.serve_unix(str(sockdir / "ctl"))
    try:
        stuck = Raw(str(sockdir / "ctl"))              # negotiated, then does not read
        start = time.monotonic()
        for i in range(2000):                          # 8 MB: far beyond the socket buffers
            srv.emit("BULK", {"i": i, "pad": "x" * 4096})
        assert time.monotonic() - start < 5            # emit never waited for it
        received = []
        try:
            while line := stuck.file.readline():       # dropped: what was sent, then EOF
                received.append(json.loads(line)["data"]["i"])
        except ConnectionResetError:
            pass
        assert len(received) < 2000
        assert received == list(range(len(received)))  # nothing lost or reordered before it
        with QMPClient(timeout=5).connect(str(sockdir / "ctl")) as fresh:
            assert fresh.execute("echo", x=1) == {"x": 1}
        stuck.close()
    finally:
        srv.close()


# -- the Unix socket file ---------------------------------------------------------------------

def test_socket_mode_and_cleanup(sockdir: Path, handlers: Handlers) -> None:
    for mode in (0o600, 0o660):
        path = str(sockdir / f"ctl{mode:o}")
        srv = QMPServer(handlers.commands())
        srv.serve_unix(path, mode)
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        assert sorted(os.listdir(sockdir)) == [f"ctl{mode:o}"]   # the private dir is gone
        srv.close()
        assert not os.path.exists(path)


def test_stale_socket_is_replaced(sockdir: Path, handlers: Handlers) -> None:
    path = str(sockdir / "ctl")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()                                       # the file stays, nobody listens
    srv = QMPServer(handlers.commands())
    srv.serve_unix(path)
    try:
        with QMPClient(timeout=5).connect(path) as client:
            assert client.execute("echo", x=1) == {"x": 1}
    finally:
        srv.close()


def test_live_socket_and_non_socket_are_refused(sockdir: Path, server: QMPServer,
                                                path: str, handlers: Handlers) -> None:
    second = QMPServer(handlers.commands())
    with pytest.raises(ControlError, match="a live server answers there"):
        second.serve_unix(path)
    with QMPClient(timeout=5).connect(path) as client:  # the first one is undisturbed
        assert client.execute("echo", x=2) == {"x": 2}
    regular = sockdir / "file"
    regular.write_text("keep me")
    with pytest.raises(ControlError, match="not a socket"):
        second.serve_unix(str(regular))
    assert regular.read_text() == "keep me"
    with pytest.raises(ControlError, match="longer than the 107 bytes"):
        second.serve_unix(str(sockdir / ("x" * 120)))
    second.close()


def test_close_keeps_a_successors_socket(sockdir: Path, handlers: Handlers) -> None:
    path = str(sockdir / "ctl")
    first = QMPServer(handlers.commands())
    first.serve_unix(path)
    os.unlink(path)                                    # an operator removed it ...
    successor = QMPServer(handlers.commands())
    successor.serve_unix(path)                         # ... and a new node took the path
    first.close()
    with QMPClient(timeout=5).connect(path) as client:
        assert client.execute("echo", x=3) == {"x": 3}
    successor.close()


def test_close_during_a_command(sockdir: Path, handlers: Handlers) -> None:
    srv = QMPServer(handlers.commands())
    srv.serve_unix(str(sockdir / "ctl"))
    raw = Raw(str(sockdir / "ctl"))
    raw.send({"execute": "sleep", "id": 1})
    assert handlers.sleep_started.wait(5)
    start = time.monotonic()
    srv.close()
    assert time.monotonic() - start < 0.5              # close does not wait for commands
    assert raw.at_eof()
    assert not os.path.exists(sockdir / "ctl")
    assert handlers.sleep_done.wait(5)                 # the command still ran to its end
    with pytest.raises(ControlError, match="is closed"):
        srv.serve_unix(str(sockdir / "ctl"))
    raw.close()
