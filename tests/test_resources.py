"""Resources from config files (resources.py, updown.py): `repdisk up|down|status`.

A user's way: a fresh folder, one TOML file per resource, the `repdisk` command only.
* Three resources on one host come up with one command, each replicating (a guest's
  write reaches its secondary), one fails over alone, `down all` leaves no process.
* A mistake in any file is refused before anything starts, naming file, line and key,
  and changes nothing that was running.
* The shipped systemd units pass `systemd-analyze verify`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import psutil
import pytest

from repdisk.cli import controllercmd, resources, updown
from repdisk.cli.resources import ResourceError

ROOT = Path(__file__).resolve().parent.parent
REPDISK = str(ROOT / ".venv" / "bin" / "repdisk")
MiB = 1 << 20


def resource_file(folder: Path, name: str, extra: str = "", **override: str) -> Path:
    """``folder/etc/NAME.toml`` for a pair on Unix sockets in ``folder``, disks created."""
    for role in ("pri", "sec"):
        disk = folder / f"{name}-{role}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(32 * MiB)
    text = f"""# resource {name}
[primary]
disk = "{folder}/{name}-pri.img"
control = "{folder}/{name}-pri.qmp"
nbd-socket = "{override.get('pri_sock', f'{folder}/{name}-pri.sock')}"
write-mode = "sync"
timeout = "1s"
isolation-timeout = "1s"

[secondary]
disk = "{override.get('sec_disk', f'{folder}/{name}-sec.img')}"
control = "{folder}/{name}-sec.qmp"
nbd-socket = "{folder}/{name}-sec.sock"

[controller]
interval = "1s"
heartbeat-timeout = "2s"
{extra}"""
    path = folder / "etc" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def repdisk(folder: Path, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([REPDISK, *argv, "--config-dir", str(folder / "etc")],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode == 0) == ok, result
    assert "Traceback" not in result.stderr
    return result


def processes_of(folder: Path) -> dict[int, str]:
    """Live processes whose command line names the folder (nodes and controllers)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found[proc.pid] = cmdline
    return found


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rdres-", dir="/tmp"))   # short: socket paths
    yield path
    if (path / "etc").is_dir():
        subprocess.run([REPDISK, "down", "all", "--config-dir", str(path / "etc")],
                       capture_output=True, timeout=120)
    for pid in processes_of(path):
        psutil.Process(pid).kill()
    shutil.rmtree(path, ignore_errors=True)


def controller_state(folder: Path, name: str) -> str:
    out = subprocess.run([REPDISK, "ctl", str(folder / f"{name}-pri.ctrl.qmp"),
                          "query-controller", "--json"], capture_output=True, text=True,
                         timeout=30)
    return re.search(r'"state": "([a-z-]+)"', out.stdout).group(1) if out.returncode == 0 \
        else "unreachable"


def wait_state(folder: Path, name: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (got := controller_state(folder, name)) != state:
        assert time.monotonic() < deadline, f"{name}: {got}, expected {state}"
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_three_resources_up_replicate_fail_over_alone_and_down_all(folder: Path) -> None:
    names = ["alpha", "beta", "gamma"]
    for name in names:
        resource_file(folder, name)
    out = repdisk(folder, "up", "all").stdout
    assert out.splitlines() == [f"{n}: secondary, primary, controller" for n in names]
    assert repdisk(folder, "up", "beta").stdout == "beta: already up\n"
    for i, name in enumerate(names):
        wait_state(folder, name, "running")
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={folder}/{name}-pri.sock")
        h.pwrite(bytes([0x41 + i]) * MiB, 0)       # sync: on the secondary when acknowledged
        h.shutdown()
        with open(folder / f"{name}-sec.img", "rb") as f:
            assert f.read(MiB) == bytes([0x41 + i]) * MiB, name
    status = repdisk(folder, "status").stdout
    for name in names:
        assert f"{name} ({folder}/etc/{name}.toml)" in status
    assert status.count("controller running") == 3, status
    assert status.count("disk0    running") == 6, status

    subprocess.run([REPDISK, "ctl", str(folder / "beta-pri.ctrl.qmp"), "checkpoint"],
                   check=True, capture_output=True, timeout=60)   # the write is in it
    with open(folder / "beta-pri.qmp.pid") as f:
        psutil.Process(int(f.read())).kill()        # beta's primary dies
    wait_state(folder, "beta", "failed-over")
    h = nbd.NBD()                                    # beta's guest goes on on the secondary
    h.connect_uri(f"nbd+unix:///active?socket={folder}/beta-sec.sock")
    assert h.pread(MiB, 0) == b"\x42" * MiB
    h.shutdown()
    for name in ("alpha", "gamma"):
        assert controller_state(folder, name) == "running"

    assert processes_of(folder)
    out = repdisk(folder, "down", "all").stdout
    assert "alpha: stopped controller, primary, secondary" in out
    assert "beta: stopped controller, secondary" in out
    assert processes_of(folder) == {}
    for name in names:
        assert not (folder / f"{name}-pri.qmp").exists()
    assert "alpha: down" not in repdisk(folder, "status", ok=False).stdout  # names the role
    assert "  controller: down" in repdisk(folder, "status", "alpha", ok=False).stdout

    # beta after its failover, as the README says: sections swapped, up; the winner is the
    # primary, the old primary's disk its secondary, with the winner's bytes.
    swap_sections(folder / "etc" / "beta.toml", folder, "beta")
    assert repdisk(folder, "up", "beta").stdout == "beta: secondary, primary, controller\n"
    wait_state(folder, "beta", "running")
    with open(folder / "beta-pri.img", "rb") as f:
        assert f.read(MiB) == b"\x42" * MiB


@pytest.mark.timeout(120)
def test_a_config_error_changes_nothing_running(folder: Path) -> None:
    resource_file(folder, "alpha")
    repdisk(folder, "up", "alpha")
    before = processes_of(folder)
    assert len(before) == 3
    resource_file(folder, "beta", sec_disk=f"{folder}/alpha-sec.img")   # alpha's disk
    result = repdisk(folder, "up", "all", ok=False)
    assert result.stderr == (f"repdisk: error: {folder}/etc/beta.toml:11: secondary.disk: "
                             f"disk {folder}/alpha-sec.img is also used by "
                             f"{folder}/etc/alpha.toml ([secondary] disk); each resource needs "
                             "its own\n")
    repdisk(folder, "down", "alpha", ok=False)        # refused too: the folder is wrong
    assert processes_of(folder) == before             # nothing started, nothing stopped
    assert not (folder / "beta-sec.qmp").exists()


def _write(folder: Path, text: str, name: str = "x") -> Path:
    path = folder / "etc" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def check_refused(folder: Path, line: int, key: str, message: str) -> None:
    with pytest.raises(ResourceError) as err:
        resources.load_dir(str(folder / "etc"))
    assert (err.value.line, err.value.key) == (line, key), str(err.value)
    assert message in str(err.value), str(err.value)
    assert str(err.value).startswith(f"{err.value.path}:{line}: {key}: ")


def test_unknown_key_names_file_line_and_key(folder: Path) -> None:
    resource_file(folder, "alpha", extra='colour = "blue"\n')
    check_refused(folder, 18, "controller.colour", "unknown key; a [controller] section takes")
    result = repdisk(folder, "up", "all", ok=False)
    assert result.stderr.startswith(f"repdisk: error: {folder}/etc/alpha.toml:18: "
                                    "controller.colour: unknown key")
    assert processes_of(folder) == {}
    # status only reads: the other resources are still shown, the mistake in one line
    resource_file(folder, "beta")
    result = repdisk(folder, "status", ok=False)
    assert result.stderr.startswith(f"repdisk: error: {folder}/etc/alpha.toml:18: "
                                    "controller.colour: unknown key")
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout.splitlines() == [f"beta ({folder}/etc/beta.toml)",
                                          "  controller: down", "  secondary: down",
                                          "  primary: down"]
    result = repdisk(folder, "status", "alpha", ok=False)     # the one with the mistake
    assert (result.stdout, len(result.stderr.splitlines())) == ("", 1)
    assert "no resource named" not in result.stderr
    result = repdisk(folder, "status", "beta", ok=False)      # alpha's mistake not in the way
    assert result.stderr == "" and result.stdout.startswith("beta (")


def test_a_misspelt_key_gets_the_key_it_is_close_to(folder: Path) -> None:
    path = resource_file(folder, "alpha", extra='heartbeat-timout = "3s"\n')
    check_refused(folder, 18, "controller.heartbeat-timout",
                  "unknown key (did you mean heartbeat-timeout?); a [controller] section takes")
    path.write_text(path.read_text().replace('heartbeat-timout = "3s"\n', "")
                    .replace("write-mode =", "write_mode ="))
    check_refused(folder, 6, "primary.write_mode",
                  "unknown key (did you mean write-mode?); a [primary] section takes host, ")
    path.write_text(path.read_text().replace("write_mode =", "colour ="))
    check_refused(folder, 6, "primary.colour", "unknown key; a [primary] section takes host, ")
    text = path.read_text().replace("colour =", "write-mode =")
    path.write_text(text.replace("[controller]", "[controler]"))
    check_refused(folder, 15, "controler.controler",
                  "unknown section (did you mean controller?); a resource file has the sections")
    path.write_text(text.replace('nbd-socket = "' + str(folder) + '/alpha-sec.sock"\n',
                                 'nbd-socket = "' + str(folder) + '/alpha-sec.sock"\n'
                                 'write-mode = "sync"\n'))     # left behind by a swap
    check_refused(folder, 14, "secondary.write-mode",
                  "is a [primary] key: move it to [primary] (a primary's keys move with its "
                  "role when the sections are swapped)")
    path.write_text(text.replace('interval = "1s"', 'timeout = "1s"'))   # the primary's
    check_refused(folder, 16, "controller.timeout", "is a [primary] key: move it to [primary]")
    path.write_text(text.replace('write-mode = "sync"', 'interval = "1s"'))
    check_refused(folder, 6, "primary.interval",
                  "is a [controller] key: move it to [controller]")
    path.write_text(text.replace(f'"{folder}/alpha-sec.qmp"', '"alpha-sec.qmp"')
                    .replace(f'"{folder}/alpha-pri.img"', '"alpha-pri.img"'))
    check_refused(folder, 3, "primary.disk", "'alpha-pri.img' is a relative path")  # the first


def test_an_empty_config_folder_is_said(folder: Path) -> None:
    """up, down and status with no resource file said nothing and exited 0; with no
    folder, status said "DIR:0: config-dir: ..." as if the folder were a file's line."""
    result = repdisk(folder, "status", ok=False)
    assert (result.stdout, result.stderr) == ("", (
        f"repdisk: error: {folder}/etc is not a directory: create it and put one NAME.toml "
        "per resource there, or give --config-dir DIR\n"))
    (folder / "etc").mkdir()
    for command in ("up", "down", "status"):
        result = repdisk(folder, command, ok=False)
        assert (result.stdout, result.stderr) == ("", (
            f"repdisk: error: no resources in {folder}/etc: put one NAME.toml per resource "
            "there (see the README), or give --config-dir DIR\n")), command


def test_bad_values_are_the_nodes_own_messages(folder: Path) -> None:
    path = resource_file(folder, "alpha")
    path.write_text(path.read_text().replace('write-mode = "sync"', 'write-mode = "fast"'))
    check_refused(folder, 6, "primary.write-mode", "unknown mode 'fast': use sync or async")
    path.write_text(path.read_text().replace('write-mode = "fast"', 'resync-rate = "slow"'))
    check_refused(folder, 6, "primary.resync-rate", "cannot parse rate 'slow'")


def test_bad_controller_values_are_refused_before_anything_starts(folder: Path) -> None:
    """A [controller] value `repdisk controller` would refuse is refused by `up` with its
    file, line and key, before a node starts (not after, by the controller's start)."""
    path = resource_file(folder, "alpha")
    text = path.read_text()
    for line, written, key, message in (
            (16, 'interval = "0s"', "interval", "'0s' is not positive"),
            (17, 'heartbeat-timeout = "1s"', "heartbeat-timeout",
             "1s must exceed the heartbeat (1s)"),
            (18, 'initial-sync = "fast"', "initial-sync", "invalid choice: 'fast'"),
            (18, 'freeze = "maybe"', "freeze", "'maybe' is not a yes/no value"),
            (18, "freeze = true", "freeze", "needs the guest agent's socket"),
            (18, 'control-tcp = "127.0.0.1:1"', "control-tcp", "without TLS")):
        old = {16: 'interval = "1s"', 17: 'heartbeat-timeout = "2s"'}.get(line)
        path.write_text(text.replace(old, written) if old else text + written + "\n")
        check_refused(folder, line, f"controller.{key}", message)
    result = repdisk(folder, "up", "all", ok=False)
    assert result.stderr.startswith(f"repdisk: error: {folder}/etc/alpha.toml:18: "
                                    "controller.control-tcp: ")
    assert len(result.stderr.splitlines()) == 1
    assert processes_of(folder) == {}


def test_relative_paths_and_timings_a_controller_refuses_are_refused_before_up(
        folder: Path) -> None:
    """A relative path would name another file when up, down or status run from another
    folder (systemd's is /); a primary timeout the controller would refuse once the nodes
    run is refused first, with the file's keys in the advice."""
    path = resource_file(folder, "alpha")
    text = path.read_text()
    for line, old, new, key, message in (
            (3, f'"{folder}/alpha-pri.img"', '"alpha-pri.img"', "primary.disk",
             "'alpha-pri.img' is a relative path: give it from / (repdisk up, down and "
             "status run from any folder)"),
            (11, f'"{folder}/alpha-sec.img"', '"data:sec/alpha.img"', "secondary.disk",
             "'sec/alpha.img' is a relative path"),
            (12, f'"{folder}/alpha-sec.qmp"', '"alpha-sec.qmp"', "secondary.control",
             "'alpha-sec.qmp' is a relative path"),
            (18, "", 'metrics-file = "alpha.prom"\n', "controller.metrics-file",
             "'alpha.prom' is a relative path"),
            (18, "", 'control-tls = "x509:tls"\n', "controller.control-tls",
             "'tls' is a relative path"),
            (7, 'timeout = "1s"', 'timeout = "2s"', "primary.timeout",
             "2s must be below the controller's heartbeat-timeout (2s), or an isolated "
             "primary could still acknowledge writes after a failover: give [primary] "
             'timeout less, or [controller] heartbeat-timeout = "3s"'),
            (2, 'isolation-timeout = "1s"\n', "", "primary.isolation-timeout",
             "3s must be below the controller's heartbeat-timeout (2s)")):
        path.write_text(text.replace(old, new) if old else text + new)
        check_refused(folder, line, key, message)
    result = repdisk(folder, "up", "all", ok=False)
    assert result.stderr == (f"repdisk: error: {path}:2: primary.isolation-timeout: 3s must "
                             "be below the controller's heartbeat-timeout (2s), or an isolated "
                             "primary could still acknowledge writes after a failover: give "
                             "[primary] isolation-timeout less, or [controller] "
                             'heartbeat-timeout = "4s"\n')
    assert processes_of(folder) == {}


def test_two_resources_on_one_socket(folder: Path) -> None:
    resource_file(folder, "alpha")
    resource_file(folder, "beta", pri_sock=f"{folder}/alpha-pri.sock")
    check_refused(folder, 5, "primary.nbd-socket",
                  f"socket {folder}/alpha-pri.sock is also used by {folder}/etc/alpha.toml "
                  "([primary] nbd-socket)")


def test_missing_peer_and_missing_disk(folder: Path) -> None:
    path = resource_file(folder, "alpha")
    text = path.read_text()
    path.write_text(text.split("[secondary]")[0])
    check_refused(folder, 1, "secondary", "missing [secondary] section: a resource needs both "
                                          "nodes (its peer is missing)")
    path.write_text(text.replace(f"{folder}/alpha-sec.img", f"{folder}/nope.img"))
    check_refused(folder, 11, "secondary.disk", f"{folder}/nope.img does not exist")


def test_not_toml(folder: Path) -> None:
    _write(folder, "[primary]\ndisk = \n")
    check_refused(folder, 2, "syntax", "not valid TOML")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """The shipped units, with ExecStart pointing at this checkout's repdisk (the install
    links it to /usr/local/bin/repdisk), pass systemd-analyze verify without a word."""
    for unit in ("repdisk@.service", "repdisk.target"):
        text = (ROOT / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/repdisk", REPDISK))
    os.symlink("repdisk@.service", tmp_path / "repdisk@web.service")
    result = subprocess.run(["systemd-analyze", "verify", "./repdisk@web.service",
                             "./repdisk.target"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    service = (ROOT / "systemd" / "repdisk@.service").read_text()
    assert "ExecStart=/usr/local/bin/repdisk up %i" in service
    assert "ExecStop=/usr/local/bin/repdisk down %i" in service
    assert "WantedBy=repdisk.target" in service


@pytest.mark.timeout(180)
def test_up_after_the_roles_changed_names_the_sections_to_swap(folder: Path) -> None:
    """After a switchover the file's [primary] is the secondary's node.  With both nodes
    running, up restarts a killed controller alone, which adopts the pair as it is; with
    the nodes down, up refuses before starting anything and says what to change; with the
    sections swapped the pair runs."""
    path = resource_file(folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")
    pri, sec = (f"nbd+unix:///replica?socket={folder}/alpha-{r}.sock" for r in ("pri", "sec"))
    control = str(folder / "alpha-pri.ctrl.qmp")
    subprocess.run([REPDISK, "ctl", control, "controller-switchover", f"uri={pri}",
                    f"back-uri={sec}"], check=True, capture_output=True, timeout=60)
    b = json.loads(subprocess.run([REPDISK, "ctl", str(folder / "alpha-sec.qmp"), "status",
                                   "--json"], check=True, capture_output=True, text=True,
                                  timeout=60).stdout)
    assert (b["role"], b["timeout"], b["isolation"]["timeout"]) == ("primary", 1.6, 1.2)
    os.kill(int(Path(control + ".pid").read_text()), signal.SIGKILL)
    assert repdisk(folder, "up", "alpha").stdout == "alpha: controller\n"
    wait_state(folder, "alpha", "running")
    q = json.loads(subprocess.run([REPDISK, "ctl", control, "status", "--json"], check=True,
                                  capture_output=True, text=True, timeout=60).stdout)
    assert q["nodes"]["primary"]["socket"] == f"{folder}/alpha-sec.qmp"
    repdisk(folder, "down", "alpha")
    result = repdisk(folder, "up", "alpha", ok=False)
    assert result.stderr == (
        f"repdisk: error: alpha: the node of [primary] was last a secondary (epoch 2), so "
        f"the roles changed since {path} was written: swap its [primary] and [secondary] "
        "sections so that each names the role its node has now, then run up again\n")
    # nothing of it runs: no "take the resource down" first
    assert processes_of(folder) == {}
    swap_sections(path, folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")


@pytest.mark.timeout(180)
def test_up_refuses_a_fenced_node_as_the_primary(folder: Path) -> None:
    """After a failover that fenced the primary (the controller's, of a live primary), up
    of the unchanged file would start the fenced node as the primary and the winner as a
    secondary (a user trial saw the controller then stuck): it refuses, starting nothing;
    with the sections swapped the winner is the primary."""
    path = resource_file(folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")
    subprocess.run([REPDISK, "ctl", str(folder / "alpha-pri.ctrl.qmp"), "failover"],
                   check=True, capture_output=True, timeout=60)
    wait_state(folder, "alpha", "failed-over")
    repdisk(folder, "down", "alpha")
    result = repdisk(folder, "up", "alpha", ok=False)
    assert result.stderr.startswith("repdisk: error: alpha: the node of [primary] was "
                                    "fenced: "), result.stderr
    assert result.stderr.endswith(f", so the roles changed since {path} was written: swap its "
                                  "[primary] and [secondary] sections so that each names the "
                                  "role its node has now, then run up again\n"), result.stderr
    assert processes_of(folder) == {}
    swap_sections(path, folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")


def swap_sections(path: Path, folder: Path, name: str, keep_control: bool = True) -> None:
    """What the README says to do after the roles changed: the [primary] and [secondary]
    sections swapped (primary-only keys move with the role), the controller's socket kept
    (unless not ``keep_control``)."""
    head, rest = path.read_text().split("[primary]\n")
    primary, rest = rest.split("[secondary]\n")
    secondary, controller = rest.split("[controller]\n")
    moving = [line for line in primary.splitlines(keepends=True)   # primary-only keys
              if line.split(" = ")[0] in ("write-mode", "timeout", "isolation-timeout")]
    primary = "".join(line for line in primary.splitlines(keepends=True) if line not in moving)
    secondary += "".join(moving)
    control = f"control = \"{folder}/{name}-pri.ctrl.qmp\"\n" if keep_control else ""
    path.write_text(f"{head}[primary]\n{secondary}[secondary]\n{primary}[controller]\n"
                    f"{control}{controller}")


@pytest.mark.timeout(180)
def test_sections_swapped_while_up_leave_no_controller_behind(folder: Path) -> None:
    """The sections swapped while the resource runs, with no [controller] control key: the
    controller's default socket moves with [primary], so the running one is at the old
    default.  status shows it, up refuses to start a second controller beside it, changing
    nothing, and down stops it with the nodes (it was left running, holding the nodes)."""
    path = resource_file(folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")
    old = folder / "alpha-pri.ctrl.qmp"
    swap_sections(path, folder, "alpha", keep_control=False)
    status = repdisk(folder, "status", "alpha", ok=False).stdout
    assert "\n  controller: down\n" in status, status
    assert (f"\n  controller at {old}, from before the sections were swapped (repdisk down "
            "alpha stops it):\n  controller running ") in status, status
    running = processes_of(folder)
    bad = repdisk(folder, "up", "alpha", ok=False)
    assert bad.stderr == (f"repdisk: error: alpha: its controller still runs at {old}, its "
                          f"socket before {path}'s sections were swapped: take the resource "
                          "down first (repdisk down alpha stops it too), and give [controller] "
                          "a control key so that it keeps one socket\n")
    assert processes_of(folder) == running
    assert repdisk(folder, "down", "alpha").stdout == (   # [secondary]'s node is the primary
        f"alpha: stopped the controller at {old} (the sections were swapped while it ran), "
        "secondary, primary\n")
    assert processes_of(folder) == {}


@pytest.mark.timeout(180)
def test_two_ups_at_once_start_the_resource_once_and_two_downs_stop_it_once(
        folder: Path) -> None:
    """Two `up` of one resource at the same moment (two terminals, a unit file and a
    tired operator): one starts it, the other waits and finds it up; both succeed and the
    pair runs.  The same for two `down`."""
    resource_file(folder, "alpha")

    def twice(verb: str) -> list[str]:
        argv = [REPDISK, verb, "alpha", "--config-dir", str(folder / "etc")]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        assert [(rc, err) for rc, _, err in results] == [(0, "")] * 2, results
        return sorted(out for _, out, _ in results)

    assert twice("up") == ["alpha: already up\n", "alpha: secondary, primary, controller\n"]
    wait_state(folder, "alpha", "running")
    assert len(processes_of(folder)) == 3
    assert twice("down") == ["alpha: stopped controller, primary, secondary\n",
                             "alpha: stopped nothing (not running)\n"]
    assert processes_of(folder) == {}


@pytest.mark.timeout(180)
def test_a_file_naming_another_resources_sockets_starts_and_stops_nothing(
        folder: Path) -> None:
    """A resource file in another config directory whose [secondary] control is the
    socket of a running resource's node (a copied file), or whose [primary] control is a
    running controller's: up, and down, refuse in one line naming the socket and what
    serves it, and the running resource keeps every process."""
    resource_file(folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")
    running = processes_of(folder / "alpha")     # alpha's disks, sockets and controller
    assert len(running) == 3, running
    other = folder / "other"
    (other / "etc").mkdir(parents=True)
    for role in ("pri", "sec"):
        with open(other / f"dup-{role}.img", "wb") as f:
            f.truncate(32 * MiB)
    sec_pid = int((folder / "alpha-sec.qmp.pid").read_text())
    ctrl_pid = int((folder / "alpha-pri.ctrl.qmp.pid").read_text())
    for role, control, why in (
            ("secondary", f"{folder}/alpha-sec.qmp",
             f"is served by pid {sec_pid}, a node of {folder}/alpha-sec.img, not of "
             f"{other}/dup-sec.img: another resource's node? Give [secondary] a control "
             "socket of its own; nothing was started or stopped"),
            ("primary", f"{folder}/alpha-pri.ctrl.qmp",
             f"is the socket of a controller (pid {ctrl_pid}), not of a node: give [primary] "
             "a control socket of its own; nothing was started or stopped")):
        controls = {"primary": f"{other}/dup-pri.qmp", "secondary": f"{other}/dup-sec.qmp",
                    role: control}
        (other / "etc" / "dup.toml").write_text(
            f'[primary]\ndisk = "{other}/dup-pri.img"\ncontrol = "{controls["primary"]}"\n'
            f'nbd-socket = "{other}/dup-pri.sock"\n\n'
            f'[secondary]\ndisk = "{other}/dup-sec.img"\ncontrol = "{controls["secondary"]}"\n'
            f'nbd-socket = "{other}/dup-sec.sock"\n\n'
            f'[controller]\ncontrol = "{other}/dup.ctrl.qmp"\n')
        for verb in ("up", "down", "up"):
            bad = subprocess.run([REPDISK, verb, "dup", "--config-dir", str(other / "etc")],
                                 capture_output=True, text=True, timeout=60)
            assert (bad.returncode, bad.stdout, bad.stderr) == (
                1, "", f"repdisk: error: dup: [{role}] control {control} {why}\n"), bad
            assert processes_of(folder / "alpha") == running
            assert processes_of(other) == {}
        shown = subprocess.run([REPDISK, "status", "dup", "--config-dir", str(other / "etc")],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 1
        assert f"\n  {role}: [{role}] control {control} {why}\n" in shown.stdout, shown
    # Its own sockets, but alpha's secondary disk as its primary's: the disk's user is
    # named, not the state file of alpha's node (which says "a secondary").
    (other / "etc" / "dup.toml").write_text(
        (other / "etc" / "dup.toml").read_text()
        .replace(f"{folder}/alpha-pri.ctrl.qmp", f"{other}/dup-pri.qmp")
        .replace(f"{other}/dup-pri.img", f"{folder}/alpha-sec.img"))
    bad = subprocess.run([REPDISK, "up", "dup", "--config-dir", str(other / "etc")],
                         capture_output=True, text=True, timeout=60)
    assert (bad.returncode, bad.stdout, bad.stderr) == (
        1, "", f"repdisk: error: dup: [primary] disk {folder}/alpha-sec.img is in use by "
               f"repdisk node (pid {sec_pid}, control {folder}/alpha-sec.qmp): stop it first "
               "(two writers would corrupt it)\n"), bad
    assert processes_of(folder / "alpha") == running
    assert processes_of(other) == {}
    wait_state(folder, "alpha", "running")


def test_a_resource_files_path_or_all_among_names_is_refused_saying_what_to_give(
        folder: Path) -> None:
    """`repdisk up /etc/repdisk/alpha.toml` (a path where a name goes) and `down all alpha`
    get one line each that says what to type, and change nothing."""
    path = resource_file(folder, "alpha")
    for verb in ("up", "down"):
        bad = subprocess.run([REPDISK, verb, str(path)], capture_output=True, text=True,
                             timeout=60)
        assert (bad.returncode, bad.stdout, bad.stderr) == (
            1, "", f"repdisk: error: {path} is a resource file: give its name and its folder, "
                   f"repdisk {verb} alpha --config-dir {folder}/etc\n"), bad
        bad = repdisk(folder, verb, "all", "alpha", ok=False)
        assert (bad.stdout, bad.stderr) == (
            "", "repdisk: error: all names every resource: give it alone, or only names\n")
    assert processes_of(folder) == {}


@pytest.mark.timeout(180)
def test_down_stops_a_controller_whose_pid_file_was_lost(folder: Path) -> None:
    """The controller's pid file removed while it runs (by hand, by a cleanup): down still
    stops the controller serving the resource's socket, rather than removing the socket
    under it (the next up would start a second controller on the pair)."""
    resource_file(folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")
    (folder / "alpha-pri.ctrl.qmp.pid").unlink()
    assert repdisk(folder, "down", "alpha").stdout == (
        "alpha: stopped controller, primary, secondary\n")
    assert processes_of(folder) == {}


def test_a_controller_section_takes_every_option_of_repdisk_controller() -> None:
    """The README says a [controller] section takes any option of `repdisk controller`:
    every one but those `repdisk up` gives itself."""
    parser = argparse.ArgumentParser()
    controllercmd.add_parsers(parser.add_subparsers())
    options = {opt.removeprefix("--") for action in parser._subparsers._group_actions[0]
               .choices["controller"]._actions for opt in action.option_strings
               if opt.startswith("--")}
    given_by_up = {"help", "primary", "secondary", "log", "background", "pidfile"}
    assert options - given_by_up == set(resources.CONTROLLER_KEYS) - {"host"}


def test_a_joined_node_is_found_in_the_pair_file_of_the_controller_that_runs(
        folder: Path) -> None:
    """Sections swapped with no [controller] control key: the controller's socket moves
    with [primary].  A controller still running at the old socket has the pair file that
    is true now (a node it joined by a promotion is this resource's), even where an earlier
    cycle left a pair file at the new socket; with none running there, the file at the
    socket the sections give is the pair's."""
    path = resource_file(folder, "alpha")
    pri, sec, third = (f"{folder}/alpha-{n}.qmp" for n in ("pri", "sec", "c"))
    old = f"{folder}/alpha-pri.ctrl.qmp"
    Path(old + ".pair").write_text(json.dumps(
        {"options": [pri, sec], "primary": sec, "secondary": third, "write_mode": "sync"}))
    res = resources.load_file(str(path))
    assert updown.joined_nodes(res, resources.this_host()) == [("secondary", third)]
    swap_sections(path, folder, "alpha", keep_control=False)
    res = resources.load_file(str(path))
    assert res.controller.control == f"{folder}/alpha-sec.ctrl.qmp"
    assert updown.joined_nodes(res, resources.this_host()) == [("secondary", third)]
    assert updown.joined_nodes(res, "otherhost") == []
    Path(res.controller.control + ".pair").write_text(json.dumps(    # an earlier cycle's
        {"options": [sec, pri], "primary": sec, "secondary": pri, "write_mode": "sync"}))
    assert updown.joined_nodes(res, resources.this_host()) == []
    subprocess.run([REPDISK, "controller", "--primary", pri, "--secondary", sec, "--control",
                    old, "--background"], check=True, capture_output=True, timeout=60)
    try:
        assert updown.joined_nodes(res, resources.this_host()) == [("secondary", third)]
    finally:
        subprocess.run([REPDISK, "down", old], check=True, capture_output=True, timeout=60)


@pytest.mark.timeout(240)
def test_a_node_that_joined_by_a_promotion_is_stopped_and_the_swapped_file_wins(
        folder: Path) -> None:
    """After a failover and a promotion onto a third node, started by hand: status shows
    that node, and after the sections are swapped too, and down stops it; then up runs the
    pair the file names (the pair file, which names the third node, loses to the changed file);
    the old primary gets what the winner wrote meanwhile."""
    path = resource_file(folder, "alpha")
    repdisk(folder, "up", "alpha")
    wait_state(folder, "alpha", "running")
    os.kill(int((folder / "alpha-pri.qmp.pid").read_text()), signal.SIGKILL)
    wait_state(folder, "alpha", "failed-over")
    third = folder / "alpha-c.qmp"
    with open(folder / "alpha-c.img", "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run([REPDISK, "secondary", "--disk", str(folder / "alpha-c.img"), "--control",
                    str(third), "--nbd-socket", str(folder / "alpha-c.sock"), "--background",
                    "--pidfile", f"{third}.pid", "--log", f"{third}.log"], check=True,
                   capture_output=True, timeout=60)
    subprocess.run([REPDISK, "ctl", str(folder / "alpha-pri.ctrl.qmp"), "controller-promote",
                    f"secondary={third}", f"uri=nbd+unix:///replica?socket={folder}/alpha-c.sock"],
                   check=True, capture_output=True, timeout=60)
    wait_state(folder, "alpha", "running")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={folder}/alpha-sec.sock")
    h.pwrite(b"\x33" * MiB, 4 * MiB)            # while the third node is the secondary
    h.shutdown()
    status = repdisk(folder, "status", "alpha", ok=False).stdout   # [primary]'s node is down
    assert f"\n  secondary since a promotion ({third}):\n  secondary " in status, status
    assert "\n  primary: down\n" in status, status       # its socket is left by the kill
    assert f"\n  [secondary] {folder}/alpha-sec.qmp, a primary now:\n  primary   disk0 " \
        in status, status
    report = json.loads(repdisk(folder, "status", "alpha", "--json", ok=False).stdout)
    assert report["alpha"]["primary"] == {"socket": f"{folder}/alpha-pri.qmp", "kind": "down"}
    assert report["alpha"]["controller"]["query"]["state"] == "running"
    joined = report["alpha"]["joined-secondary"]
    assert (joined["socket"], joined["query"]["role"]) == (str(third), "secondary")
    swap_sections(path, folder, "alpha")         # as the failure matrix says, while it runs
    assert f"\n  secondary since a promotion ({third}):\n  secondary " in repdisk(
        folder, "status", "alpha", ok=False).stdout
    assert repdisk(folder, "down", "alpha").stdout == (   # [primary] now names the primary
        f"alpha: stopped controller, primary, {third} (its secondary since a promotion)\n")
    assert "writes are kept local" not in (folder / "alpha-sec.qmp.log").read_text()
    assert processes_of(folder) == {}
    assert not (folder / "alpha-c.sock").exists() and not third.exists()

    assert repdisk(folder, "up", "alpha").stdout == "alpha: secondary, primary, controller\n"
    wait_state(folder, "alpha", "running")
    q = json.loads(subprocess.run([REPDISK, "ctl", str(folder / "alpha-pri.ctrl.qmp"),
                                   "status", "--json"], check=True, capture_output=True,
                                  text=True, timeout=60).stdout)
    assert (q["nodes"]["primary"]["socket"], q["nodes"]["secondary"]["socket"]) == \
        (f"{folder}/alpha-sec.qmp", f"{folder}/alpha-pri.qmp")
    assert "since a promotion" not in repdisk(folder, "status", "alpha").stdout
    pair = json.loads((folder / "alpha-pri.ctrl.qmp.pair").read_text())  # rewritten: a swap
    assert (pair["options"], pair["primary"], pair["secondary"]) == (  # back cannot recall it
        [f"{folder}/alpha-sec.qmp", f"{folder}/alpha-pri.qmp"], f"{folder}/alpha-sec.qmp",
        f"{folder}/alpha-pri.qmp")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={folder}/alpha-sec.sock")
    h.pwrite(b"\x22" * MiB, 8 * MiB)            # sync: on the old primary when acknowledged
    h.shutdown()
    with open(folder / "alpha-pri.img", "rb") as f:
        assert f.read() == (folder / "alpha-sec.img").read_bytes()
        f.seek(4 * MiB)
        assert f.read(MiB) == b"\x33" * MiB
