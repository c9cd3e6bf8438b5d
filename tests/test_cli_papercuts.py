"""What a user sees from `repdisk` when things are not as planned (issues 14 and 15).

Every test drives the real command (`.venv/bin/repdisk`) in a fresh folder against real
nodes and checks the exit status, that no Python traceback is shown, and that a failure is
one line:

* a closed stdout (`repdisk status ... | head -1`) ends every subcommand quietly;
* Ctrl-C against a node that does not answer (SIGSTOPped) is one line and status 130;
* a refused start leaves a running node's pid file, log and sockets as they were;
* a folder that does not exist is one line saying what to do, in both start modes;
* a request the node refuses on purpose is one line in its log, not a traceback;
* sizes and durations with units in `repdisk ctl` arguments, human units in its table;
* `repdisk status` shows FENCED (why), SUSPENDED (since, why), roles, and --json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nbd
import psutil
import pytest

from repdisk import units
from repdisk.cli import main as cli
from repdisk.cli import nodeproc
from repdisk.cli.status import controller_lines
from repdisk.cli.updown import stop_warning
from repdisk.errors import ConfigError
from tests.helpers.cli import (
    SEC,
    Pair,
    checkpoint,
    kill_secondary,
    primary_argv,
    replicating_pair,
    start_cli_pair,
)
from tests.helpers.commands import REPDISK, qemu, run
from tests.helpers.nodes import MiB, read_file


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


# -- a closed stdout ----------------------------------------------------------------------------

def run_with_closed_stdout(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run with a stdout pipe whose reader is already gone: every write fails with EPIPE
    (what `| head -1` does once it has its line, here without a race)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(argv, cwd=cwd, stdout=w, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
    finally:
        os.close(w)


def test_closed_stdout_ends_every_subcommand_quietly(cli_pair: Pair) -> None:
    pri, sec = start_cli_pair(cli_pair)
    for argv in (["status", pri, sec], ["status", "--json", pri], ["ctl", sec, "status"],
                 ["ctl", pri, "query-commands", "--json"], ["ctl", sec, "start",
                                                            "mode=secondary"],
                 ["--help"], ["ctl", "--help"]):
        result = run_with_closed_stdout([REPDISK, *argv], cli_pair.folder)
        assert (result.returncode, result.stderr) == (cli.EXIT_STDOUT_CLOSED, ""), argv
    # the `start` above ran: its answer was lost, not the command
    assert "running" in cli_pair.repdisk("status", sec).stdout
    # and as a user types it: the first line, nothing on stderr, no "unreachable"
    piped = subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"{REPDISK} status {pri} {sec} | head -1"], cwd=cli_pair.folder,
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode in (0, cli.EXIT_STDOUT_CLOSED)
    assert piped.stderr == "" and "unreachable" not in piped.stdout
    assert re.match(r"primary +disk0 +none", one_line(piped.stdout))


# -- Ctrl-C against a node that does not answer -------------------------------------------------

@pytest.mark.parametrize("argv", [["ctl", "{sec}", "checkpoint"], ["status", "{pri}", "{sec}"],
                                  ["ctl", "{sec}", "query-replication"]],
                         ids=["ctl", "status", "ctl-query"])
def test_ctrl_c_against_a_stopped_node_is_one_line_and_130(cli_pair: Pair, argv) -> None:
    pri, sec = start_cli_pair(cli_pair)
    pid = int(Path(cli_pair.path("sec.pid")).read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: stopped(pid), what="SIGSTOP")
        began = time.monotonic()
        # timeout(1) as the issue tests it: SIGINT after 1 s, the command's own status kept
        result = run(["timeout", "--preserve-status", "-s", "INT", "1", REPDISK,
                      *[a.format(pri=pri, sec=sec) for a in argv]], cli_pair.folder)
        assert time.monotonic() - began < 8
    finally:
        os.kill(pid, signal.SIGCONT)
    no_traceback(result)
    assert result.returncode == cli.EXIT_INTERRUPTED, result.stderr
    if argv[0] == "status" or argv[2] == "query-replication":   # nothing left running
        assert one_line(result.stderr) == "repdisk: interrupted"
    if argv[0] == "status":          # the primary's line came before the wait
        assert re.match(r"primary +disk0", one_line(result.stdout))
    elif argv[2] == "checkpoint":    # the command was sent: it is not called back
        assert one_line(result.stderr) == (f"repdisk: interrupted; checkpoint may still run "
                                           f"in {sec}: interrupting this command does not "
                                           "call it back")
        assert result.stdout == ""


@pytest.mark.parametrize("delay", ["0.05", "0.15", "0.3", "0.6"])
def test_ctrl_c_while_the_command_loads_ends_it_without_a_traceback(tmp_path,
                                                                     delay: str) -> None:
    """Ctrl-C while Python still loads the CLI (libnbd, qemu.qmp): the status of a C tool
    killed by SIGINT, at most one line, never a traceback."""
    result = run(["timeout", "--preserve-status", "-s", "INT", delay, REPDISK, "status",
                  str(tmp_path / "x.qmp")], str(tmp_path))
    if result.stderr.startswith("Fatal Python error: init_import_site"):
        # On a loaded machine 0.05 s can land in the interpreter's own start-up, in the
        # site-packages .pth files it runs (setuptools', the system's), before a line of
        # repdisk runs: Python reports that itself.  No frame of repdisk may be in it.
        assert "src/repdisk/" not in result.stderr and result.returncode != 0, result
        return
    no_traceback(result)
    assert result.returncode in (-signal.SIGINT, cli.EXIT_INTERRUPTED, 1), result
    assert result.stderr in ("", "repdisk: interrupted\n") or result.returncode == 1, result


# -- refused starts -----------------------------------------------------------------------------

def test_refused_start_touches_nothing_of_the_running_node(cli_pair: Pair) -> None:
    """Issue 15's reproduction: the second start is refused; s1's pid file, log, control
    socket and NBD socket stay, and s1 goes on serving."""
    f = cli_pair.path
    cli_pair.repdisk("secondary", "--disk", "sec.img", "--control", "s1.qmp",
                     "--nbd-socket", "s1.sock", "--background")
    try:
        refused_starts_change_nothing(cli_pair)
    finally:
        nodeproc.stop_pidfile(f("s1.qmp.pid"))


def refused_starts_change_nothing(cli_pair: Pair) -> None:
    f = cli_pair.path
    pid_before = Path(f("s1.qmp.pid")).read_text()
    log_before = Path(f("s1.qmp.log")).read_bytes()
    attempts = [  # (argv, the one line)
        (["--control", "s1.qmp", "--nbd-socket", "s3.sock", "--background"],
         rf"repdisk: error: a node already runs with pid file s1\.qmp\.pid \(pid "
         rf"{pid_before.strip()}\): stop it first \(kill \d+\), or give another --pidfile and "
         r"--control"),
        (["--control", "s1.qmp", "--nbd-socket", "s3.sock", "--background", "--pidfile",
          "other.pid"],
         r"repdisk: error: control socket s1\.qmp: a live server answers there; stop it or "
         r"choose another path"),
        (["--control", "s1.qmp", "--nbd-socket", "s3.sock"],          # in the foreground
         r"nbdkit: repdisk: error: control socket s1\.qmp: a live server answers there; stop "
         r"it or choose another path"),
        (["--control", "s2.qmp", "--nbd-socket", "s1.sock", "--background"],
         r"repdisk: error: NBD socket s1\.sock: a live server answers there; stop it or choose "
         r"another path"),
    ]
    for argv, line in attempts:
        result = run([REPDISK, "secondary", "--disk", "sec.img", *argv], cli_pair.folder)
        no_traceback(result)
        assert result.returncode == 1
        assert re.fullmatch(line, one_line(result.stdout + result.stderr)), result.stderr
        assert Path(f("s1.qmp.pid")).read_text() == pid_before
        assert Path(f("s1.qmp.log")).read_bytes() == log_before
        assert not os.path.exists(f("other.pid")) and not os.path.exists(f("s3.sock"))
        assert not os.path.exists(f("s2.qmp"))
    assert nodeproc.Listen(socket=f("s1.sock")).answers()
    assert "secondary" in cli_pair.repdisk("status", "s1.qmp").stdout


@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
def test_missing_folder_is_one_line(cli_pair: Pair, background: bool) -> None:
    result = run([REPDISK, "secondary", "--disk", "sec.img", "--control", "/missing/dir/s.qmp",
                  "--nbd-socket", "s.sock", *(["--background"] if background else [])],
                 cli_pair.folder)
    no_traceback(result)
    assert result.returncode == 1
    prefix = "repdisk: error: --control" if background else "nbdkit: repdisk: error: control"
    assert one_line(result.stderr) == (f"{prefix}: /missing/dir/s.qmp: the folder /missing/dir "
                                       "does not exist: create it (mkdir -p /missing/dir) or "
                                       "choose another path")
    assert sorted(os.listdir(cli_pair.folder)) == ["pri.img", "sec.img"]


# -- the node's log: one line per request refused on purpose ------------------------------------

def test_refused_request_is_one_log_line_and_status_says_fenced(cli_pair: Pair) -> None:
    pri, sec = start_cli_pair(cli_pair)
    cli_pair.repdisk("ctl", sec, "start", "mode=secondary")
    cli_pair.repdisk("ctl", pri, "start", "mode=primary")
    cli_pair.repdisk("ctl", pri, "replication-fence", "reason=lost the failover of epoch 1")
    guest = f"nbd+unix:///?socket={cli_pair.path('pri.sock')}"
    for _ in range(3):
        with pytest.raises(AssertionError, match="Operation not permitted"):
            qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 64k", guest)
    log = Path(cli_pair.path("pri.log")).read_text()
    assert "Traceback" not in log
    refused = [line for line in log.splitlines() if "guest write refused" in line]
    assert len(refused) == 3, log
    assert all(line.endswith("pwrite: error: guest write refused: this node is fenced: lost "
                             "the failover of epoch 1") for line in refused)

    line = one_line(cli_pair.repdisk("status", pri).stdout)
    assert re.match(r"primary +disk0 +FENCED \(lost the failover of epoch 1\) +done +epoch 0",
                    line), line
    q = json.loads(cli_pair.repdisk("status", "--json", pri, sec).stdout)
    assert q[pri]["kind"] == "node" and q[pri]["query"]["fenced"] == \
        "lost the failover of epoch 1"
    assert q[sec]["kind"] == "node" and q[sec]["query"]["role"] == "secondary"


def guarded_pair(cli_pair: Pair) -> None:
    """A replicating pair (pri.qmp, sec.qmp) whose primary holds guest writes after 500 ms
    without contact, its guard armed by a heartbeat (a controller's contact)."""
    f = cli_pair.path
    cli_pair.repdisk(*SEC, "--disk", "sec.img")
    cli_pair.repdisk("primary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                     "pri.sock", "--secondary", f"nbd+unix:///replica?socket={f('sec.sock')}",
                     "--isolation-timeout", "500ms", "--background", "--pidfile", "pri.pid")
    cli_pair.repdisk("ctl", "sec.qmp", "start", "mode=secondary")
    cli_pair.repdisk("ctl", "pri.qmp", "start", "mode=primary")
    cli_pair.repdisk("ctl", "pri.qmp", "replication-heartbeat")


def test_status_shows_a_suspended_primary(cli_pair: Pair) -> None:
    guarded_pair(cli_pair)
    pid = int(Path(cli_pair.path("sec.pid")).read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        def suspended() -> bool:
            return "SUSPENDED" in cli_pair.repdisk("status", "pri.qmp").stdout
        wait_for(suspended, what="SUSPENDED")
        line = one_line(cli_pair.repdisk("status", "pri.qmp").stdout)
        assert re.match(r"primary +disk0 +SUSPENDED \(no contact for \d+\.\d+ m?s with the "
                        r"secondary or the controller: guest writes held until one answers\) "
                        r"+running +epoch 0", line), line
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_suspended_primary_goes_on_once_its_secondary_is_back_and_resynced(
        cli_pair: Pair) -> None:
    """Failure matrix, controller and secondary lost: the primary holds its guest's writes;
    with no controller to come back, restarting the secondary and `ctl PRI resync` (its
    link is contact again) releases them, and nothing held is lost."""
    f = cli_pair.path
    guarded_pair(cli_pair)
    kill_secondary(cli_pair)
    wait_for(lambda: "SUSPENDED" in cli_pair.repdisk("status", "pri.qmp").stdout,
             what="SUSPENDED")
    held = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M",
                             f"nbd+unix:///?socket={f('pri.sock')}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    time.sleep(1)
    assert held.poll() is None, "a suspended primary acknowledged a write"
    cli_pair.repdisk(*SEC, "--disk", "sec.img")
    cli_pair.repdisk("ctl", "sec.qmp", "start", "mode=secondary")
    assert cli_pair.repdisk("ctl", "pri.qmp", "resync").stdout.startswith("bytes  ")
    assert held.wait(30) == 0, held.stdout.read() if held.stdout else ""
    assert "SUSPENDED" not in cli_pair.repdisk("status", "pri.qmp").stdout
    for sock, cmd in (("pri.qmp", "checkpoint"), ("sec.qmp", "checkpoint"),
                      ("pri.qmp", "resume")):
        assert cli_pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    assert read_file(f("sec.img"))[MiB:2 * MiB] == b"\x5a" * MiB


def test_status_shows_a_secondary_that_no_primary_replicates_into(cli_pair: Pair) -> None:
    """A running secondary says NO PRIMARY while no primary is connected: before its primary
    starts, after it died (kill -9), after it stopped replicating; not while one is."""
    pri, sec = start_cli_pair(cli_pair)
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"

    def no_primary() -> bool:
        line = cli_pair.repdisk("status", sec).stdout
        if re.match(r"secondary +disk0 +running +epoch 0  INCONSISTENT", line):
            return False
        assert re.match(r"secondary +disk0 +running +epoch 0  NO PRIMARY \(for \d+s\)  "
                        "INCONSISTENT", line), line
        return True

    assert no_primary()
    for end in ("kill", "stop"):
        assert cli_pair.repdisk("ctl", pri, "start", "mode=primary").stdout == "ok\n"
        assert not no_primary()
        assert json.loads(cli_pair.repdisk("ctl", sec, "query-replication", "--json").stdout)[
            "disks"][0]["no_primary_since"] is None
        if end == "kill":
            os.kill(int(Path(cli_pair.path("pri.pid")).read_text()), signal.SIGKILL)
            wait_for(no_primary, what="NO PRIMARY after kill -9")
            cli_pair.repdisk(*primary_argv(cli_pair))
        else:
            assert cli_pair.repdisk("ctl", pri, "stop").stdout == "ok\n"
            wait_for(no_primary, what="NO PRIMARY after stop")


# -- units: one parser each, and `repdisk ctl` ---------------------------------------------------

@pytest.mark.parametrize("text,size", [("0", 0), ("4096", 4096), ("64K", 65536), ("64k", 65536),
                                       ("1M", MiB), ("1G", 1 << 30), ("2T", 2 << 40),
                                       ("256MiB", 256 * MiB), (" 8 M ", 8 * MiB)])
def test_parse_size(text: str, size: int) -> None:
    assert units.parse_size("k", text) == size


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("5s", 5.0), ("3", 3.0),
                                          ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert units.parse_duration("k", text) == seconds


@pytest.mark.parametrize("bad", ["", "1X", "-1", "1.5G", "G", "1 2"])
def test_parse_size_refuses(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^k: cannot parse size .*e\.g\. 64K or 1G$"):
        units.parse_size("k", bad)


@pytest.mark.parametrize("bad", ["", "5d", "-1s", "s", "0", "0ms"])
def test_parse_duration_refuses(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^k: "):
        units.parse_duration("k", bad)


def test_every_parser_is_the_one_in_units() -> None:
    from repdisk.cli import controllercmd
    from repdisk.node import config
    from repdisk.qmp import protocol as qmp
    assert config.parse_size is units.parse_size is qmp.parse_size
    assert config.parse_duration is units.parse_duration is controllercmd.parse_duration


def test_ctl_takes_sizes_with_units_and_shows_human_units(cli_pair: Pair) -> None:
    pri, sec = start_cli_pair(cli_pair)
    cli_pair.repdisk("ctl", sec, "start", "mode=secondary")
    cli_pair.repdisk("ctl", pri, "start", "mode=primary")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 1M",
         f"nbd+unix:///?socket={cli_pair.path('pri.sock')}")
    with_units = json.loads(cli_pair.repdisk("ctl", pri, "query-digests", "offset=1M",
                                             "length=2M", "granularity=512K", "--json").stdout)
    plain = json.loads(cli_pair.repdisk("ctl", pri, "query-digests", f"offset={MiB}",
                                        f"length={2 * MiB}", f"granularity={MiB // 2}",
                                        "--json").stdout)
    assert with_units == plain and len(plain["digests"]) == 4
    runs = json.loads(cli_pair.repdisk("ctl", pri, "query-allocation", "length=8M",
                                       "--json").stdout)["runs"]
    assert [MiB, MiB] in runs or any(o <= MiB and o + n >= 2 * MiB for o, n in runs)
    bad = cli_pair.repdisk("ctl", pri, "query-allocation", "length=1Q", ok=False)
    no_traceback(bad)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert one_line(bad.stderr) == ("repdisk: GenericError: Parameter 'length': cannot parse "
                                    "size '1Q': use a number with an optional K, M, G or T "
                                    "suffix, e.g. 64K or 1G")

    for sock, command in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        cli_pair.repdisk("ctl", sock, command)
    table = cli_pair.repdisk("ctl", pri, "status").stdout
    assert re.search(r"^  size +8\.0 MiB$", table, re.M), table
    assert re.search(r"^  dirty_bytes +0\.0 MiB$", table, re.M)
    assert re.search(r"^    time +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+\.\d+ m?s ago\)$", table,
                     re.M), table
    assert re.search(r"^    duration +\d+\.\d ms$", table, re.M)
    assert re.search(r"^  timeout +3\.00 s$", table, re.M)          # isolation
    exact = json.loads(cli_pair.repdisk("ctl", pri, "status", "--json").stdout)
    disk = exact["disks"][0]
    assert disk["size"] == 8 * MiB and isinstance(disk["last_checkpoint"]["time"], float)


# -- the controller's lines ---------------------------------------------------------------------

def test_an_unknown_command_names_the_closest_one(cli_pair: Pair) -> None:
    """A mistyped ``repdisk ctl`` command: one line, the closest command the node knows (an
    alias of repdisk ctl included), and where the list is; nothing is run."""
    pri, sec = start_cli_pair(cli_pair)
    for typed, hint in (("replication-do-checkpont", "did you mean replication-do-checkpoint? "),
                        ("chekpoint", "did you mean checkpoint? "), ("quit", "")):
        bad = cli_pair.repdisk("ctl", sec, typed, ok=False)
        no_traceback(bad)
        assert (bad.returncode, bad.stdout) == (1, "")
        assert one_line(bad.stderr) == (
            f"repdisk: CommandNotFound: The command {typed} has not been found: {hint}"
            + (f"(repdisk ctl {sec} query-commands lists them)" if hint else
               f"repdisk ctl {sec} query-commands lists them"))
    status = json.loads(cli_pair.repdisk("ctl", sec, "status", "--json").stdout)
    assert status["disks"][0]["stage"] == "none"       # nothing was started or checkpointed


def test_controller_lines_name_each_socket_and_role() -> None:
    """query-controller as it is today (nodes by role, ``control``/``reachable``) and with the
    controller's state machine (``operation``, nodes with ``socket``/``role``/``ok``)."""
    base = {"state": "running", "epoch": 2, "dirty": 0, "lag": 0, "last_checkpoints": []}
    today = {**base, "nodes": {"primary": {"control": "/r/b.qmp", "reachable": True,
                                           "last_seen": 0.2},
                               "secondary": {"control": "/r/a.qmp", "reachable": False,
                                             "last_seen": 4.0}}}
    assert controller_lines(today)[0] == (
        "controller running     epoch 2  primary /r/b.qmp ok (0.2s ago)  secondary /r/a.qmp LOST "
        "(4.0s ago)  dirty 0.0 MiB lag 0.0 MiB  no checkpoint")
    machine = {**base, "state": "resyncing", "operation": "resync",
               "nodes": {"primary": {"socket": "/r/b.qmp", "role": "primary", "ok": True},
                         "secondary": {"socket": "/r/a.qmp", "role": "secondary", "ok": True}}}
    assert controller_lines(machine)[0] == (
        "controller resyncing (resync) epoch 2  primary /r/b.qmp ok  secondary /r/a.qmp ok  "
        "dirty 0.0 MiB lag 0.0 MiB  no checkpoint")
    # A node that answers but is not ok says why; one that never answered says so.
    seen = {"reachable": True, "answered": True, "last_seen": 0.3}
    for node, word in (({**seen, "fenced": "lost the failover of epoch 1"}, "FENCED (0.3s ago)"),
                       ({**seen, "answers_as": "secondary"}, "now a secondary (0.3s ago)"),
                       ({**seen, "refused": "controller lease refused"},
                        "LEASE REFUSED (0.3s ago)"),
                       ({"reachable": False, "answered": False, "last_seen": 6.2},
                        "NO ANSWER (never answered)"),
                       ({"reachable": False, "answered": True, "last_seen": 6.2},
                        "LOST (6.2s ago)")):
        q = {**base, "state": "failed-over",
             "nodes": {"primary": {"socket": "/r/a.qmp", "role": "primary", "ok": False,
                                   **node},
                       "secondary": {"socket": "/r/b.qmp", "role": "secondary", "ok": True}}}
        assert controller_lines(q)[0].startswith(
            f"controller failed-over epoch 2  primary /r/a.qmp {word}  secondary /r/b.qmp ok"
        ), controller_lines(q)[0]


def test_status_after_a_promotion_names_the_new_roles(cli_pair: Pair) -> None:
    """Fail over by kill -9 of the primary, bring its disk back as a secondary, promote:
    the controller's line then says which socket is primary and which secondary."""
    f = cli_pair.path

    def controller_state() -> str:
        return json.loads(cli_pair.repdisk("ctl", "ctl.qmp", "query-controller",
                                           "--json").stdout)["state"]

    cli_pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp",
                     "--nbd-socket", "sec.sock", "--background", "--pidfile", "sec.pid")
    cli_pair.repdisk("primary", "--disk", "pri.img", "--control", "pri.qmp", "--nbd-socket",
                     "pri.sock", "--secondary", f"nbd+unix:///replica?socket={f('sec.sock')}",
                     "--isolation-timeout", "1s", "--timeout", "1s", "--background",
                     "--pidfile", "pri.pid")
    cli_pair.repdisk("controller", "--primary", "pri.qmp", "--secondary", "sec.qmp", "--control",
                     "ctl.qmp", "--interval", "1m", "--heartbeat", "300ms",
                     "--heartbeat-timeout", "2s", "--background", "--pidfile", "ctl.pid")
    try:
        wait_for(lambda: controller_state() == "running", what="a running pair")
        line = cli_pair.repdisk("status", "ctl.qmp").stdout.splitlines()[0]
        assert re.match(r"controller running +epoch 1  primary pri\.qmp ok \(\d+\.\ds ago\)  "
                        r"secondary sec\.qmp ok", line), line
        os.kill(int(Path(f("pri.pid")).read_text()), signal.SIGKILL)

        def lost() -> bool:
            line = cli_pair.repdisk("status", "ctl.qmp").stdout.splitlines()[0]
            return bool(re.search(r"  primary pri\.qmp LOST \(\d+\.\ds ago\)  secondary "
                                  r"sec\.qmp ok", line))
        wait_for(lost, what="the primary's loss")
        wait_for(lambda: controller_state() != "running", what="the failover")

        cli_pair.repdisk("secondary", "--disk", "pri.img", "--control", "old.qmp",
                         "--nbd-socket", "old.sock", "--background", "--pidfile", "old.pid")
        cli_pair.repdisk("ctl", "ctl.qmp", "controller-promote", f"secondary={f('old.qmp')}",
                         f"uri=nbd+unix:///replica?socket={f('old.sock')}")
        # whether re-protection is done yet or not (the controller's business), the
        # controller's peers have swapped: its line names each role's socket
        swapped = (rf"controller \S+( \(\S+\))? +epoch 2  primary sec\.qmp ok \(\d+\.\ds ago\)  "
                   rf"secondary {re.escape(f('old.qmp'))} ok")
        wait_for(lambda: re.match(swapped, cli_pair.repdisk("status", "ctl.qmp").stdout),
                 what="the promoted pair")
        status = cli_pair.repdisk("status", "sec.qmp", "old.qmp").stdout.splitlines()
        assert [line.split()[0] for line in status] == ["primary", "secondary"]
    finally:
        pid = nodeproc._pidfile_pid(f("ctl.pid"))
        if pid is not None and "controller" in psutil.Process(pid).cmdline():
            nodeproc.stop_pid(pid)
        for name in ("old.pid", "sec.pid"):
            nodeproc.stop_pidfile(f(name))


def test_a_refused_controller_start_writes_no_pair_file(cli_pair: Pair) -> None:
    """A controller given the roles the other way round swaps them to adopt the pair; when
    it is then refused (here: the primary's timeouts against --heartbeat-timeout), it has
    written nothing, not even the pair file that records such a swap."""
    pri, sec, _ = replicating_pair(cli_pair)
    bad = cli_pair.repdisk("controller", "--primary", sec, "--secondary", pri, "--control",
                           "ctl.qmp", "--heartbeat-timeout", "2s", "--background", ok=False)
    assert bad.returncode == 1 and "must be below --heartbeat-timeout (2s)" in bad.stderr, bad
    assert not os.path.exists(cli_pair.path("ctl.qmp.pair"))


def test_a_controller_adopting_a_pair_started_by_hand_says_its_epoch(cli_pair: Pair) -> None:
    """The README's nodes by hand run in epoch 0; a controller that adopts them says
    epoch 0 too (it said 1, which no node was in)."""
    f = cli_pair.path
    pri, sec = start_cli_pair(cli_pair)
    cli_pair.repdisk("ctl", sec, "start", "mode=secondary")
    cli_pair.repdisk("ctl", pri, "start", "mode=primary")
    cli_pair.repdisk("controller", "--primary", pri, "--secondary", sec, "--control",
                     "ctl.qmp", "--background", "--pidfile", "ctl.pid")
    try:
        def query() -> dict:
            return json.loads(cli_pair.repdisk("ctl", "ctl.qmp", "query-controller",
                                               "--json").stdout)
        wait_for(lambda: query()["state"] == "running", what="the adopted pair")
        assert query()["epoch"] == 0
        for sock in (pri, sec):
            assert json.loads(cli_pair.repdisk("ctl", sock, "status", "--json").stdout
                              )["epoch"] == 0
        assert re.match(r"controller running +epoch 0  ",
                        cli_pair.repdisk("status", "ctl.qmp").stdout)
        bad = cli_pair.repdisk("ctl", "ctl.qmp", "stop", ok=False)   # a node's alias only
        assert (bad.returncode, bad.stderr) == (1, "repdisk: CommandNotFound: The command "
                                                   "stop has not been found: repdisk ctl "
                                                   "ctl.qmp query-commands lists them\n")
        assert query()["state"] == "running"
        # The README's hand checkpoint, typed while the controller holds the pair: one node's
        # half of a checkpoint would break the pair's; the controller's works.
        for sock in (pri, sec):
            for alias in ("checkpoint", "resume"):
                bad = cli_pair.repdisk("ctl", sock, alias, ok=False)
                assert (bad.returncode, bad.stdout) == (1, "")
                assert re.fullmatch(
                    r"repdisk: GenericError: replication-(do-checkpoint|resume) refused: "
                    r"controller \S+ takes this pair's checkpoints: ask it \(repdisk ctl "
                    + re.escape(f("ctl.qmp")) + r" checkpoint\)\n", bad.stderr), bad.stderr
        assert not json.loads(cli_pair.repdisk("ctl", pri, "status", "--json").stdout
                              )["disks"][0]["holding"]
        cli_pair.repdisk("ctl", "ctl.qmp", "checkpoint")
        # The secondary restarts: the controller starts it in the pair's epoch, 0 (in 1 the
        # primary's writer sessions were refused, and the pair stayed degraded for good).
        nodeproc.stop_pidfile(f("sec.pid"))
        wait_for(lambda: query()["state"] == "degraded", what="the secondary's loss")
        cli_pair.repdisk("secondary", "--disk", "sec.img", "--control", "sec.qmp",
                         "--nbd-socket", "sec.sock", "--background", "--pidfile", "sec.pid")
        wait_for(lambda: query()["state"] == "running", what="the pair re-protected")
        q = json.loads(cli_pair.repdisk("ctl", sec, "status", "--json").stdout)
        assert (q["epoch"], q["disks"][0]["consistent"]) == (0, True)
    finally:
        pid = nodeproc._pidfile_pid(f("ctl.pid"))
        if pid is not None and "controller" in psutil.Process(pid).cmdline():
            nodeproc.stop_pid(pid)


def test_a_killed_controller_leaves_no_lease_on_its_host(cli_pair: Pair) -> None:
    """After a kill -9 of the controller, the README's checkpoint by hand works at once (it
    was refused, "ask it", until the lease lapsed) and the lease shows it is not fresh once
    it is older than its length; the controller restarted on its socket takes the pair back."""
    f = cli_pair.path
    pri, sec, _ = replicating_pair(cli_pair)
    cli_pair.repdisk("controller", "--primary", pri, "--secondary", sec, "--control",
                     "ctl.qmp", "--heartbeat-timeout", "30s", "--background",
                     "--pidfile", "ctl.pid")   # a lease of 60 s: a test cannot outwait it
    try:
        def query() -> dict:
            return json.loads(cli_pair.repdisk("ctl", "ctl.qmp", "query-controller",
                                               "--json").stdout)
        wait_for(lambda: query()["state"] == "running", what="the adopted pair")
        bad = cli_pair.repdisk("ctl", pri, "checkpoint", ok=False)
        assert "takes this pair's checkpoints: ask it" in bad.stderr, bad
        lease = json.loads(cli_pair.repdisk("ctl", pri, "status", "--json").stdout)["lease"]
        assert (lease["holder"].endswith(f":{f('ctl.qmp')}"), lease["duration"],
                lease["fresh"]) == (True, 60.0, True)
        pid = nodeproc._pidfile_pid(f("ctl.pid"))
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(10)
        checkpoint(cli_pair, pri, sec)
        cli_pair.repdisk("controller", "--primary", pri, "--secondary", sec, "--control",
                         "ctl.qmp", "--heartbeat-timeout", "30s", "--background",
                         "--pidfile", "ctl.pid")
        wait_for(lambda: query()["state"] == "running", what="the pair taken back")
        bad = cli_pair.repdisk("ctl", sec, "checkpoint", ok=False)
        assert "takes this pair's checkpoints: ask it" in bad.stderr, bad
    finally:
        pid = nodeproc._pidfile_pid(f("ctl.pid"))
        if pid is not None and psutil.pid_exists(pid) and \
                "controller" in psutil.Process(pid).cmdline():
            nodeproc.stop_pid(pid)


def test_a_start_of_a_stopped_primary_says_it_is_ignored_and_changes_nothing(
        cli_pair: Pair) -> None:
    """After replication-stop a primary's replication does not start again in its process
    (QEMU's rule): start says so instead of answering ok, and its epoch stays as it was."""
    pri, sec, _ = replicating_pair(cli_pair)
    assert cli_pair.repdisk("ctl", pri, "stop", "failover=true").stdout == "ok\n"
    ignored = cli_pair.repdisk("ctl", pri, "start", "mode=primary", "epoch=3", ok=False)
    out = ignored.stdout
    assert ignored.returncode == 3 and ignored.stderr == "", ignored    # `&&` stops here
    assert "ignored" in out and "replication was stopped on this primary (stage done)" in out \
        and "restart the node" in out, out
    assert re.match(r"primary +disk0 +done +epoch 0 ", cli_pair.repdisk("status", pri).stdout)
    bad = cli_pair.repdisk("ctl", pri, "resync", ok=False)
    assert bad.stderr.endswith("(stage done); restart the node to replicate again\n"), bad.stderr


def test_a_primary_given_its_own_socket_as_secondary_is_refused(cli_pair: Pair) -> None:
    """`--secondary` naming the node's own `--nbd-socket` (absolute or relative) is one
    line before anything starts, not a node that fails later at `start`."""
    for sock in (cli_pair.path("pri.sock"), "pri.sock"):
        uri = f"nbd+unix:///replica?socket={sock}"
        bad = cli_pair.repdisk("primary", "--disk", "pri.img", "--control", "pri.qmp",
                               "--nbd-socket", "pri.sock", "--secondary", uri, "--background",
                               ok=False)
        assert (bad.returncode, bad.stdout) == (1, "")
        assert bad.stderr == (f"repdisk: error: secondary: {uri} is this node's own "
                              "--nbd-socket: give the secondary's, e.g. nbd+unix:///replica?"
                              "socket=/path/sec.sock\n"), bad.stderr
    assert sorted(os.listdir(cli_pair.folder)) == ["pri.img", "sec.img"]


def test_ctl_with_the_socket_after_the_command_says_the_order(cli_pair: Pair) -> None:
    pri, _sec, _ = replicating_pair(cli_pair)
    bad = cli_pair.repdisk("ctl", "checkpoint", "pri.qmp", ok=False)
    assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", (
        "repdisk ctl: the control socket comes first: repdisk ctl pri.qmp checkpoint\n"))
    bad = cli_pair.repdisk("ctl", "start", pri, "mode=primary", ok=False)
    assert bad.stderr == f"repdisk ctl: the control socket comes first: repdisk ctl {pri} " \
        "start mode=primary\n"
    bad = cli_pair.repdisk("ctl", pri, "stop", "failover=false", "failover=true", ok=False)
    assert (bad.returncode, bad.stdout, bad.stderr) == (   # a key twice: which one was meant?
        1, "", "repdisk ctl: failover= is given twice: give it once\n")
    q = json.loads(cli_pair.repdisk("ctl", pri, "query-replication", "--json").stdout)
    assert q["disks"][0]["stage"] == "running"              # nothing was sent


def test_ctl_error_prints_the_error_as_its_answer(cli_pair: Pair) -> None:
    """`ctl NODE error` answers ok, or prints the disk's error on stdout with status 1: the
    error is what was asked for, so it is not reported as the command's own failure."""
    pri, _sec, guest = replicating_pair(cli_pair)
    assert cli_pair.repdisk("ctl", pri, "error").stdout == "ok\n"
    kill_secondary(cli_pair)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64K", guest)
    uri = f"nbd+unix:///replica?socket={cli_pair.path('sec.sock')}"
    for command in ("error", "replication-get-error"):
        err = cli_pair.repdisk("ctl", pri, command, ok=False)
        assert (err.returncode, err.stderr) == (1, ""), err
        assert err.stdout == (f"disk0: forwarding to the secondary {uri} failed: secondary "
                              f"{uri} closed the connection; writes are kept local and "
                              "tracked as dirty until resync\n"), err.stdout


def test_down_of_control_sockets_stops_what_serves_them_and_waits(cli_pair: Pair) -> None:
    """`repdisk down CONTROL...` stops the controller and nodes serving those sockets, in
    order, each gone when it returns (a node restarted at once on the same disk starts);
    a path that is no socket, an NBD socket, or a socket another program serves, is refused
    before anything is stopped; a socket left by a killed node, or none, is nothing to
    stop."""
    pri, sec, _ = replicating_pair(cli_pair)
    cli_pair.repdisk("controller", "--primary", pri, "--secondary", sec, "--control",
                     "ctl.qmp", "--background")
    pids = {name: int(Path(cli_pair.path(name)).read_text())
            for name in ("ctl.qmp.pid", "pri.pid", "sec.pid")}
    try:
        for path, why in (("pri.img", "pri.img is not a socket"),       # checked before any stop
                          ("pri.sock", "pri.sock is an NBD socket, not a control socket"),
                          ("other.sock", f"other.sock is served by pid {os.getpid()} (")):
            with socket.socket(socket.AF_UNIX) as other:
                other.bind(cli_pair.path("other.sock"))
                other.listen()
                bad = cli_pair.repdisk("down", "ctl.qmp", path, ok=False)
            os.unlink(cli_pair.path("other.sock"))
            assert (bad.returncode, bad.stdout) == (1, "") and bad.stderr.startswith(
                f"repdisk: error: {why}"), bad
            assert all(psutil.pid_exists(pid) for pid in pids.values())
        out = cli_pair.repdisk("down", "ctl.qmp", "pri.qmpx").stdout
        assert out == (f"ctl.qmp: stopped the controller (pid {pids['ctl.qmp.pid']})\n"
                       "pri.qmpx: nothing serves it (stopped already, or not its path)\n"), out
    finally:                                         # a failed check leaves no controller
        with contextlib.suppress(psutil.Error):     # gone, or a zombie: stopped
            if "controller" in psutil.Process(pids["ctl.qmp.pid"]).cmdline():
                nodeproc.stop_pid(pids["ctl.qmp.pid"])
    out = cli_pair.repdisk("down", pri, sec).stdout
    assert out == (f"{pri}: stopped the node (pid {pids['pri.pid']})\n"
                   f"{sec}: stopped the node (pid {pids['sec.pid']})\n"), out
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids.values())
    for log in ("pri.log", "sec.log"):             # each node's log says why it ended, when
        last = Path(cli_pair.path(log)).read_text().splitlines()[-2:]
        assert [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line)
                for line in last] == [
            "stopping: nbdkit is shutting down (SIGTERM or SIGINT; its NBD clients have hung "
            "up)", "stopped"], last
    cli_pair.repdisk(*SEC, "--disk", "sec.img")                 # the disk is free at once
    os.kill(int(Path(cli_pair.path("sec.pid")).read_text()), signal.SIGKILL)
    wait_for(lambda: cli_pair.repdisk("down", sec).stdout
             == f"{sec}: nothing serves it (stopped already, or not its path)\n",
             what="a stale socket")


def test_down_of_a_node_whose_client_stays_says_it_killed_it(cli_pair: Pair) -> None:
    """A node waits for its NBD clients after SIGTERM: `repdisk down` kills it after 10 s
    and says so in its one line, with why and what that costs (not "stopped" on stdout
    and "killed" on stderr)."""
    pri, _sec, guest = replicating_pair(cli_pair)
    pid = int(Path(cli_pair.path("pri.pid")).read_text())
    h = nbd.NBD()
    h.connect_uri(guest)                             # a guest that was not stopped first
    try:
        out = cli_pair.repdisk("down", pri)
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
    assert out.stderr == ""
    assert out.stdout == (f"{pri}: killed the node (pid {pid}): it did not stop within 10 s "
                          "of SIGTERM (a node waits for its NBD clients to disconnect: stop "
                          "the guest first; a killed primary compares the disks at its next "
                          "start)\n"), out.stdout


def test_down_without_resources_says_it_takes_control_sockets(tmp_path) -> None:
    missing = str(tmp_path / "no-such-dir")
    bad = run([REPDISK, "down", "--config-dir", missing], str(tmp_path))
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == (f"repdisk: error: no resources to stop: {missing} is not a "
                          "directory; give the control sockets of nodes or controllers started "
                          "by hand (repdisk down CONTROL...), or --config-dir DIR\n")
    bad = run([REPDISK, "down", "web", "--config-dir", missing], str(tmp_path))  # no web.toml
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == (f"repdisk: error: nothing named web (no such control socket "
                          f"here): {missing} is not a directory; give the control sockets of "
                          "nodes or controllers started by hand (repdisk down CONTROL...), or "
                          "--config-dir DIR\n")


def test_a_secondary_stopped_with_sigterm_stops_though_its_primary_is_idle(
        cli_pair: Pair) -> None:
    """nbdkit stops only once its clients hang up, and a secondary's client is its primary:
    an idle primary still probes its link every isolation-timeout (3 s), so a SIGTERM'd
    secondary stops within that, and its primary knows it is gone (degraded).  The
    connection a checkpoint's mark keeps closes with the link, or the secondary would
    wait for it for ever."""
    pri, sec, _ = replicating_pair(cli_pair)
    checkpoint(cli_pair, pri, sec)                      # the mark's connection is open
    pid = int(Path(cli_pair.path("sec.pid")).read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, "the secondary's exit")
    wait_for(lambda: "DEGRADED" in cli_pair.repdisk("status", pri).stdout, 10, "degraded")


def test_a_stopped_secondary_neither_starts_nor_fails_over_nor_takes_writes(
        cli_pair: Pair) -> None:
    """After `stop` (no failover) a secondary's replication is over in its process: start and
    failover say they are ignored instead of answering ok, and its active view refuses a
    VM's writes, for the primary still writes in this epoch (two writers otherwise, and the
    next resync would overwrite the VM's acknowledged write)."""
    pri, sec, guest = replicating_pair(cli_pair)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", guest)
    assert cli_pair.repdisk("ctl", sec, "stop").stdout == "ok\n"
    for argv in (["start", "mode=secondary"], ["failover"]):
        ignored = cli_pair.repdisk("ctl", sec, *argv, ok=False)
        out = ignored.stdout
        assert ignored.returncode == 3, ignored
        assert "ignored" in out and "stopped on this secondary without a failover" in out, out
    assert re.match(r"secondary +disk0 +done +epoch 0 ", cli_pair.repdisk("status", sec).stdout)
    active = f"nbd+unix:///active?socket={cli_pair.path('sec.sock')}"
    vm = run(["qemu-io", "-f", "raw", "-c", "write -P 0x99 4M 1M", active], cli_pair.folder)
    assert vm.returncode == 1 and vm.stdout.startswith("write failed"), vm
    assert read_file(cli_pair.path("sec.img"))[4 * MiB:5 * MiB] == bytes(MiB)


def test_logs_rotated_by_copytruncate_go_on_from_their_start(cli_pair: Pair) -> None:
    """logrotate's ``copytruncate`` (the README's advice): every node and controller
    appends to its log, so after a truncation the next lines start at offset 0, with no
    hole of zeros where the old end was, and the process goes on logging."""
    pri, sec, _ = replicating_pair(cli_pair)
    cli_pair.repdisk("controller", "--primary", pri, "--secondary", sec, "--control",
                     "ctl.qmp", "--background")
    try:
        for log in ("pri.log", "sec.log", "ctl.qmp.log"):
            wait_for(lambda log=log: os.path.getsize(cli_pair.path(log)) > 0,
                     what=f"a line in {log}")
            shutil.copyfile(cli_pair.path(log), cli_pair.path(log + ".1"))
            os.truncate(cli_pair.path(log), 0)
    finally:
        cli_pair.repdisk("down", "ctl.qmp", pri, sec)    # each logs its stop
    for log in ("pri.log", "sec.log", "ctl.qmp.log"):
        text = Path(cli_pair.path(log)).read_bytes()
        assert text and not text.startswith(b"\0"), (log, text[:80])
        assert re.match(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", text), (log, text[:80])


def protected_pair(cli_pair: Pair) -> tuple[str, str]:
    """A replicating pair and a controller (ctl.qmp) that protects it: the primary's and
    the secondary's control sockets."""
    pri, sec, _ = replicating_pair(cli_pair)
    cli_pair.repdisk("controller", "--primary", pri, "--secondary", sec, "--control",
                     "ctl.qmp", "--background")
    try:
        wait_for(lambda: "running" in cli_pair.repdisk("status", "ctl.qmp").stdout,
                 what="a protected pair")
    except BaseException:
        cli_pair.repdisk("down", "ctl.qmp")  # the fixture stops only the nodes
        raise
    return pri, sec


def test_a_stop_by_hand_of_a_protected_pair_is_refused(cli_pair: Pair) -> None:
    """`repdisk ctl NODE stop` while a controller protects the pair would end that node's
    replication until it restarts (QEMU's stop), which the controller cannot mend: it is
    refused, naming the controller, and changes nothing."""
    pri, sec = protected_pair(cli_pair)
    try:
        for node in (pri, sec):
            bad = cli_pair.repdisk("ctl", node, "stop", ok=False)
            assert (bad.returncode, bad.stdout) == (1, "") and bad.stderr.startswith(
                "repdisk: GenericError: replication-stop refused: controller ") and \
                bad.stderr.endswith(" protects this pair, and a stop would end this node's "
                                    "replication until it restarts: stop the controller first "
                                    f"(repdisk down {cli_pair.path('ctl.qmp')})\n"), \
                bad.stderr
            q = json.loads(cli_pair.repdisk("ctl", node, "status", "--json").stdout)
            assert q["disks"][0]["stage"] == "running", q
    finally:
        cli_pair.repdisk("down", "ctl.qmp")


def test_down_of_a_protected_node_warns_that_its_controller_takes_it_as_a_failure(
        cli_pair: Pair) -> None:
    """`repdisk down NODE` while a controller protects the pair stops the node (the failure
    matrix uses it as a node's loss) and says, on stderr, what the controller will make of
    it and how to stop the pair instead; once the controller has stopped, nothing is said."""
    pri, sec = protected_pair(cli_pair)
    try:
        down = cli_pair.repdisk("down", sec)
        where = cli_pair.path("ctl.qmp")
        assert down.stderr == (
            f"{sec}: warning: controller {where} protects this node's pair and takes its stop "
            "as the secondary's loss (the pair runs unprotected until this node is back); to "
            f"stop the pair instead, stop the controller first (repdisk down {where})\n")
        assert down.stdout.startswith(f"{sec}: stopped the node (pid "), down.stdout
    finally:
        cli_pair.repdisk("down", "ctl.qmp")
    down = cli_pair.repdisk("down", pri)
    assert (down.stderr, down.stdout.startswith(f"{pri}: stopped the node")) == ("", True)


def test_a_stop_is_warned_of_only_where_a_controller_acts_on_it() -> None:
    """The warning of `repdisk down NODE` by the node's query: a protected primary's stop
    is a failover, a protected secondary's leaves the pair unprotected; a fenced node, a
    failover's winner (stage done), a stale lease or none: nothing to warn of."""
    fresh = {"holder": "h1:/r/ctl.qmp", "fresh": True}
    running = [{"stage": "running"}]

    def warning(**q: object) -> str | None:
        return stop_warning({"role": "primary", "lease": fresh, "disks": running, **q})

    assert warning() is not None and "the primary's loss (a failover to the last " \
        "checkpoint)" in warning()
    assert "the secondary's loss (the pair runs unprotected until this node is back)" in \
        warning(role="secondary")
    assert [warning(fenced="lost a failover"), warning(disks=[{"stage": "done"}]),
            warning(lease={**fresh, "fresh": False}), warning(lease=None)] == [None] * 4


def test_a_failover_by_hand_of_a_protected_pair_warns_of_what_it_does(
        cli_pair: Pair) -> None:
    """`repdisk ctl SEC failover` while a controller protects the pair goes on (the failure
    matrix's row for a failover made by hand) and says on stderr that it fences a primary
    that still runs and rolls back what it wrote since the last checkpoint."""
    pri, sec = protected_pair(cli_pair)
    try:
        done = cli_pair.repdisk("ctl", sec, "failover")
        where = cli_pair.path("ctl.qmp")
        assert (done.stdout, done.stderr) == ("ok\n", (
            f"repdisk ctl: warning: controller {where} protects this pair and fails over by "
            "itself once the primary is lost; a failover now fences the primary if it still "
            "runs, and what it wrote since the last checkpoint is rolled back\n"))
        q = json.loads(cli_pair.repdisk("ctl", sec, "status", "--json").stdout)
        assert q["disks"][0]["stage"] == "done", q
    finally:
        cli_pair.repdisk("down", "ctl.qmp")
