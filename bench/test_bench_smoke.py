"""Smoke test of the benchmark harness: the peers start, fio runs, the table has numbers.

Real nbdkit, qemu-storage-daemon, qemu-nbd and fio; about 20 s. It also proves that the QEMU
peers write both images (the harness skips a replicating system that does not), that
qemu-colo's hidden disk holds the old contents of exactly the written clusters and that its
checkpoints work, that every job runs hot and cold, and that the harness leaves no process
behind.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ["qemu-colo", "qemu-quorum", "file", "passthrough"]


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


@pytest.mark.timeout(90)
def test_quick_run_measures_every_peer_hot_and_cold(tmp_path: Path, workdir: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--runtime", "1",
         "--systems", ",".join(PEERS), "--workloads", "randwrite4k-qd1", "--out", str(out),
         "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=85)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _processes_using(workdir) == []

    data = json.loads((out / "results.json").read_text())
    assert data["skipped"] == {}
    rows = {(r["system"], r["cache"]): r for r in data["results"]}
    assert sorted(rows) == sorted((s, c) for s in PEERS for c in ("hot", "cold"))
    for key, row in rows.items():
        assert row["workload"] == "randwrite4k-qd1"
        assert row["errors"] == [], key
        assert row["median"]["iops"] > 0 and row["median"]["mbps"] > 0, key
        assert 0 < row["median"]["p50_us"] <= row["median"]["p99_us"], key
        (resident,) = row["resident"]
        # hot: both images read in first; cold: dropped (the job's own writes only)
        assert resident > 0.9 if key[1] == "hot" else resident < 0.1, (key, resident)

    table = (out / "results.md").read_text()
    for name in PEERS:
        for cache in ("hot", "cold"):
            row = re.search(rf"^\| randwrite4k-qd1 \| {name} \| {cache} \| ([\d,]+) \| "
                            r"([\d,]+)–([\d,]+) \| ([\d,.]+) \| ([\d,]+) \| ([\d,]+) \|",
                            table, re.MULTILINE)
            assert row, f"no numeric {cache} row for {name} in:\n{table}"
    for name in ("qemu-colo", "qemu-quorum"):
        assert (out / "raw" / f"verify-{name}.json").exists()
    assert "qemu-colo wrote both images" in proc.stderr
    assert "qemu-colo's hidden disk" not in proc.stderr
    # A checkpoint before each of the two jobs: generation 2 is the hidden disk in use.
    assert [p.name for p in workdir.glob("colo-hidden-*.qcow2")] == ["colo-hidden-2.qcow2"]
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
         "--systems", "repdisk-async", "--workloads", "randwrite4k", "--caches", "hot",
         "--out", str(out),
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
    assert re.search(r"repdisk-async randwrite4k hot: when fio stopped the secondary was [\d.,]+ "
                     r"MiB behind at most and caught up within [\d.]+ s",
                     (out / "results.md").read_text())


@pytest.mark.timeout(30)
def test_colo_hidden_check_refuses_a_wrong_buffer(workdir: Path) -> None:
    """The qemu-colo check passes a hidden disk holding exactly the old clusters, and fails
    one with an extra cluster or with other contents (real qemu-img and qemu-io)."""
    from bench.run import COLO_HIDDEN, SECONDARY_IMG, check_colo_hidden

    cluster = 64 << 10
    (workdir / SECONDARY_IMG).write_bytes(b"\0" * (4 << 20))
    hidden = workdir / (COLO_HIDDEN % 0)

    def make(*writes: tuple[int, str]) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(hidden), "4M"],
                       check=True)
        for offset, source in writes:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", source.format(offset=offset),
                            str(hidden)], check=True, capture_output=True)

    old = b"\x5a" * (2 * cluster)  # the secondary's old bytes of the two written clusters
    make((cluster, "write -P 0x5a {offset} 128k"))
    check_colo_hidden(workdir, cluster, old)
    make((cluster, "write -P 0x5a {offset} 128k"), (3 * cluster, "write -P 0x5a {offset} 4k"))
    with pytest.raises(RuntimeError, match="holds .* not the written clusters"):
        check_colo_hidden(workdir, cluster, old)
    make((cluster, "write -P 0x5a {offset} 128k"), (cluster, "write -P 0x11 {offset} 4k"))
    with pytest.raises(RuntimeError, match="does not hold the secondary's old contents"):
        check_colo_hidden(workdir, cluster, old)
