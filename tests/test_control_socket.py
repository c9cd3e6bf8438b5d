"""A node's control socket, spoken to by QEMU's own client and by a misbehaving one.

* ``qemu.qmp.QMPClient`` (asyncio, unchanged) connects to real nodes, negotiates, lists the
  commands and runs every one of them, and receives the events of a checkpoint.
* Bad input (malformed JSON, unknown commands, wrong types, a huge line, clients that vanish
  mid-command) is answered or dropped while a libnbd writer keeps writing through the
  primary: the writer sees no error and every byte it wrote arrives on the secondary.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import time
from typing import Any

import nbd
from qemu.qmp import ExecuteError, QMPClient

from repdisk.qmp.client import QMPClient as BlockingClient
from tests.helpers.nodes import SIZE, MiB, NodeProc, Nodes, make_disk, read_export

# Arguments for the commands that need some; every other listed command runs without any.
ARGS: dict[str, dict[str, Any]] = {
    "replication-start": {},          # filled in per node (its mode)
    "replication-stop": {"failover": False},
    "replication-fence": {"reason": "test"},
    "replication-mark-dirty": {"offset": 0, "length": 4096},
}
# Run last, in this order: they end replication on the node.
LAST = ["replication-stop", "replication-fence", "replication-promote", "replication-demote"]


def start_nodes(nodes: Nodes, **primary_keys: str) -> tuple[NodeProc, NodeProc]:
    sec = nodes.secondary(make_disk(os.path.join(nodes.folder, "sec.img"), SIZE))
    pri = nodes.primary(make_disk(os.path.join(nodes.folder, "pri.img"), SIZE), sec,
                        **primary_keys)
    return pri, sec


async def connect(path: str) -> tuple[QMPClient, list[str]]:
    """A negotiated qemu.qmp client and the commands the node lists."""
    qmp = QMPClient("test")
    await qmp.connect(path)
    assert qmp.greeting is not None
    assert set(qmp.greeting._asdict()["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    return qmp, [c["name"] for c in await qmp.execute("query-commands")]


async def run(qmp: QMPClient, name: str, args: dict[str, Any], answers: dict[str, Any]) -> None:
    try:
        answers[name] = await qmp.execute(name, args or None)
    except ExecuteError as err:
        answers[name] = err            # answered with a QMP error: recorded for the test


async def run_every_command(pri_path: str, sec_path: str) -> list[tuple[dict[str, Any],
                                                                        list[str]]]:
    """Start the pair (secondary first), run each node's listed commands once, those that
    end replication last (primary, then secondary); each node's answers and event names."""
    nodes = [await connect(pri_path), await connect(sec_path)]
    answers: list[dict[str, Any]] = [{}, {}]
    try:
        for i, mode in ((1, "secondary"), (0, "primary")):
            await run(nodes[i][0], "replication-start", {"mode": mode}, answers[i])
        for (qmp, names), got in zip(nodes, answers, strict=True):
            for name in names:
                if name not in LAST and name not in got and name != "qmp_capabilities":
                    await run(qmp, name, ARGS.get(name, {}), got)
        for (qmp, names), got in zip(nodes, answers, strict=True):
            for name in (n for n in LAST if n in names):
                await run(qmp, name, ARGS.get(name, {}), got)
            await run(qmp, "query-version", {}, got)     # still talking
        return [(got, [e["event"] for e in qmp.events.clear()])
                for (qmp, _), got in zip(nodes, answers, strict=True)]
    finally:
        for qmp, _ in nodes:
            await qmp.disconnect()


def test_qemu_qmp_client_runs_every_command(nodes: Nodes) -> None:
    pri, sec = start_nodes(nodes)
    (pri_answers, pri_events), (sec_answers, sec_events) = asyncio.run(
        run_every_command(pri.control, sec.control))
    core = {"query-replication", "replication-start", "replication-do-checkpoint",
            "replication-resume", "replication-get-error", "replication-stop",
            "replication-resync", "query-commands", "query-version"}
    assert core <= set(pri_answers) and core <= set(sec_answers)
    for answers in (pri_answers, sec_answers):
        for name in ("replication-start", "replication-do-checkpoint", "replication-get-error",
                     "query-replication", "query-version"):
            assert not isinstance(answers[name], ExecuteError), (name, answers[name])
    assert sec_answers["query-replication"]["role"] == "secondary"
    assert pri_answers["replication-resync"] == {"bytes": 0}
    assert not isinstance(pri_answers["replication-resume"], ExecuteError)
    assert isinstance(sec_answers["replication-resume"], ExecuteError)   # primary only
    for events in (pri_events, sec_events):
        assert {"REPLICATION_STAGE_CHANGED", "CHECKPOINT_COMPLETED"} <= set(events), events
    for node in (pri, sec):
        assert "Traceback" not in node.log_text()


# -- bad input while a writer writes ---------------------------------------------------------

class Raw:
    """A hand-driven control connection: bytes out, lines in."""

    def __init__(self, path: str, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        assert "QMP" in self.reply()
        if negotiate:
            assert self.ask({"execute": "qmp_capabilities"}) == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            line = self.file.readline()
            assert line, "the server closed the connection"
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def ask(self, msg: Any) -> dict[str, Any]:
        self.send(json.dumps(msg).encode() + b"\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        try:
            return self.file.readline() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def error(reply: dict[str, Any], cls: str, desc: str, msg_id: Any | None = None) -> None:
    assert reply.get("error", {}).get("class") == cls, reply
    assert desc in reply["error"]["desc"], reply
    assert reply.get("id") == msg_id


class Writer(threading.Thread):
    """Writes 4-64 KiB blocks through the primary until stopped; counts its errors."""

    def __init__(self, node: NodeProc) -> None:
        super().__init__(daemon=True)
        self.h = node.client()
        self.model = bytearray(SIZE)
        self.writes = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(42)
        while not self.stop.is_set():
            data = rng.randbytes(rng.randrange(4096, 65536))
            off = rng.randrange(SIZE - len(data))
            try:
                self.h.pwrite(data, off)
                self.model[off:off + len(data)] = data
                self.writes += 1
            except nbd.Error as err:
                self.errors.append(str(err))
        try:
            self.h.flush()
        except nbd.Error as err:
            self.errors.append(str(err))
        self.h.shutdown()


def abuse(path: str, safe_slow_command: str) -> None:
    """Every kind of bad input, on fresh connections to one control socket."""
    c = Raw(path, negotiate=False)
    error(c.ask({"execute": "query-replication", "id": 1}), "CommandNotFound",
          "Expecting capabilities negotiation", 1)
    assert c.ask({"execute": "qmp_capabilities", "id": 2}) == {"return": {}, "id": 2}
    error(c.ask({"execute": "qmp_capabilities", "id": 3}), "CommandNotFound",
          "negotiation is already complete", 3)
    c.send(b'{"execute": "query-replication"\n')                       # malformed JSON
    error(c.reply(), "GenericError", "JSON parse error")
    for text in (b'{"execute": "query-replication",}\n', b"nul\n", b'{"a": NaN}\n',
                 b'{"execute": "query-version", "execute": "x"}\n'):
        error(c.reply() if c.send(text) is None else {}, "GenericError", "JSON parse error")
    for junk, desc in (([1, 2], "must be a JSON object"), ("text", "must be a JSON object"),
                       ({"exec": "x"}, "'exec' is unexpected"), ({}, "lacks member 'execute'"),
                       ({"execute": 5}, "'execute' must be a string")):
        error(c.ask(junk), "GenericError", desc)
    error(c.ask({"execute": "no-such-thing", "id": "a"}), "CommandNotFound",
          "The command no-such-thing has not been found", "a")
    for args, desc in (({"failover": "yes"}, "Parameter 'failover' expects boolean"),
                       ({}, "Parameter 'failover' is missing"),
                       ({"failover": True, "extra": 1}, "Parameter 'extra' is unexpected")):
        error(c.ask({"execute": "replication-stop", "arguments": args, "id": 7}),
              "GenericError", desc, 7)
    error(c.ask({"execute": "replication-start", "arguments": {"mode": 5}, "id": 8}),
          "GenericError", "Parameter 'mode' expects string", 8)
    error(c.ask({"execute": "query-replication", "arguments": [1], "id": 9}),
          "GenericError", "'arguments' must be an object", 9)
    assert c.ask({"execute": "query-version", "id": 10})["id"] == 10   # still usable
    c.close()

    c = Raw(path)                                  # a huge line: answered, then dropped
    c.send(b'{"execute": "' + b"x" * (2 * MiB) + b'"}\n')
    error(c.reply(), "GenericError", "QMP input longer than")
    assert c.closed_by_server()
    c.close()

    for data in (b"", b'{"execute": "qmp_capa', b'{"execute": "qmp_capabilities"}\n'
                 + f'{{"execute": "{safe_slow_command}"}}\n'.encode()):
        c = Raw(path, negotiate=False)             # vanishes at once / mid-text / mid-command
        c.send(data)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        c.close()                                  # abortive close: RST
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)                                # never reads its greeting
    s.close()


def test_bad_control_input_never_disturbs_io(nodes: Nodes) -> None:
    pri, sec = start_nodes(nodes)
    sec.ctl("replication-start", mode="secondary")
    pri.ctl("replication-start", mode="primary")
    writer = Writer(pri)
    watcher = BlockingClient(timeout=10).connect(sec.control)
    writer.start()
    try:
        while writer.writes < 10:
            time.sleep(0.01)
        during = writer.writes
        for _ in range(2):
            abuse(sec.control, "replication-do-checkpoint")
            abuse(pri.control, "query-replication")
            assert watcher.execute("query-replication")["disks"][0]["stage"] == "running"
        assert writer.writes > during + 10           # it kept writing all along
    finally:
        writer.stop.set()
        writer.join(30)
        watcher.close()
    assert writer.errors == []
    for node in (pri, sec):
        q = node.ctl("query-replication")["disks"][0]
        assert q["stage"] == "running" and q["error"] is None
    assert not pri.ctl("query-replication")["disks"][0]["degraded"]
    assert read_export(pri) == writer.model
    assert read_export(sec, "replica") == writer.model       # sync mode: all arrived
    for node in (pri, sec):
        assert "Traceback" not in node.log_text()
