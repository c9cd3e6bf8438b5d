"""A node started with ``--background`` outlives the launcher's parent half.

nbdkit 1.32.5 arms ``PR_SET_PDEATHSIG(SIGTERM)`` at start-up even without
``--exit-with-parent``, so an nbdkit whose parent was still alive when it started was
killed the moment that parent exited (detach.py).  ``setsid -f``'s returning half usually
exits first; on a loaded machine it sometimes did not, and a node died at start-up with
nothing in its log.  Here the race is made certain: a ``setsid`` found first on PATH
whose returning half exits only after a second (the one thing mocked: the scheduler's
timing), while the real ``repdisk secondary --background`` starts a real nbdkit.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

import psutil

from tests.helpers.commands import REPDISK, run

SLOW_SETSID = """#!/usr/bin/python3
import os, sys, time
assert sys.argv[1] == "-f"
if os.fork() == 0:
    os.setsid()
    os.execvp(sys.argv[2], sys.argv[2:])
time.sleep(%(delay)s)
"""
DELAY = 1.0


def test_a_background_node_survives_a_slow_exit_of_setsids_parent_half(tmp_path) -> None:
    folder = str(tmp_path)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    setsid = fakebin / "setsid"
    setsid.write_text(SLOW_SETSID % {"delay": DELAY})
    setsid.chmod(setsid.stat().st_mode | stat.S_IXUSR)
    subprocess.run(["truncate", "-s", "16M", "s.img"], cwd=folder, check=True)
    env = dict(os.environ, PATH=f"{fakebin}:{os.environ['PATH']}")
    argv = [REPDISK, "secondary", "--disk", "s.img", "--control", "s.qmp",
            "--nbd-socket", "s.sock", "--background", "--pidfile", "s.pid", "--log", "s.log"]
    started = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=60,
                             env=env, stdin=subprocess.DEVNULL)
    pid = 0
    try:
        assert started.returncode == 0, started.stderr
        with open(os.path.join(folder, "s.pid")) as f:
            pid = int(f.read())
        node = psutil.Process(pid)
        assert node.name() == "nbdkit"
        # The slow parent half has exited by now (the start waited for it).
        time.sleep(DELAY)
        assert node.status() != psutil.STATUS_ZOMBIE, (tmp_path / "s.log").read_text()
        status = run([REPDISK, "status", "s.qmp"], folder)
        assert status.returncode == 0 and "secondary" in status.stdout, \
            status.stdout + status.stderr
    finally:
        if pid:
            run(["kill", str(pid)], folder)
