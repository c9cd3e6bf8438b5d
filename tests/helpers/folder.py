"""Nodes and a controller run with the ``repdisk`` command in one folder, by name (NAME.qmp,
NAME.sock, NAME.pid, NAME.log), as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

REPDISK = os.path.join(os.path.dirname(sys.executable), "repdisk")
MiB = 1 << 20

def repdisk(folder: str, *argv: str) -> str:
    """``repdisk ARGV`` run in ``folder``; its output (a failure fails the test)."""
    run = subprocess.run([REPDISK, *argv], cwd=folder, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, f"repdisk {' '.join(argv)}: {run.stderr}{run.stdout}"
    return run.stdout


def node(folder: str, role: str, disk: str, name: str, *keys: str) -> None:
    """A background node NAME.qmp serving NAME.sock, its pid and log NAME.pid, NAME.log."""
    repdisk(folder, role, "--disk", disk, "--control", f"{name}.qmp", "--nbd-socket",
            f"{name}.sock", "--background", "--pidfile", f"{name}.pid", "--log", f"{name}.log",
            *keys)


def controller(folder: str, secondary: str = "sec.qmp") -> None:
    """A fast controller ctl.qmp: pri.qmp is --primary, ``secondary`` --secondary."""
    repdisk(folder, "controller", "--primary", "pri.qmp", "--secondary", secondary,
            "--control", "ctl.qmp", "--interval", "1s", "--heartbeat", "100ms",
            "--heartbeat-timeout", "1.2s", "--background", "--pidfile", "ctl.pid",
            "--log", "ctl.log")


def kill9(folder: str, name: str) -> None:
    """kill -9 the process of NAME.pid, and wait until it is gone."""
    with open(os.path.join(folder, f"{name}.pid")) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)


def wait(folder: str, pred: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
    """ctl.qmp's query-controller once ``pred`` holds for it (else the test fails)."""
    deadline = time.monotonic() + timeout
    q: Any = None
    while time.monotonic() < deadline:
        run = subprocess.run([REPDISK, "ctl", "ctl.qmp", "query-controller", "--json"],
                             cwd=folder, capture_output=True, text=True, timeout=60)
        q = json.loads(run.stdout) if run.returncode == 0 else None
        if q is not None and pred(q):
            return q
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:g}s: {q and q['state']}")


def qemu_io(folder: str, uri: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri], cwd=folder, check=True,
                   capture_output=True, timeout=60)
