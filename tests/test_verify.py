"""Online verify (primary.verify, ``replication-verify``): real nodes, a writing guest.

* A clean pair under a guest that keeps writing reports no range, in both write modes.
* Bytes flipped in the secondary's disk file behind repdisk's back (several places, part
  of a block, a run across a block boundary) are reported exactly, then repaired.
* A verify interrupted by a lost secondary stops, says where and why, and the guest goes on.
* ``repdisk ctl PRI verify repair=true`` on a terminal shows its progress; the last
  verify's numbers are in ``query-replication`` and a controller's metrics.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from typing import Any

import nbd
import pytest

from repdisk.errors import ControlError
from tests.helpers.commands import REPDISK, on_a_terminal
from tests.helpers.nodes import MiB, NodeProc, Nodes, make_disk

SIZE = 32 * MiB
DATA = 24 * MiB     # the guest's data: [0, DATA); the rest stays a hole


def start(nodes: Nodes, **primary_keys: str) -> tuple[NodeProc, NodeProc]:
    sec = nodes.secondary(make_disk(os.path.join(nodes.folder, "sec.img"), SIZE))
    sec.ctl("replication-start", mode="secondary")
    pri = nodes.primary(make_disk(os.path.join(nodes.folder, "pri.img"), SIZE), sec,
                        **primary_keys)
    pri.ctl("replication-start", mode="primary")
    h = pri.client()
    rng = random.Random(7)
    for off in range(0, DATA, MiB):
        h.pwrite(rng.randbytes(MiB), off)
    h.flush()
    h.shutdown()
    return pri, sec


class Guest(threading.Thread):
    """Writes 4 KiB blocks at random into [start, end) until stopped; any error is kept."""

    def __init__(self, pri: NodeProc, start: int = 0, end: int = DATA) -> None:
        super().__init__(daemon=True)
        self.blocks = range(start // 4096, end // 4096)
        self.h = pri.client()
        self.stop = threading.Event()
        self.writes = 0
        self.error: Any = None

    def run(self) -> None:
        rng = random.Random(3)
        try:
            while not self.stop.is_set():
                self.h.pwrite(rng.randbytes(4096), rng.choice(self.blocks) * 4096)
                self.writes += 1
        except nbd.Error as err:
            self.error = err

    def finish(self) -> int:
        self.stop.set()
        self.join()
        self.h.shutdown()
        assert self.error is None, self.error
        return self.writes


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("write_mode", ["sync", "async"])
def test_clean_pair_under_a_writing_guest_reports_nothing(nodes: Nodes, write_mode: str) -> None:
    pri, sec = start(nodes, write_mode=write_mode, resync_rate="max")
    guest = Guest(pri)
    guest.start()
    try:
        time.sleep(0.2)
        results = [pri.ctl("replication-verify")["disks"][0] for _ in range(3)]
    finally:
        writes = guest.finish()
    assert writes > 100, writes
    for r in results:
        assert (r["disk"], r["ranges"], r["bytes"]) == ("disk0", [], 0), r
        assert r["compared"] == DATA          # only the allocated data, not the 32 MiB disk


FLIPS = [(5000, 3), (MiB + 4096 - 2, 5), (7 * MiB, 1), (20 * MiB + 123, 4096)]


def metrics_of(nodes: Nodes, pri: NodeProc, sec: NodeProc) -> list[str]:
    """The verify lines of a controller's query-metrics over the pair (it adopts it)."""
    ctrl = os.path.join(nodes.folder, "ctrl.qmp")
    subprocess.run([REPDISK, "controller", "--primary", pri.control, "--secondary",
                    sec.control, "--control", ctrl, "--initial-sync", "none", "--background"],
                   check=True, capture_output=True, timeout=60)
    try:
        text = subprocess.run([REPDISK, "ctl", ctrl, "query-metrics", "--json"], check=True,
                              capture_output=True, text=True, timeout=60).stdout
    finally:
        with open(ctrl + ".pid") as f:
            os.kill(int(f.read()), 15)
    return [line for line in json.loads(text).splitlines()
            if line.startswith("repdisk_verify_")]


@pytest.mark.timeout(120)
def test_flipped_bytes_are_reported_exactly_and_repaired(nodes: Nodes) -> None:
    pri, sec = start(nodes)
    with open(sec.disks[0], "r+b") as f:              # behind repdisk's back
        for offset, length in FLIPS:
            f.seek(offset)
            old = f.read(length)
            f.seek(offset)
            f.write(bytes(b ^ 0xFF for b in old))
        f.seek(30 * MiB)                               # where the primary holds a hole
        f.write(b"\x01\x02")
    guest = Guest(pri, 8 * MiB, 16 * MiB)           # where no byte was flipped
    guest.start()
    try:
        got = pri.ctl("replication-verify",
                      runs=[[DATA, SIZE - DATA]])["disks"][0]   # where the secondary has data
    finally:
        guest.finish()
    expected = FLIPS + [(30 * MiB, 2)]
    assert got["ranges"] == [list(r) for r in expected]
    assert got["bytes"] == sum(n for _, n in expected)
    assert "repaired" not in got
    assert f"verify disk0: 5 ranges ({got['bytes']} bytes) differ" in pri.log_text()
    last = pri.ctl("query-replication")["disks"][0]["last_verify"]
    assert (last["ranges"], last["bytes"], last["repaired"]) == (5, got["bytes"], 0)
    assert metrics_of(nodes, pri, sec)[:2] == [f'repdisk_verify_out_of_sync_bytes{{disk="disk0"}} '
                                               f'{got["bytes"]}',
                                               'repdisk_verify_out_of_sync_ranges{disk="disk0"} 5']

    fixed = pri.ctl("replication-verify", runs=[[DATA, SIZE - DATA]], repair=True)["disks"][0]
    assert fixed["ranges"] == got["ranges"] and fixed["repaired"] >= got["bytes"]
    again = pri.ctl("replication-verify", runs=[[DATA, SIZE - DATA]])["disks"][0]
    assert again["ranges"] == []
    pri.ctl("replication-do-checkpoint")
    sec.ctl("replication-do-checkpoint")
    pri.ctl("replication-resume")
    assert file_bytes(sec.disks[0]) == file_bytes(pri.disks[0])


@pytest.mark.timeout(120)
def test_verify_interrupted_by_a_lost_secondary_stops_and_says_so(nodes: Nodes) -> None:
    pri, sec = start(nodes, resync_rate="4M", timeout="1s")   # about 6 s for 24 MiB
    outcome: dict[str, Any] = {}

    def verify() -> None:
        try:
            outcome["reply"] = pri.ctl("replication-verify")
        except ControlError as err:
            outcome["error"] = str(err)

    t = threading.Thread(target=verify)
    t.start()
    time.sleep(1.5)
    sec.kill()
    t.join(30)
    assert not t.is_alive()
    assert "reply" not in outcome, outcome
    message = outcome["error"]
    assert "disk0: verify stopped at " in message and f" of {DATA} bytes: the secondary " \
        in message and "0 differing ranges found before it: []" in message, message
    q = pri.ctl("query-replication")["disks"][0]
    assert q["degraded"] and q["stage"] == "running"
    h = pri.client()                                   # the guest goes on, locally
    h.pwrite(b"\x44" * 4096, 0)
    assert h.pread(4096, 0) == b"\x44" * 4096
    h.shutdown()
    with pytest.raises(ControlError, match="cannot verify: the secondary is not in sync"):
        pri.ctl("replication-verify")
    assert "Traceback" not in pri.log_text()


@pytest.mark.parametrize("via", ["node", "controller"])
def test_verify_on_a_terminal_shows_progress(nodes: Nodes, via: str) -> None:
    pri, sec = start(nodes, resync_rate="16M")
    with open(sec.disks[0], "r+b") as f:
        f.seek(MiB)
        byte = f.read(1)[0]
        f.seek(MiB)
        f.write(bytes([byte ^ 1]))
    if via == "node":
        text = on_a_terminal([REPDISK, "ctl", pri.control, "verify", "repair=true"])
    else:
        ctrl = os.path.join(nodes.folder, "ctrl.qmp")
        subprocess.run([REPDISK, "controller", "--primary", pri.control, "--secondary",
                        sec.control, "--control", ctrl, "--initial-sync", "none",
                        "--heartbeat", "0.2s", "--background"],
                       check=True, capture_output=True, timeout=60)
        try:
            text = on_a_terminal([REPDISK, "ctl", ctrl, "controller-verify", "repair=true"])
        finally:
            with open(ctrl + ".pid") as f:
                os.kill(int(f.read()), 15)
    assert "disk0 verify: 24.0/24.0 MiB (100%)" in text, text
    assert "  ranges:\r\n    [1048576, 1]\r\n" in text, text
    assert "  repaired  " in text, text
    assert pri.ctl("replication-verify")["disks"][0]["ranges"] == []
