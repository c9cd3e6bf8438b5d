"""The README is true: its test command is what CI runs, and its worked example runs as shown."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.commands import lab_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = Path(ROOT, "README.md").read_text()
BIN = os.path.join(ROOT, ".venv", "bin")


def test_ci_runs_the_readme_test_command() -> None:
    assert "make check" in README
    ci = Path(ROOT, ".ci", "run").read_text()
    assert re.search(r"^make check$", ci, re.M)


def _example() -> list[tuple[str, list[str]]]:
    """The console blocks of the worked example, a failover and a fail-back, as (command,
    expected output lines)."""
    section = README.split("## A worked example", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```console")[1:]]
    assert len(blocks) == 2, "the worked example and its fail-back"
    steps: list[tuple[str, list[str]]] = []
    for line in "".join(blocks).strip("\n").splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line:
            steps[-1][1].append(line)
    return steps


def _normalise(text: str) -> str:
    """Drop what varies between runs: timings, ages and pids."""
    text = re.sub(r"\d+s ago", "Ns ago", re.sub(r"\d+\.\d+ ms", "N ms", text))
    return re.sub(r"pid \d+", "pid N", text)


@pytest.mark.timeout(90)
def test_worked_example_runs_as_shown(tmp_path) -> None:
    lab = str(tmp_path / "rl")
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])
    subprocess.run([os.path.join(BIN, "repdisk"), "lab", "--dir", lab, "--size", "256M"],
                   check=True, env=env, capture_output=True)
    try:
        for command, expected in _example():
            command = command.replace("/tmp/rl", lab)
            got = subprocess.run(command, shell=True, cwd=lab, env=env, text=True,
                                 capture_output=True)
            assert got.returncode == 0, f"{command}: {got.stderr}"
            out = [ln for ln in got.stdout.splitlines() if ln]
            for line in expected:  # every line the README shows is printed, in order
                assert _normalise(line) in map(_normalise, out), f"{command}: {line!r} not in {out}"
    finally:
        subprocess.run([os.path.join(BIN, "repdisk"), "lab", "--down", "--dir", lab], env=env,
                       capture_output=True)
    assert lab_processes(lab) == [], "lab --down stops the node restarted by hand too"


def _qemu_drive_options() -> list[list[str]]:
    """The README's two ways to attach QEMU, as argument lists."""
    block = README.split("## Attaching QEMU", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    drive = re.search(r"-drive (\S+)", block).group(1)
    blockdev = re.search(r"-blockdev '([^']+)'", block).group(1)
    device = re.search(r"-device (\S+)", block).group(1)
    return [["-drive", drive], ["-blockdev", blockdev, "-device", device]]


@pytest.mark.timeout(60)
def test_qemu_accepts_the_readme_drive_options(tmp_path) -> None:
    """QEMU starts with each option against a lab's primary, and reads the disk through it."""
    lab = str(tmp_path / "lab")
    repdisk = os.path.join(BIN, "repdisk")
    subprocess.run([repdisk, "lab", "--dir", lab, "--size", "64M"], check=True,
                   capture_output=True)
    try:
        for option in _qemu_drive_options():
            args = [a.replace("/path/pri.sock", os.path.join(lab, "pri.sock")) for a in option]
            proc = subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none",
                                     "-monitor", "none", "-serial", "none", "-accel", "tcg"]
                                    + args, stderr=subprocess.PIPE, text=True)
            try:
                _, err = proc.communicate(timeout=3)
                pytest.fail(f"QEMU refused {args}: {err}")
            except subprocess.TimeoutExpired:
                pass  # still running: it opened the NBD export
            finally:
                proc.kill()
                proc.wait()
    finally:
        subprocess.run([repdisk, "lab", "--down", "--dir", lab], capture_output=True)
