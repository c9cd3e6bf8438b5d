"""Smoke test of the benchmark harness: the peers start, fio runs, the table has numbers.

Real nbdkit, qemu-storage-daemon, qemu-nbd and fio; about 10 s. It also proves that the QEMU
peer writes both images (the harness skips a replicating system that does not), and that the
harness leaves no process behind.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ["file", "passthrough", "qemu"]


def _processes_using(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (psutil is a project dependency)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory for images and unix sockets (pytest's tmp_path can be too long)."""
    path = Path(tempfile.mkdtemp(prefix="rdb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(60)
def test_quick_run_measures_every_peer(tmp_path: Path, workdir: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--runtime", "1",
         "--systems", ",".join(PEERS), "--workloads", "randwrite4k", "--out", str(out),
         "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _processes_using(workdir) == []

    data = json.loads((out / "results.json").read_text())
    assert data["skipped"] == {}
    by_system = {r["system"]: r for r in data["results"] if r["workload"] == "randwrite4k"}
    assert sorted(by_system) == sorted(PEERS)
    for name, row in by_system.items():
        assert row["errors"] == [], name
        assert row["median"]["iops"] > 0 and row["median"]["mbps"] > 0, name
        assert row["median"]["p99_us"] > 0, name

    table = (out / "results.md").read_text()
    for name in PEERS:
        row = re.search(rf"^\| randwrite4k \| {name} \| ([\d,]+) \| ([\d,.]+) \| ([\d,]+) \|",
                        table, re.MULTILINE)
        assert row, f"no numeric row for {name} in:\n{table}"
    assert (out / "raw" / "verify-qemu.json").exists()
    assert table in proc.stdout
    assert "no chart" not in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
def test_quick_run_measures_repdisk_async_with_its_catch_up(tmp_path: Path,
                                                           workdir: Path) -> None:
    """repdisk's systems take a checkpoint before each job; an async primary also reports
    how far behind its secondary was when fio stopped, and that it caught up."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--runtime", "1",
         "--systems", "repdisk-async", "--workloads", "randwrite4k", "--out", str(out),
         "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _processes_using(workdir) == []
    data = json.loads((out / "results.json").read_text())
    assert data["skipped"] == {}
    (row,) = data["results"]
    assert row["errors"] == [] and row["median"]["iops"] > 0
    assert len(row["catch_ups"]) == 1
    lag, seconds = row["catch_ups"][0]
    assert lag >= 0 and 0 <= seconds < 60
    assert re.search(r"repdisk-async randwrite4k: when fio stopped the secondary was [\d.,]+ "
                     r"MiB behind at most and caught up within [\d.]+ s",
                     (out / "results.md").read_text())
