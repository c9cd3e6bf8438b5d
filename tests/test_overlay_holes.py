"""Copy-before-write of a hole records a hole (issue 15, item 4).

A zero, a trim or a ``qemu-img convert -n`` over clusters that are holes on the secondary
must not write zeros into its hidden overlay: ``du`` of the overlay stays 0, the active view
still reports holes, and still reads zeros; where the secondary had data, its old bytes are
kept and a failover restores them exactly.  Run as a user runs it: ``repdisk lab``,
QEMU's tools, ``repdisk ctl``.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.commands import REPDISK, qemu, run

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def lab_dir(lab_dir: str) -> str:
    """conftest's lab folder, with a lab up in it."""
    up = run([REPDISK, "lab", "--dir", lab_dir, "--size", "64M"], "/")
    assert up.returncode == 0, up.stderr
    return lab_dir


def ctl(folder: str, node: str, command: str) -> None:
    result = run([REPDISK, "ctl", f"{folder}/{node}.qmp", command], folder)
    assert result.stdout == "ok\n", result.stderr


def checkpoint(folder: str) -> None:
    for node, command in (("pri", "checkpoint"), ("sec", "checkpoint"), ("pri", "resume")):
        ctl(folder, node, command)


def du(path: str) -> int:
    """Bytes the file occupies on disk (``du``)."""
    return os.stat(path).st_blocks * 512


def data_map(uri: str) -> list[tuple[int, int]]:
    """(start, length) of what ``qemu-img map`` reports as data."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]


WRITES = {
    "convert -n": None,                                     # the whole disk, from a sparse file
    "write -z": ["write -z 40M 8M"],
    "trim": ["discard 0 8M"],
    "write -z -u": ["write -z -u 8M 8M"],
}


@pytest.mark.parametrize("how", list(WRITES))
def test_zeroing_holes_copies_no_bytes_into_the_hidden_overlay(lab_dir: str, how: str) -> None:
    guest = f"nbd+unix:///?socket={lab_dir}/pri.sock"
    active = f"nbd+unix:///active?socket={lab_dir}/sec.sock"
    hidden = f"{lab_dir}/sec.img.hidden"
    commands = WRITES[how]
    if commands is None:
        source = f"{lab_dir}/zeros.img"
        with open(source, "wb") as f:
            f.truncate(SIZE)
        qemu("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, guest)
    else:
        qemu("qemu-io", "-f", "raw", *[a for c in commands for a in ("-c", c)], guest)
    assert du(hidden) == 0
    assert data_map(active) == []
    qemu("qemu-io", "-f", "raw", "-c", f"read -P 0 0 {SIZE}", active)


def test_zeroing_data_keeps_its_old_bytes_and_failover_restores_them(lab_dir: str) -> None:
    guest = f"nbd+unix:///?socket={lab_dir}/pri.sock"
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x55 16M 1M", guest)
    checkpoint(lab_dir)
    qemu("qemu-io", "-f", "raw", "-c", f"write -z 0 {SIZE}", guest)  # over data and holes
    hidden = f"{lab_dir}/sec.img.hidden"
    assert du(hidden) == MiB                     # the old 1 MiB of data, nothing else
    assert data_map(f"nbd+unix:///active?socket={lab_dir}/sec.sock") == [(16 * MiB, MiB)]
    ctl(lab_dir, "sec", "failover")
    with open(f"{lab_dir}/sec.img", "rb") as f:
        assert f.read() == bytes(16 * MiB) + b"\x55" * MiB + bytes(SIZE - 17 * MiB)
