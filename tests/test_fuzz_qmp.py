"""Fuzzing the control protocol: random bytes, random JSON and random requests against the
real command tables of a primary and a secondary node (in-process ``Node`` objects over
real disk files), both through ``QMPProtocol`` directly and through a live Unix-socket
server.  Nothing may come back but well-formed QMP replies (a ``return`` or an ``error``
with a class and a description), and the server must keep serving afterwards.

Bounded for CI: each test runs a fixed number of examples with no per-example deadline
(a real command may touch files); the whole module takes a few seconds.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repdisk.node import control
from repdisk.node.node import Node
from repdisk.qmp.client import QMPClient
from repdisk.qmp.protocol import QMPProtocol
from repdisk.qmp.server import QMPServer
from tests.helpers.nodes import MiB, make_disk

ERROR_CLASSES = {"GenericError", "CommandNotFound"}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, QMPServer]]:
    """One QMP server per role, with the node's real commands (the primary's secondary does
    not exist: its link commands fail fast, as they would in production)."""
    d = tmp_path_factory.mktemp("fuzzqmp")
    out, nodes = {}, []
    for role in ("secondary", "primary"):
        keys = [("role", role), ("disk", make_disk(str(d / f"{role}.img"), MiB)),
                ("control", str(d / f"{role}.qmp"))]
        if role == "primary":
            keys += [("secondary", f"nbd+unix:///replica?socket={d}/nowhere.sock"),
                     ("timeout", "200ms")]
        node = Node.from_keys(keys)
        nodes.append(node)
        server = QMPServer(control.node_commands(node), name=f"repdisk-{role}")
        node.ctx.server = server       # events of the node reach the fuzzed clients
        server.serve_unix(str(d / f"{role}.qmp"))
        out[role] = server
    yield out
    for node in nodes:
        node.close()


def check_reply(raw: bytes, sent: Any = None) -> dict[str, Any]:
    """One well-formed QMP reply; its id echoes the request's when the request had one."""
    assert raw.endswith(b"\r\n")
    msg = json.loads(raw)
    assert isinstance(msg, dict)
    assert ("return" in msg) != ("error" in msg), msg
    if "error" in msg:
        assert set(msg["error"]) == {"class", "desc"}, msg
        assert msg["error"]["class"] in ERROR_CLASSES and isinstance(msg["error"]["desc"], str)
    if isinstance(sent, dict) and "id" in sent:
        assert msg.get("id") == sent["id"]
    assert set(msg) <= {"return", "error", "id"}, msg
    return msg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10)


def requests(server: QMPServer) -> st.SearchStrategy[dict[str, Any]]:
    """Requests for the server's real commands (and some made-up ones), with arguments
    drawn from the real argument names (and some made-up ones), values of any JSON type."""
    names = sorted(server.commands)
    arg_names = sorted({a for c in server.commands.values() for a in c.args} | {"x"})
    args = st.dictionaries(st.sampled_from(arg_names), json_values | st.sampled_from(
        ["primary", "secondary", True, False, 0, 1, 2**31]), max_size=3)
    return st.fixed_dictionaries(
        {"execute": st.sampled_from(names) | st.text(max_size=12)},
        optional={"arguments": args | json_values, "id": json_values})


def negotiated(server: QMPServer) -> QMPProtocol:
    proto = QMPProtocol(server)
    check_reply(proto.handle(b'{"execute": "qmp_capabilities"}'))
    assert proto.negotiated
    return proto


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_random_requests_against_the_real_command_tables(servers: dict[str, QMPServer],
                                                         data: Any) -> None:
    for role in ("secondary", "primary"):
        server = servers[role]
        proto = negotiated(server)
        for req in data.draw(st.lists(requests(server), min_size=1, max_size=5), label=role):
            check_reply(proto.handle(json.dumps(req).encode()), req)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=300) | st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b"\\", b"\n", b'{"execute":', b'"qmp_capabilities"}',
     b"\xff\xfe", b"NaN", b"1e999999"]), max_size=30), negotiate=st.booleans())
def test_random_bytes_get_only_qmp_replies(servers: dict[str, QMPServer], chunks: list[bytes],
                                           negotiate: bool) -> None:
    server = servers["secondary"]
    proto = negotiated(server) if negotiate else QMPProtocol(server)
    for chunk in chunks:
        for raw in proto.receive(chunk):
            check_reply(raw)


@FUZZ
@given(value=json_values)
def test_random_json_values_get_only_qmp_replies(servers: dict[str, QMPServer],
                                                 value: Any) -> None:
    proto = negotiated(servers["primary"])
    check_reply(proto.handle(json.dumps(value).encode()), value)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(blob=st.binary(min_size=1, max_size=4000))
def test_live_server_survives_random_bytes_on_its_socket(servers: dict[str, QMPServer],
                                                         blob: bytes) -> None:
    """Garbage on a real connection: the server answers or hangs up, and keeps serving."""
    path = servers["secondary"]._listeners[0]._unlink[0]  # type: ignore[index]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.recv(4096)                                        # greeting
        try:
            s.sendall(blob + b"\n")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        except (BrokenPipeError, ConnectionResetError):
            got = b""
    for line in got.split(b"\r\n")[:-1]:
        check_reply(line + b"\r\n")
    with QMPClient(timeout=5).connect(path) as c:
        assert c.execute("query-replication")["role"] == "secondary"


def test_regression_examples() -> None:
    """Inputs kept from fuzzing and from QEMU's own parser tests: each must get a reply."""
    server = QMPServer([], name="t")
    proto = negotiated(server)
    for raw in (b'{"execute": "query-version", "id": {"a": [1, 2.5, null]}}',
                b'{"execute": "query-version", "arguments": []}',
                b'{"execute": "query-version", "execute": "x"}',
                b'{"execute": 1e400}', b'"\\ud800"', b"[" * 100000 + b"]" * 100000,
                b'{"execute": "qmp_capabilities"}'):
        check_reply(proto.handle(raw))
