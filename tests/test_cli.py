"""The ``repdisk`` command and the plugin's start-up checks, run as a user runs them.

* Start-up mistakes: each gives one clear line naming the key (never a Python traceback) and
  a non-zero exit, both from ``nbdkit -f python nbdplugin/repdisk.py KEY=VALUE...`` and from
  ``repdisk primary|secondary`` (foreground and ``--background``).
* A pair started with ``repdisk secondary|primary --background`` is driven with
  ``repdisk ctl`` (table and ``--json``) and ``repdisk status`` through start, a write,
  checkpoint and failover.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import pytest

from repdisk.cli import nodeproc
from repdisk.cli.main import PLUGIN
from repdisk.errors import RepdiskError
from repdisk.node import config as cfgmod
from repdisk.replication.secondary import SecondaryReplica
from repdisk.units import parse_size
from tests.helpers.cli import SIZE, Pair, start_cli_pair
from tests.helpers.commands import REPDISK, qemu, run
from tests.helpers.nodes import MiB, Nodes, make_disk, read_file

# -- start-up mistakes ------------------------------------------------------------------------

@dataclass
class Mistake:
    """Plugin keys that are wrong in one way, and the one line that must say so."""
    name: str
    keys: list[tuple[str, str]]
    message: str                      # a regex for the text after "nbdkit: repdisk: error: "
    cli: bool = True                  # expressible with `repdisk primary|secondary`
    setup: Callable[[str, Nodes], None] | None = None

#: The cluster size a node gives its overlays (the key table's default).
NODE_CLUSTER = parse_size("cluster-size", cfgmod.default("cluster-size"))


def sec_keys(*extra: tuple[str, str], disk: str = "d.img") -> list[tuple[str, str]]:
    return [("role", "secondary"), ("disk", disk), ("control", "c.qmp"), *extra]


def pri_keys(*extra: tuple[str, str], secondary: str = "nbd+unix:///replica?socket=none.sock"
             ) -> list[tuple[str, str]]:
    return [("role", "primary"), ("disk", "d.img"), ("control", "c.qmp"),
            ("secondary", secondary), *extra]


def overlays_for_a_bigger_disk(folder: str, nodes: Nodes) -> None:
    """d.img's overlays were made when d.img was twice as long."""
    path = os.path.join(folder, "d.img")
    os.truncate(path, 2 * SIZE)
    SecondaryReplica.open("d", path, cluster_size=NODE_CLUSTER).close()
    os.truncate(path, SIZE)


def stale_bitmap(folder: str, nodes: Nodes) -> None:
    """d.img's hidden overlay lost its data file; its bitmap is still there."""
    path = os.path.join(folder, "d.img")
    SecondaryReplica.open("d", path, cluster_size=NODE_CLUSTER).close()
    os.unlink(path + ".hidden")


def bigger_secondary(folder: str, nodes: Nodes) -> None:
    """A secondary whose disk is twice the primary's, listening on sec.sock."""
    disk = make_disk(os.path.join(folder, "big.img"), 2 * SIZE)
    nodes.secondary(disk)


MISTAKES = [
    Mistake("missing disk", [("role", "secondary"), ("control", "c.qmp")],
            r"disk: is required for role=secondary \(\[NAME:\]PATH\)"),
    Mistake("nonexistent disk", sec_keys(disk="nope.img"),
            r"disk: nope\.img does not exist: create it first \(e\.g\. truncate -s 1G nope\.img\)"),
    Mistake("directory as disk", sec_keys(disk="adir"),
            r"disk: adir is not a regular file or block device"),
    Mistake("path through a file", sec_keys(disk="d.img/x"),
            r"disk: cannot stat d\.img/x: Not a directory"),
    Mistake("dangling symlink", sec_keys(disk="dangling.img"),
            r"disk: dangling\.img is a symbolic link to gone\.img, which does not exist: fix "
            r"the link"),
    Mistake("unknown role", [("role", "tertiary"), ("disk", "d.img"), ("control", "c.qmp")],
            r"role: unknown role 'tertiary': use role=primary or role=secondary", cli=False),
    Mistake("unknown key", sec_keys(("colour", "blue")),
            r"colour: unknown key; known keys: role, disk, control, [a-z, -]+", cli=False),
    Mistake("key of the other role", sec_keys(("write-mode", "async")),
            r"write-mode: is not a secondary key \(it belongs to role=primary\)", cli=False),
    Mistake("disk given twice", sec_keys(("disk", "d.img")),
            r"disk: the same file is given twice"),
    Mistake("overlays of another size", sec_keys(),
            r"disk: d\.img: overlay d\.img\.hidden: made for a 16777216-byte disk but its backing "
            r"d\.img is 8388608 bytes; if this overlay holds nothing you need, delete it \(and "
            r"its \.bitmap\) to have it recreated empty", setup=overlays_for_a_bigger_disk),
    Mistake("stale overlay bitmap", sec_keys(),
            r"disk: d\.img: overlay bitmap d\.img\.hidden\.bitmap was found without its data "
            r"file d\.img\.hidden \(removed, or lost in a crash while it was created\): the "
            r"overlay cannot be read without it\. Put d\.img\.hidden back if it was moved; "
            r"otherwise remove d\.img\.hidden\.bitmap and start the node again: it creates both "
            r"files empty \(a secondary's start empties them anyway\)", setup=stale_bitmap),
    Mistake("bad cluster-size", sec_keys(("cluster-size", "3K")),
            r"cluster-size: 3072 is not a power of two from 512 to 2M"),
    Mistake("unparsable cluster-size", sec_keys(("cluster-size", "big")),
            r"cluster-size: cannot parse size 'big': use a number with an optional K, M, G or T "
            r"suffix, e\.g\. 64K or 1G"),
    Mistake("control in a missing folder", sec_keys()[:2] + [("control", "/missing/dir/c.qmp")],
            r"control: /missing/dir/c\.qmp: the folder /missing/dir does not exist: create it "
            r"\(mkdir -p /missing/dir\) or choose another path"),
    Mistake("missing secondary", pri_keys()[:-1],
            r"secondary: is required for role=primary \(NBD-URI\)"),
    Mistake("not an NBD URI", pri_keys(secondary="http://example.invalid/x"),
            r"secondary: 'http://example.invalid/x' is not an NBD URI: use e\.g\. "
            r"nbd\+unix:///replica\?socket=/run/sec\.sock"),
    Mistake("secondary does not answer", pri_keys(),
            r"secondary: disk0: secondary nbd\+unix:///replica\?socket=none\.sock does not answer"
            r": .*; start the secondary first, or fix the URI$"),
    Mistake("secondary of another size", pri_keys(secondary="nbd+unix:///replica?socket=sec.sock"),
            r"secondary: disk0: the secondary nbd\+unix:///replica\?socket=sec\.sock is 16777216 "
            r"bytes but the local disk is 8388608 bytes; give both disks the same size$",
            setup=bigger_secondary),
    Mistake("bad write-mode", pri_keys(("write-mode", "fast")),
            r"write-mode: unknown mode 'fast': use sync or async"),
    Mistake("bad timeout", pri_keys(("timeout", "soon")),
            r"timeout: cannot parse duration 'soon': use a number with an optional unit ms, s, m "
            r"or h, e\.g\. 5s or 500ms"),
    Mistake("zero timeout", pri_keys(("timeout", "0s")),
            r"timeout: '0s' is not positive: use e\.g\. 5s or 500ms"),
    Mistake("bad window", pri_keys(("window", "0")),
            r"window: expected a whole number >= 1, got '0'"),
    Mistake("bad resync-rate", pri_keys(("resync-rate", "fast")),
            r"resync-rate: cannot parse rate 'fast': use auto, max, or bytes per second with an "
            r"optional K, M, G suffix, e\.g\. 100M"),
    Mistake("tiny resync-rate", pri_keys(("resync-rate", "64K")),
            r"resync-rate: '64K' is below 1M per second: a resync that slow may never end; use "
            r"auto to let it back off while the guest writes"),
    Mistake("tiny max-lag", pri_keys(("max-lag", "64K")),
            r"max-lag: 65536 bytes is too small: use at least 1M"),
]


@pytest.fixture
def workdir(tmp_path, nodes: Nodes) -> str:
    folder = str(tmp_path)
    make_disk(os.path.join(folder, "d.img"), SIZE)
    os.mkdir(os.path.join(folder, "adir"))
    os.symlink("gone.img", os.path.join(folder, "dangling.img"))
    return folder


def nbdkit_argv(keys: list[tuple[str, str]]) -> list[str]:
    return (["nbdkit", "-f", "-U", "node.sock", "python", PLUGIN]
            + [f"{k}={v}" for k, v in keys])


def repdisk_argv(keys: list[tuple[str, str]], *extra: str) -> list[str]:
    role = dict(keys)["role"]
    return ([REPDISK, role, "--nbd-socket", "node.sock", *extra]
            + [arg for k, v in keys if k != "role" for arg in (f"--{k}", v)])


def assert_one_line(result: subprocess.CompletedProcess, pattern: str, prefix: str) -> None:
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert re.fullmatch(re.escape(prefix) + pattern, lines[0]), lines[0]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_startup_mistake_via_nbdkit(mistake: Mistake, workdir: str, nodes: Nodes) -> None:
    if mistake.setup:
        mistake.setup(workdir, nodes)
    result = run(nbdkit_argv(mistake.keys), workdir)
    assert_one_line(result, mistake.message, "nbdkit: repdisk: error: ")
    assert not os.path.exists(os.path.join(workdir, "c.qmp"))


CLI_MISTAKES = [m for m in MISTAKES if m.cli]


@pytest.mark.parametrize("mistake", CLI_MISTAKES, ids=[m.name for m in CLI_MISTAKES])
def test_startup_mistake_via_repdisk(mistake: Mistake, workdir: str, nodes: Nodes) -> None:
    if mistake.setup:
        mistake.setup(workdir, nodes)
    result = run(repdisk_argv(mistake.keys), workdir)
    if mistake.name.startswith("missing"):        # argparse's usage error, in one line
        key = mistake.message.split(":")[0]
        assert (result.returncode, result.stdout) == (1, "")
        assert re.fullmatch(r"repdisk (primary|secondary): error: the following arguments "
                            rf"are required: (--\S+, )*--{key}(, --\S+)* "
                            r"\(see repdisk (primary|secondary) --help\)\n", result.stderr), \
            result.stderr
        return
    assert_one_line(result, mistake.message, "nbdkit: repdisk: error: ")


@pytest.mark.parametrize("mistake", [m for m in CLI_MISTAKES if m.name in
                                     ("nonexistent disk", "secondary does not answer",
                                      "bad cluster-size")], ids=lambda m: m.name)
def test_startup_mistake_via_repdisk_background(mistake: Mistake, workdir: str) -> None:
    began = time.monotonic()
    result = run(repdisk_argv(mistake.keys, "--background", "--pidfile", "node.pid"), workdir)
    assert time.monotonic() - began < nodeproc.START_TIMEOUT / 2    # noticed at once
    assert_one_line(result, mistake.message, "repdisk: error: node exited: nbdkit: repdisk: "
                                             "error: ")
    assert not os.path.exists(os.path.join(workdir, "node.pid"))


@pytest.mark.parametrize("role", cfgmod.ROLES)
def test_node_help_shows_the_key_table(role: str, tmp_path) -> None:
    result = run([REPDISK, role, "--help"], str(tmp_path))
    assert result.returncode == 0
    assert cfgmod.help_text(role) in result.stdout
    other = [k for k in cfgmod.KEYS if role not in k.roles]
    assert other and all(f"\n{k.name}=" not in result.stdout for k in other)


def test_controller_help_is_for_its_user(tmp_path) -> None:
    """The controller's help: what it does, how to run it, where failures are described;
    not the state machine's internals (the module's docstring goes on about those)."""
    result = run([REPDISK, "controller", "--help"], str(tmp_path))
    assert result.returncode == 0
    text = result.stdout
    assert "\n    repdisk controller --primary PRI.qmp --secondary SEC.qmp --control " \
           "CTRL.qmp\n" in text and "docs/failure-matrix.md" in text
    assert all(word not in text for word in ("_set_state", "TRANSITIONS", "states.py"))


def test_background_node_that_ends_without_a_word_is_reported_at_once(tmp_path) -> None:
    """A node gone before serving with nothing in its log (killed, crashed) is named as
    such, with the log's path, as soon as it is gone; what an earlier run of the node
    wrote to the same log is not taken for this start's error."""
    listen = nodeproc.Listen(socket=str(tmp_path / "n.sock"))
    (tmp_path / "n.log").write_text("disk0: an error of the run before\nstopped\n")
    started = time.monotonic()
    with pytest.raises(RepdiskError,
                       match=r"^node exited: nothing in its log .*/n\.log from this start: "
                             r"nbdkit ended without a message \(killed, or crashed: see the "
                             r"kernel log\)$"):
        nodeproc.start_background(["true"], str(tmp_path / "n.pid"), str(tmp_path / "n.log"),
                                  str(tmp_path / "n.qmp"), listen)
    assert time.monotonic() - started < nodeproc.START_TIMEOUT / 2


# -- a pair run with `repdisk ... --background`, driven with `repdisk ctl` ----------------------

def test_background_pair_start_checkpoint_failover(cli_pair: Pair) -> None:
    pri, sec = start_cli_pair(cli_pair)
    assert cli_pair.repdisk("ctl", sec, "start", "mode=secondary").stdout == "ok\n"
    assert cli_pair.repdisk("ctl", pri, "start", "mode=primary").stdout == "ok\n"
    status = cli_pair.repdisk("status", pri, sec).stdout.splitlines()
    assert re.match(r"primary +disk0 +running +epoch 0 +sync dirty 0\.0 MiB", status[0])
    assert re.match(r"secondary +disk0 +running +epoch 0 +INCONSISTENT", status[1])

    guest = f"nbd+unix:///?socket={cli_pair.path('pri.sock')}"
    active = f"nbd+unix:///active?socket={cli_pair.path('sec.sock')}"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M", guest)
    for sock, cmd in ((pri, "checkpoint"), (sec, "checkpoint"), (pri, "resume")):
        assert cli_pair.repdisk("ctl", sock, cmd).stdout == "ok\n"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x33 512k 1M", guest)   # lost at failover
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x44 4M 4k", active)    # the secondary VM's
    assert cli_pair.repdisk("ctl", sec, "failover").stdout == "ok\n"
    status = cli_pair.repdisk("status", sec).stdout
    assert re.match(r"secondary +disk0 +done +epoch 1 +consistent hidden 0\.0 MiB active "
                    r"0\.0 MiB  last checkpoint \d+s ago \(\d+\.\d ms\)\n$", status)
    expect = b"\x22" * MiB + bytes(3 * MiB) + b"\x44" * 4096 + bytes(SIZE - 4 * MiB - 4096)
    assert read_file(cli_pair.path("sec.img")) == expect
    qemu("qemu-io", "-f", "raw", "-c", "read -P 0x22 0 1M", "-c", "read -P 0 1M 3M",
         "-c", "read -P 0x44 4M 4k", active)


def test_ctl_json_table_and_errors(cli_pair: Pair) -> None:
    pri, sec = start_cli_pair(cli_pair)
    cli_pair.repdisk("ctl", sec, "start", "mode=secondary")
    raw = cli_pair.repdisk("ctl", sec, "query-replication", "--json").stdout
    q = json.loads(raw)
    assert q["role"] == "secondary" and q["disks"][0]["stage"] == "running"
    assert sorted(q["exports"]) == ["active", "active/disk0", "replica", "replica/disk0"]
    table = cli_pair.repdisk("ctl", sec, "status").stdout
    assert re.search(r"^role +secondary$", table, re.M)
    assert re.search(r"^  stage +running$", table, re.M)
    assert re.search(r"^  consistent +no$", table, re.M)
    assert "{" not in table.replace("{}", "")
    commands = json.loads(cli_pair.repdisk("ctl", pri, "query-commands", "--json").stdout)
    assert {"name": "replication-resume", "arguments": []} in commands

    bad = cli_pair.repdisk("ctl", sec, "no-such-command", ok=False)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == ("repdisk: CommandNotFound: The command no-such-command has not been "
                          f"found: repdisk ctl {sec} query-commands lists them\n")
    bad = cli_pair.repdisk("ctl", sec, "replication-stop", "failover=maybe", ok=False)
    assert bad.returncode == 1
    assert bad.stderr == ("repdisk: GenericError: Parameter 'failover' expects boolean: "
                          "true or false\n")
    def stage() -> str:
        return json.loads(cli_pair.repdisk("ctl", pri, "status", "--json").stdout
                          )["disks"][0]["stage"]
    before = stage()
    bad = cli_pair.repdisk("ctl", pri, "failover", ok=False)      # the wrong node's socket
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == (f"repdisk ctl: {pri} is a primary; failover is for its secondary, "
                          "once the primary is lost: repdisk ctl SECONDARY-SOCKET failover\n")
    assert stage() == before
    bad = cli_pair.repdisk("ctl", sec, "replication-stop", ok=False)
    assert bad.returncode == 1
    assert bad.stderr == ("repdisk: GenericError: Parameter 'failover' is missing: "
                          "add failover=VALUE to the command\n")
    bad = cli_pair.repdisk("ctl", sec, "replication-stop", "failovr=true", ok=False)
    assert (bad.returncode, bad.stderr) == (1, "repdisk: GenericError: Parameter 'failover' "
                                               "is missing: did you mean failover= (not "
                                               "failovr=)?\n")
    for argv, hint in ((("start", "mode=secondary", "epcoh=1"), "did you mean epoch=? (start "
                        "takes epoch=, mode=)"),
                       (("stop", "fialover=true"), "stop takes no KEY=VALUE"),  # the alias' own
                       (("replication-stop", "failover=true", "force=true"),
                        "replication-stop takes failover=")):
        bad = cli_pair.repdisk("ctl", sec, *argv, ok=False)
        key = argv[-1].split("=")[0]
        assert (bad.returncode, bad.stderr) == (1, f"repdisk: GenericError: Parameter '{key}' "
                                                   f"is unexpected: {hint}\n"), bad
    bad = cli_pair.repdisk("ctl", sec, "failover", ok=False)     # before any checkpoint
    assert bad.returncode == 1 and "no complete checkpoint" in bad.stderr
    assert "Traceback" not in bad.stderr
    for epoch in ("99999999999999999999999", "-1"):       # a typo is refused, not kept
        bad = cli_pair.repdisk("ctl", sec, "start", "mode=secondary", f"epoch={epoch}", ok=False)
        assert (bad.returncode, bad.stdout) == (1, "")
        assert bad.stderr == (f"repdisk: GenericError: epoch: start in epoch {epoch} refused: "
                              "an epoch is 0 to 9007199254740991 (this node is in epoch 0; a "
                              "new generation is usually 1)\n")
    with open(cli_pair.path("sec.img.state"), encoding="utf-8") as f:
        assert json.load(f)["epoch"] == 0
    # Mistakes of the caller's, not errors of a server: no QMP error class.
    bad = cli_pair.repdisk("ctl", "pri.img", "status", ok=False)    # the disk, a file
    assert bad.stderr == ("repdisk: error: pri.img is not a socket: give the node's (or "
                          "the controller's) --control socket\n")
    began = time.monotonic()
    bad = cli_pair.repdisk("ctl", "pri.sock", "status", ok=False)   # the NBD socket
    # said at its greeting, not after the client's 10 s wait for a QMP one
    assert time.monotonic() - began < 5
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == ("repdisk: error: pri.sock is an NBD socket, not a control "
                          "socket: give the node's --control socket\n")
    nowhere = cli_pair.path("nowhere.qmp")
    bad = cli_pair.repdisk("ctl", nowhere, "status", ok=False)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == (f"repdisk: error: {nowhere}: nothing answers there (No such file or "
                          "directory): start the node (or controller) first, or give its "
                          "--control socket\n")
    bad = cli_pair.repdisk("status", cli_pair.path("nowhere.qmp"), ok=False)
    assert bad.returncode == 1 and "nowhere.qmp: unreachable" in bad.stdout


# -- messages that once were unclear ---------------------------------------------------------

def test_unreachable_secondary_message_names_the_uri_once(workdir: str) -> None:
    result = run(nbdkit_argv(pri_keys()), workdir)
    assert result.stderr.count("nbd+unix:///replica?socket=none.sock") == 1, result.stderr


def test_overlay_size_message_is_plain(workdir: str, nodes: Nodes) -> None:
    overlays_for_a_bigger_disk(workdir, nodes)
    result = run(nbdkit_argv(sec_keys()), workdir)
    assert "RawImage(" not in result.stderr and "delete" in result.stderr, result.stderr


@pytest.mark.parametrize("argv, said", [
    (["stauts", "x.qmp"], "repdisk: error: unknown command 'stauts': did you mean status? "
                          "(see repdisk --help)"),
    (["xyzzy"], "repdisk: error: unknown command 'xyzzy' (see repdisk --help)"),
    (["ctl", "x.qmp", "status", "--jsn"],
     "repdisk ctl: error: unrecognized arguments: --jsn (see repdisk ctl --help)"),
    (["secondary", "--disk", "x.img", "--control", "x.qmp", "--nbd-socket", "x.sock",
      "--write-mode", "async"],
     "repdisk secondary: error: unrecognized arguments: --write-mode async "
     "(see repdisk secondary --help)"),
    (["ctl"], "repdisk ctl: error: the following arguments are required: SOCKET|HOST:PORT, "
              "command (see repdisk ctl --help)"),
    (["secondary", "--disk", "x.img", "--control", "x.qmp", "--port", "99999"],
     "repdisk: error: port: 99999 is not a TCP port: give 1 to 65535"),
])
def test_usage_mistakes_are_one_line(argv: list[str], said: str, tmp_path) -> None:
    result = run([REPDISK, *argv], str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", said + "\n")


def test_a_node_that_does_not_stop_is_killed_and_said_so(cli_pair: Pair, capsys) -> None:
    """A stop that has to kill says why and what it costs.  The node here is SIGSTOPped,
    so SIGTERM cannot end it; in use the cause is a node waiting for its NBD clients."""
    start_cli_pair(cli_pair)
    with open(cli_pair.path("pri.pid"), encoding="ascii") as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGSTOP)
    assert nodeproc.stop_pid(pid, timeout=1.0)
    said = capsys.readouterr().err
    assert said == (f"repdisk: process {pid} did not stop within 1 s of SIGTERM, so it was "
                    "killed (a node waits for its NBD clients to disconnect: stop the "
                    "guest first; a killed primary compares the disks at its next start)\n")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_controller_refuses_a_node_socket_that_is_not_a_control_socket(cli_pair: Pair) -> None:
    """A tired operator's --primary: the node's NBD socket, or its disk; refused at once in
    one line, not a controller waiting in "starting" for ever."""
    start_cli_pair(cli_pair)
    for given, said in (("pri.sock", "pri.sock is an NBD socket, not a control socket: give "
                                     "the node's --control socket"),
                        ("pri.img", "pri.img is not a socket: give the node's (or the "
                                    "controller's) --control socket")):
        bad = cli_pair.repdisk("controller", "--primary", given, "--secondary", "sec.qmp",
                               "--control", "ctrl.qmp", ok=False)
        assert (bad.returncode, bad.stdout) == (1, "")
        assert bad.stderr == f"repdisk: error: primary: {said}\n"
        assert not os.path.exists(cli_pair.path("ctrl.qmp"))
