"""Who may connect to a node's sockets (issue 20, item 1): socket-owner/-group/-mode for the
NBD Unix socket and control-group/-mode for the control socket, through `repdisk` only.

A user that is not root is uid 65534 (nobody) with one group, made with setpriv: in the
socket's group it connects (libnbd to the NBD socket, a QMP greeting from the control
socket); in another group it is refused (EACCES), as it is from a node without the keys.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.commands import REPDISK

NOBODY = 65534
GROUP = grp.getgrgid(65534).gr_name   # Debian's nogroup
OTHER_GROUP = "daemon"
PROBE = """
import socket, sys
import nbd
what, path = sys.argv[1:]
try:
    if what == "nbd":
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///?socket=" + path)
        print("connected", h.get_size())
    else:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        print("connected", s.recv(9).decode())
except (nbd.Error, OSError) as err:
    print("refused", "EACCES" if "Permission denied" in str(err) else err)
"""


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder every user may pass through (pytest's tmp_path is root's alone); the nodes
    started in it are stopped at the end."""
    path = Path(tempfile.mkdtemp(prefix="repdisk-sock-"))
    path.chmod(0o711)
    yield path
    for pidfile in path.glob("*.pid"):
        subprocess.run([REPDISK, "ctl", str(pidfile)[:-4], "quit"], capture_output=True)
        pid = int(pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    shutil.rmtree(path, ignore_errors=True)


def as_user(group: str, what: str, path: Path) -> str:
    """What uid 65534 in ``group`` (and no other) gets when it connects to ``path``."""
    out = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", group,
                          "--clear-groups", sys.executable, "-c", PROBE, what, str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def secondary(folder: Path, *options: str) -> subprocess.CompletedProcess:
    disk = folder / "sec.img"
    if not disk.exists():
        with open(disk, "wb") as f:
            f.truncate(8 << 20)
    return subprocess.run([REPDISK, "secondary", "--disk", str(disk), "--control",
                           str(folder / "sec.qmp"), "--nbd-socket", str(folder / "sec.sock"),
                           *options], capture_output=True, text=True, timeout=60, cwd=folder)


def test_sockets_get_owner_group_and_mode_and_that_group_connects(folder: Path) -> None:
    started = secondary(folder, "--background", "--socket-group", GROUP, "--socket-mode",
                        "0660", "--control-group", GROUP, "--control-mode", "0660")
    assert started.returncode == 0, started.stderr
    for name in ("sec.sock", "sec.qmp"):
        st = os.stat(folder / name)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, NOBODY, 0o660), name
    assert as_user(GROUP, "nbd", folder / "sec.sock") == f"connected {8 << 20}"
    assert as_user(GROUP, "qmp", folder / "sec.qmp") == 'connected {"QMP": {'
    assert as_user(OTHER_GROUP, "nbd", folder / "sec.sock") == "refused EACCES"
    assert as_user(OTHER_GROUP, "qmp", folder / "sec.qmp") == "refused EACCES"


def test_socket_owner_and_the_defaults(folder: Path) -> None:
    """socket-owner alone gives the NBD socket to that user; without the keys only root
    may connect (control socket 0600 as before)."""
    started = secondary(folder, "--background", "--socket-owner", "nobody",
                        "--socket-mode", "0600")
    assert started.returncode == 0, started.stderr
    st = os.stat(folder / "sec.sock")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0, 0o600)
    assert as_user(OTHER_GROUP, "nbd", folder / "sec.sock") == f"connected {8 << 20}"
    ctl = os.stat(folder / "sec.qmp")
    assert (ctl.st_uid, ctl.st_gid, stat.S_IMODE(ctl.st_mode)) == (0, 0, 0o600)
    assert as_user(GROUP, "qmp", folder / "sec.qmp") == "refused EACCES"


@pytest.mark.parametrize("options, error", [
    (["--socket-group", "no-such-group"],
     "socket-group: no group 'no-such-group' on this host: give an existing group "
     "(getent group lists them), e.g. libvirt-qemu"),
    (["--socket-owner", "no-such-user"],
     "socket-owner: no user 'no-such-user' on this host: give an existing user "
     "(getent passwd lists them)"),
    (["--socket-mode", "rw"], "socket-mode: 'rw' is not a file mode: give octal permission "
                              "bits, e.g. 0660"),
    (["--control-group", "no-such-group"], "control-group: no group 'no-such-group' on this "
                                           "host: give an existing group (getent group lists "
                                           "them), e.g. libvirt-qemu"),
    (["--control-mode", "0666"], "control-mode: 0666 lets every local user control the pair: "
                                 "give the operators a group (control-group) and use 0660"),
])
def test_a_bad_value_is_one_line_naming_the_key_and_starts_nothing(
        folder: Path, options: list[str], error: str) -> None:
    for mode in ([], ["--background"]):
        result = secondary(folder, *mode, *options)
        assert result.returncode == 1
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line]
        assert len(lines) == 1 and lines[0].endswith(error), result.stdout + result.stderr
        assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".log")) == \
            ["sec.img"]


def test_socket_keys_need_a_unix_socket(folder: Path) -> None:
    with open(folder / "sec.img", "wb") as f:
        f.truncate(8 << 20)
    result = subprocess.run([REPDISK, "secondary", "--disk", str(folder / "sec.img"),
                             "--control", str(folder / "sec.qmp"), "--port", "10809",
                             "--socket-group", GROUP], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("repdisk: error: socket-group: is for an NBD Unix socket: give "
                             "--nbd-socket PATH, or leave the socket-* keys out for a TCP "
                             "listener\n")
