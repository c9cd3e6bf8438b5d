"""The ``repdisk`` command, QEMU's tools and a pseudo-terminal, run as a user runs them; a
process stopped, and a lab's processes found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPDISK = os.path.join(os.path.dirname(sys.executable), "repdisk")


def run(argv: list[str], cwd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def qemu(*argv: str) -> str:
    """Run a QEMU tool; its output, or a failure that shows what it printed."""
    run = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{argv} failed ({run.returncode}): {run.stdout}{run.stderr}"
    return run.stdout


def on_a_terminal(argv: list[str]) -> str:
    """What ``argv`` prints on a pseudo-terminal (stdout and stderr); it must exit 0."""
    master, slave = os.openpty()
    try:
        proc = subprocess.run(argv, stdin=slave, stdout=slave, stderr=slave, timeout=60)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def sigstop(proc: subprocess.Popen) -> None:
    """SIGSTOP ``proc`` and wait until the kernel has really stopped it (signals are async)."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    while stat.read_text().rpartition(")")[2].split()[0] != "T":
        time.sleep(0.005)


def lab_processes(folder: str) -> list[psutil.Process]:
    """Live nbdkit processes whose command line names the lab folder, or that run in it
    (a node started there with relative paths); zombies are dead."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status", "cwd"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["name"] != "nbdkit":
            continue
        if proc.info["cwd"] == folder or any(folder in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found
