"""``repdisk lab``: one command brings up a replicating pair that QEMU's tools can use, and
``repdisk lab --down`` leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from repdisk.cli import lab
from tests.helpers.commands import REPDISK, lab_processes, qemu, run
from tests.helpers.nodes import read_file

MiB = 1 << 20


def test_lab_up_use_and_down(lab_dir: str) -> None:
    up = run([REPDISK, "lab", "--dir", lab_dir, "--size", "64M"], "/")
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stderr == ""
    m = re.search(r"^  qemu-system-x86_64 \.\.\. -drive file=(nbd\+unix:///\?socket=(\S+)),"
                  r"format=raw,if=virtio,cache=none$", up.stdout, re.M)
    assert m, up.stdout
    guest, socket = m.groups()
    assert socket == os.path.join(lab_dir, "pri.sock")
    assert len(lab_processes(lab_dir)) == 2

    info = qemu("qemu-img", "info", "--output=human", guest)
    assert re.search(r"^virtual size: 64 MiB \(67108864 bytes\)$", info, re.M), info
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 1M", guest)
    qemu("qemu-io", "-f", "raw", "-c", "read -P 0x22 1M 1M", "-c", "read -P 0 0 1M", guest)
    sec_img = read_file(os.path.join(lab_dir, "sec.img"))
    assert sec_img == bytes(MiB) + b"\x22" * MiB + bytes(62 * MiB)   # replicated (sync mode)

    pri, sec = (os.path.join(lab_dir, f"{r}.qmp") for r in ("pri", "sec"))
    status = run([REPDISK, "status", pri, sec], "/")
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [["primary", "disk0", "running"],
                                                     ["secondary", "disk0", "running"]]

    again = run([REPDISK, "lab", "--dir", lab_dir], "/")
    assert again.returncode == 1
    assert again.stderr == (f"repdisk: error: a lab is already running in {lab_dir} (found "
                            f"{os.path.join(lab_dir, 'sec.pid')}); run: {lab.command_name()} lab "
                            f"--down --dir {lab_dir}\n")
    assert len(lab_processes(lab_dir)) == 2

    down = run([REPDISK, "lab", "--down", "--dir", lab_dir], "/")
    assert (down.returncode, down.stdout) == (0, "repdisk lab: stopped primary, secondary\n")
    assert lab_processes(lab_dir) == []
    left = sorted(f for f in os.listdir(lab_dir) if f.endswith((".sock", ".qmp", ".pid")))
    assert left == []
    down = run([REPDISK, "lab", "--down", "--dir", lab_dir], "/")
    assert (down.returncode, down.stdout) == (0, "repdisk lab: stopped nothing (no node was "
                                                 "running)\n")
    down = run([REPDISK, "lab", "--down"], "/")            # --dir forgotten: not "nothing"
    assert (down.returncode, down.stdout) == (1, "")
    assert down.stderr == (f"repdisk: error: no lab in /repdisk-lab: give the folder it was "
                           f"brought up in, {lab.command_name()} lab --down --dir DIR\n")


def test_lab_comes_back_up_on_its_disks(lab_dir: str) -> None:
    """A second `repdisk lab` in the same folder reuses the disks (and their state files)."""
    for pattern in ("0x11", "0x22"):
        up = run([REPDISK, "lab", "--dir", lab_dir, "--size", "8M"], "/")
        assert up.returncode == 0, up.stdout + up.stderr
        guest = f"nbd+unix:///?socket={os.path.join(lab_dir, 'pri.sock')}"
        if pattern == "0x22":
            qemu("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", guest)
        qemu("qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 64k", guest)
        assert run([REPDISK, "lab", "--down", "--dir", lab_dir], "/").returncode == 0
    assert read_file(os.path.join(lab_dir, "sec.img"))[:65536] == b"\x22" * 65536


def test_lab_that_cannot_start_cleans_up(lab_dir: str) -> None:
    os.makedirs(lab_dir)
    os.mkdir(os.path.join(lab_dir, "sec.img"))          # not a usable disk
    up = run([REPDISK, "lab", "--dir", lab_dir, "--size", "8M"], "/")
    assert up.returncode == 1
    assert up.stderr.startswith("repdisk: error: node exited: nbdkit: repdisk: error: disk: ")
    assert "is not a regular file or block device" in up.stderr
    assert lab_processes(lab_dir) == []
    assert not any(f.endswith(".pid") for f in os.listdir(lab_dir))


def without_venv_on_path() -> dict[str, str]:
    """The environment after `make setup`: .venv/bin is not on PATH."""
    venv = os.path.dirname(REPDISK)
    path = [d for d in os.environ.get("PATH", "").split(":") if d and d != venv]
    return {**os.environ, "PATH": ":".join(path or ["/usr/bin", "/bin"])}


def test_lab_welcome_names_working_commands(lab_dir: str) -> None:
    """Every command the welcome text suggests runs exactly as printed, in a shell where
    `repdisk` is not on PATH (as after `make setup`): it names .venv/bin/repdisk."""
    env = without_venv_on_path()
    up = subprocess.run([REPDISK, "lab", "--dir", lab_dir, "--size", "8M"], cwd="/", env=env,
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    text = up.stdout.replace("\\\n", " ")                   # join continued lines
    suggested = [line.strip() for line in text.splitlines() if line.startswith("  ")
                 and not line.strip().startswith("qemu-system")]
    assert any("failover" in s for s in suggested)
    assert suggested[-1].startswith(f"{REPDISK} lab --down")
    assert all(s.startswith((REPDISK + " ", "qemu-")) for s in suggested), suggested
    script = "\n".join(suggested)
    done = subprocess.run(["bash", "-e", "-c", script], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert lab_processes(lab_dir) == []                    # its last line was --down


@pytest.mark.parametrize("size", ["1000", "1M-1", "1048577"])
def test_lab_refuses_a_size_no_disk_has(lab_dir: str, size: str) -> None:
    """A size without a unit is bytes: `--size 1000` would be a 1000-byte disk that the
    welcome's own commands cannot write, so it is refused, and nothing is created."""
    up = run([REPDISK, "lab", "--dir", lab_dir, "--size", size], "/")
    assert up.returncode == 1 and up.stdout == "", up
    if size == "1000":
        assert up.stderr == ("repdisk: error: --size: 1000 is 1000 bytes; a lab disk is at "
                             "least 1M and a multiple of 512 bytes: give a unit, e.g. "
                             "--size 1G\n"), up.stderr
    else:
        assert up.stderr.startswith("repdisk: error: --size: "), up.stderr
    assert not os.path.exists(lab_dir)


def test_lab_refuses_a_file_as_its_folder(lab_dir: str) -> None:
    """`--dir` naming a file (a disk image, say) is one line that says what to give, and
    the file is left as it was."""
    with open(lab_dir, "wb") as f:
        f.write(b"keep me")
    up = run([REPDISK, "lab", "--dir", lab_dir], "/")
    assert (up.returncode, up.stdout, up.stderr) == (1, "", (
        f"repdisk: error: --dir: {lab_dir} is a file, not a folder: give a new folder or the "
        "folder of a lab\n")), up
    with open(lab_dir, "rb") as f:
        assert f.read() == b"keep me"
