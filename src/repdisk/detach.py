"""Starting a process detached from its caller: the one way nodes and controllers go to the
background (``repdisk primary|secondary --background``, ``repdisk controller --background``).

:func:`launch` starts the command with ``setsid -f``, which forks before the command
starts, so the command runs in a session of its own and is never a child of the caller,
and the caller may exit at once.  A shell writes the pid file and then execs the command
(same pid), so a process that fails during start-up is noticed at once by :func:`wait`,
not after its timeout.

The shell execs the command only once its own parent, the half of ``setsid -f`` that
returns to the caller, has exited: nbdkit 1.32.5 (Debian 12's) arms
``PR_SET_PDEATHSIG(SIGTERM)`` at start-up whether or not ``--exit-with-parent`` was
given (its server/main.c lost the option's guard), so an nbdkit that got that far
before its parent exited was killed with SIGTERM the moment it did: a node that died
at start-up without a word in its log, on a loaded machine.  Once the parent has exited
the shell's parent is init (or a subreaper), and the signal is never sent.
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


#: The detached shell: write its pid, wait until its parent (``setsid -f``'s returning
#: half, if ``$PPID`` is still that) has exited, then become the command.
_EXEC_ALONE = ('echo $$ > "$0" || exit\n'
               'while [ "$(cat /proc/$PPID/comm 2>/dev/null)" = setsid ] '
               '&& read -r _ _ _ ppid _ < /proc/$$/stat && [ "$ppid" = "$PPID" ]; do\n'
               '  sleep 0.01\n'
               'done\n'
               'exec "$@"')


def launch(cmd: list[str], pidfile: str, output: str) -> None:
    """Start ``cmd`` detached (see the module docstring), its pid in ``pidfile`` before it
    runs, its stdout and stderr appended to ``output``; returns once it is started."""
    sh = ["sh", "-c", _EXEC_ALONE, pidfile, *cmd]
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
