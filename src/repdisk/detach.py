"""Starting a process detached from its caller: the one way nodes and controllers go to the
background (``repdisk primary|secondary --background``, ``repdisk controller --background``).

:func:`launch` starts the command with ``setsid -f``, which forks before the command
starts, so the command runs in a session of its own and is never a child of the caller:
the caller may exit at once (nbdkit 1.32 started as a child, even in a new session, was
seen to shut itself down as soon as its starter exited).  A shell writes the pid file and
then execs the command (same pid), so a process that fails during start-up is noticed
at once by :func:`wait`, not after its timeout.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import psutil

from repdisk.errors import RepdiskError

__all__ = ["StartFailed", "launch", "pidfile_alive", "wait", "watch"]


class StartFailed(RepdiskError):
    """A detached process did not get ready: it ended first (``exited``), or time ran out
    (it is left running; the caller decides)."""

    def __init__(self, exited: bool) -> None:
        super().__init__("the process ended at start-up" if exited else
                         "the process did not get ready in time")
        self.exited = exited


def launch(cmd: list[str], pidfile: str, output: str) -> None:
    """Start ``cmd`` detached (see the module docstring), its pid in ``pidfile`` before it
    runs, its stdout and stderr appended to ``output``; returns once it is started."""
    sh = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', pidfile, *cmd]
    with open(output, "ab") as out:
        subprocess.run(["setsid", "-f", *sh], stdin=subprocess.DEVNULL, stdout=out,
                       stderr=out, check=True)


def pidfile_alive(pidfile: str) -> bool | None:
    """None while the pid file is not written yet, else whether its process runs."""
    pid = _read_pid(pidfile)
    return None if pid is None else _runs(pid)


def watch(pidfile: str) -> Callable[[], bool | None]:
    """``alive()`` for :func:`wait`: None until ``pidfile`` names a pid, then whether that
    process runs, even once the file is gone (a process that failed may remove it)."""
    pid: int | None = None

    def alive() -> bool | None:
        nonlocal pid
        if pid is None:
            pid = _read_pid(pidfile)
        return None if pid is None else _runs(pid)
    return alive


def _read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _runs(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: its files are closed)."""
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def wait(alive: Callable[[], bool | None], ready: Callable[[], bool], timeout: float) -> None:
    """Return once ``ready()``; StartFailed as soon as ``alive()`` is False, or after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive() is False:
            raise StartFailed(exited=True)
        if ready():
            return
        time.sleep(0.05)
    raise StartFailed(exited=False)
