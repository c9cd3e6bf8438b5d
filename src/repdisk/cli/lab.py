"""``repdisk lab``: a working primary/secondary pair in one folder, in one command.

Creates two sparse disks, starts the secondary and then the primary on Unix
sockets, starts replication in the right order (secondary first), and prints the
exact QEMU option to attach a guest and the control commands to try.
``repdisk lab --down`` stops both nodes and leaves no process behind.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from repdisk import units
from repdisk.cli import nodeproc
from repdisk.cli.nodeproc import PLUGIN
from repdisk.errors import ConfigError, RepdiskError
from repdisk.qmp.client import execute

ROLES = ("secondary", "primary")  # start order; stop order is the reverse
MIN_SIZE = 1 << 20                # the welcome's commands write 1M


def paths(folder: str) -> dict[str, dict[str, str]]:
    folder = os.path.abspath(folder)
    out = {}
    for role, short in (("primary", "pri"), ("secondary", "sec")):
        out[role] = {k: os.path.join(folder, f"{short}.{ext}") for k, ext in
                     (("disk", "img"), ("control", "qmp"), ("nbd", "sock"),
                      ("pid", "pid"), ("log", "log"))}
    return out


def node_keys(p: dict[str, dict[str, str]], role: str, write_mode: str) -> list[tuple[str, str]]:
    keys = [("role", role), ("disk", p[role]["disk"]), ("control", p[role]["control"])]
    if role == "primary":
        sec = nodeproc.Listen(socket=p["secondary"]["nbd"])
        keys += [("secondary", sec.uri("replica")), ("write-mode", write_mode)]
    return keys


def up(folder: str, size: str = "1G", write_mode: str = "sync",
       plugin: str | None = None) -> int:
    nbytes = units.parse_size("--size", size)
    if nbytes < MIN_SIZE or nbytes % 512:
        raise ConfigError("--size", f"{size} is {nbytes} bytes; a lab disk is at least 1M and "
                                    "a multiple of 512 bytes: give a unit, e.g. --size 1G")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError("--dir", f"{folder} is a file, not a folder: give a new folder or "
                                   "the folder of a lab")
    os.makedirs(folder, exist_ok=True)
    p = paths(folder)
    for role in ROLES:
        if os.path.exists(p[role]["pid"]):
            raise RepdiskError(f"a lab is already running in {folder} (found {p[role]['pid']}); "
                               f"run: {command_name()} lab --down --dir {folder}")
    for role in ROLES:
        if not os.path.exists(p[role]["disk"]):
            with open(p[role]["disk"], "wb") as f:
                f.truncate(nbytes)
    try:
        for role in ROLES:
            listen = nodeproc.Listen(socket=p[role]["nbd"])
            cmd = nodeproc.nbdkit_command(plugin or PLUGIN, node_keys(p, role, write_mode), listen)
            nodeproc.start_background(cmd, p[role]["pid"], p[role]["log"], p[role]["control"],
                                      listen)
            execute(p[role]["control"], "replication-start", {"mode": role})
    except RepdiskError:
        down(folder, quiet=True)
        raise
    _print_welcome(p)
    return 0


def command_name() -> str:
    """How to run this ``repdisk`` from a shell, as printed in next steps: ``repdisk`` when
    that name on PATH is this very command, else the full path of the one next to this
    interpreter (after ``make setup`` it is ``.venv/bin/repdisk``, which is not on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "repdisk")
    on_path = shutil.which("repdisk")
    if on_path and os.path.realpath(on_path) == os.path.realpath(here):
        return "repdisk"
    return shlex.quote(here) if os.path.exists(here) else "repdisk"


def _print_welcome(p: dict[str, dict[str, str]]) -> None:
    pri, sec = p["primary"], p["secondary"]
    guest = nodeproc.Listen(socket=pri["nbd"]).uri()
    repdisk = command_name()
    pq, sq = shlex.quote(pri["control"]), shlex.quote(sec["control"])
    print(f"""repdisk lab is up: primary {pri['disk']} -> secondary {sec['disk']}

Attach a guest to the primary:
  qemu-system-x86_64 ... -drive file={guest},format=raw,if=virtio,cache=none

Try:
  {repdisk} status {pq} {sq}
  qemu-io -f raw -c 'write -P 0x22 0 1M' '{guest}'
  {repdisk} ctl {pq} checkpoint \\
    && {repdisk} ctl {sq} checkpoint \\
    && {repdisk} ctl {pq} resume
  {repdisk} ctl {sq} failover        # the secondary takes over
  qemu-img info '{nodeproc.Listen(socket=sec['nbd']).uri('active')}'
Stop it:
  {repdisk} lab --down --dir {shlex.quote(os.path.dirname(pri['disk']))}""")


def _stop(files: dict[str, str]) -> bool:
    """Stop the node of the lab's pid file, else one restarted by hand on the lab's control
    socket (with a pid file of its own: the README's fail-back); True if one ran."""
    if nodeproc.stop_pidfile(files["pid"]):
        return True
    try:
        found = nodeproc.serving(files["control"])
    except RepdiskError:        # not a node's socket: nothing of the lab's runs on it
        return False
    return bool(found and found.stop())


def down(folder: str, quiet: bool = False, expect_lab: bool = False) -> int:
    """Stop the lab's nodes; with ``expect_lab`` (``repdisk lab --down``) a folder that
    holds no lab is an error (a forgotten ``--dir``), not "stopped nothing"."""
    p = paths(folder)
    if expect_lab and not any(os.path.exists(p[role][key])
                              for role in ROLES for key in ("disk", "pid")):
        raise RepdiskError(f"no lab in {os.path.abspath(folder)}: give the folder it was "
                           f"brought up in, {command_name()} lab --down --dir DIR")
    stopped = [role for role in reversed(ROLES) if _stop(p[role])]
    for role in ROLES:
        for key in ("nbd", "control"):
            if os.path.exists(p[role][key]):
                os.unlink(p[role][key])
    if not quiet:
        print(f"repdisk lab: stopped {', '.join(stopped) or 'nothing (no node was running)'}")
    return 0
