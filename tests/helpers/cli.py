"""A pair started with ``repdisk secondary|primary --background`` in one folder, driven with
the ``repdisk`` command (the ``cli_pair`` fixture in tests/conftest.py makes one)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

import psutil

from tests.helpers.commands import REPDISK, run
from tests.helpers.nodes import MiB

SIZE = 8 * MiB   # each disk of a cli pair


@dataclass
class Pair:
    folder: str

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def repdisk(self, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = run([REPDISK, *argv], self.folder, timeout=60)
        if ok:
            assert result.returncode == 0, result.stdout + result.stderr
            assert "Traceback" not in result.stderr
        return result


def start_cli_pair(pair: Pair) -> tuple[str, str]:
    out = pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp",
                       "--nbd-socket", "sec.sock", "--background", "--pidfile", "sec.pid").stdout
    assert re.fullmatch(r"repdisk secondary: serving \(pid \d+\), control sec\.qmp\n", out)
    pair.repdisk(*primary_argv(pair))
    return pair.path("pri.qmp"), pair.path("sec.qmp")


def primary_argv(pair: Pair) -> tuple[str, ...]:
    """``repdisk primary`` of a cli pair (again after a kill: the stale files are its own)."""
    return ("primary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket", "pri.sock",
            "--secondary", f"nbd+unix:///replica?socket={pair.path('sec.sock')}",
            "--background", "--pidfile", "pri.pid")


def replicating_pair(pair: Pair) -> tuple[str, str, str]:
    """:func:`start_cli_pair`, then replication started (secondary first): the primary's
    and the secondary's control sockets and the guest's NBD URI."""
    pri, sec = start_cli_pair(pair)
    assert pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    assert pair.repdisk("ctl", pri, "start", "mode=primary").stdout == "ok\n"
    return pri, sec, f"nbd+unix:///?socket={pair.path('pri.sock')}"


#: ``repdisk secondary`` of a cli pair, restarted by hand (give ``--disk``).
SEC = ("secondary", "--nbd-socket", "sec.sock", "--control", "sec.qmp", "--background",
       "--pidfile", "sec.pid")


def checkpoint(pair: Pair, pri: str, sec: str) -> None:
    """A pair checkpoint by hand: the primary's barrier and hold, the secondary's, resume."""
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert pair.repdisk("ctl", sock, cmd).stdout == "ok\n"


def kill_secondary(pair: Pair) -> None:
    """SIGKILL the pair's secondary and wait until it is gone."""
    with open(pair.path("sec.pid"), encoding="ascii") as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGKILL)
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
