"""What a resync costs the guest: 4 KiB write latency and resync throughput, per resync-rate.

A repdisk pair (write-mode sync, the default) started with `repdisk primary|secondary`; the
"guest" is fio (nbd engine) writing 4 KiB blocks at random, one at a time, at a steady rate
(--guest-iops) into the upper half of the disk. While it writes, a copier thread marks the
lower half dirty (`replication-mark-dirty`) and resyncs it (`replication-resync`), again and
again until fio ends, so a resync runs during the whole job. Cases, each with a fresh pair:

  idle      no resync: the guest's baseline
  max       resync-rate=max: unthrottled
  auto      resync-rate=auto: the default, backs off while the guest writes
  SIZE      resync-rate=SIZE: a fixed cap (--caps, e.g. 100M)

Reported per case: the guest's write p50/p99/p99.9 completion latency (fio clat) and the
resync's throughput while the guest wrote (bytes the resyncs sent during the job / its
length), plus each case's p99 over idle's. fio measures after a ramp second; the resync
starts in it, once the primary has counted a guest write. Repetitions are interleaved;
medians reported.

Run from the repository root: `.venv/bin/python -m bench.resync_rate [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import run as bench
from repdisk.qmp.client import QMPClient

MiB = 1 << 20
RAMP = 1  # seconds of fio's ramp time (not measured)


@dataclass
class Result:
    case: str
    p50_us: float
    p99_us: float
    p999_us: float
    iops: float
    resync_mibs: float  # MiB/s sent by resyncs while the guest wrote (0 for idle)


def _pair(workdir: Path, rate: str) -> tuple[Path, Path, bench.Cleanup]:
    """A started pair on the bench images; (primary URI's socket, primary control, cleanup)."""
    repdisk = bench._require_repdisk_nodes()
    s1, c1 = bench._socket_path(workdir, "rr-sec"), bench._socket_path(workdir, "rr-sec-ctl")
    s2, c2 = bench._socket_path(workdir, "rr-pri"), bench._socket_path(workdir, "rr-pri-ctl")
    secondary = [repdisk, "secondary", "--disk", str(workdir / bench.SECONDARY_IMG),
                 "--nbd-socket", str(s1), "--control", str(c1)]
    primary = [repdisk, "primary", "--disk", str(workdir / bench.PRIMARY_IMG),
               "--secondary", bench._unix_uri(s1, "replica"), "--nbd-socket", str(s2),
               "--control", str(c2), "--resync-rate", rate]

    def build(procs: bench.Procs) -> str:
        procs.serve("repdisk-secondary", secondary, [s1], [c1])
        procs.serve(f"repdisk-primary-{rate}", primary, [s2], [c2])
        bench._ctl(repdisk, c1, "replication-start", "mode=secondary")
        bench._ctl(repdisk, c2, "replication-start", "mode=primary")
        return str(s2)

    _, cleanup = bench._started(workdir, build)
    return s2, c2, cleanup


class Copier(threading.Thread):
    """Resyncs [0, length) over and over until stopped; counts what it sent and when."""

    def __init__(self, control: Path, length: int) -> None:
        super().__init__(name="resync-copier", daemon=True)
        self.client = QMPClient(timeout=300).connect(str(control))
        self.length = length
        self.stop = threading.Event()
        self.sent = 0                # by the resyncs that ended
        self.resyncing = False       # a resync of `length` marked bytes is under way
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.client.execute("replication-mark-dirty", runs=[[0, self.length]])
                with self.lock:
                    self.resyncing = True
                sent = self.client.execute("replication-resync")["bytes"]
                with self.lock:
                    self.sent += sent
                    self.resyncing = False
        except BaseException as err:  # noqa: BLE001 - reported by measure()
            self.error = err
        finally:
            self.client.close()

    def sent_so_far(self, control: Path) -> int:
        """Bytes sent until now, the resync under way included (marked minus still dirty)."""
        client = QMPClient(timeout=30).connect(str(control))
        try:
            with self.lock:
                dirty = client.execute("query-replication")["disks"][0]["dirty_bytes"]
                return self.sent + (self.length - dirty if self.resyncing else 0)
        finally:
            client.close()


def _fio(uri: str, offset: int, length: int, iops: int, runtime: int, out: Path) -> dict[str, Any]:
    options = ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--offset={offset}",
               f"--size={length}", f"--rate_iops={iops}", "--time_based",
               f"--runtime={runtime}", f"--ramp_time={RAMP}", "--randrepeat=0",
               "--percentile_list=50:99:99.9"]
    bench.run_fio("guest", uri, options, out)
    job = json.loads(out.read_text())["jobs"][0]["mixed"]
    return job


def _wait_for_guest(control: Path, timeout: float = 30.0) -> None:
    """Return once the primary has counted a guest write (fio is up and writing)."""
    client = QMPClient(timeout=30).connect(str(control))
    try:
        deadline = time.monotonic() + timeout
        while client.execute("query-replication")["disks"][0]["counters"]["writes"] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest wrote nothing within {timeout:g}s")
            time.sleep(0.02)
    finally:
        client.close()


def measure(workdir: Path, case: str, size: int, iops: int, runtime: int) -> Result:
    rate = "max" if case == "idle" else case
    sock, control, cleanup = _pair(workdir, rate)
    copier = None
    try:
        half = size // 2
        if case != "idle":
            copier = Copier(control, half)
        # fio records nothing during its first RAMP seconds: the copier starts in them, once
        # the guest writes (an adaptive resync would see a quiet guest before that and
        # copy at full speed).
        result: dict[str, Any] = {}
        guest = threading.Thread(target=lambda: result.update(job=_fio(
            bench._unix_uri(sock), half, half, iops, runtime, workdir / f"fio-{case}.json")))
        guest.start()
        _wait_for_guest(control)
        began = time.monotonic()
        if copier is not None:
            copier.start()
        guest.join()
        took = time.monotonic() - began
        if "job" not in result:
            raise RuntimeError(f"fio failed in case {case}; see {workdir / 'logs'}")
        job = result["job"]
        resync_mibs = 0.0
        if copier is not None:
            sent_during = copier.sent_so_far(control)
            copier.stop.set()
            copier.join(timeout=120)
            if copier.error is not None:
                raise RuntimeError(f"resync failed: {copier.error}")
            resync_mibs = sent_during / took / MiB
        pct = job["clat_ns"]["percentile"]
        return Result(case, pct["50.000000"] / 1000, pct["99.000000"] / 1000,
                      pct["99.900000"] / 1000, job["iops"], resync_mibs)
    finally:
        cleanup()


def render(results: dict[str, list[Result]], cfg: argparse.Namespace) -> str:
    def med(case: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results[case])

    idle = med("idle", "p99_us")
    lines = [f"Guest: fio 4 KiB random writes, QD1, {cfg.guest_iops} IOPS, {cfg.runtime} s; "
             f"resync of {cfg.size // 2 // MiB} MiB over and over meanwhile; write-mode sync; "
             f"median of {cfg.reps} interleaved runs.", "",
             "| resync-rate | guest p50 us | guest p99 us | p99 / idle | guest p99.9 us "
             "| resync MiB/s while the guest writes |",
             "|---|---|---|---|---|---|"]
    for case in results:
        lines.append(f"| {case} | {med(case, 'p50_us'):.0f} | {med(case, 'p99_us'):.0f} | "
                     f"{med(case, 'p99_us') / idle:.2f}x | {med(case, 'p999_us'):.0f} | "
                     + ("-" if case == "idle" else f"{med(case, 'resync_mibs'):.0f}") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB, 2 s, one repetition")
    ap.add_argument("--size", type=int, default=1024 * MiB, help="image bytes (default 1 GiB)")
    ap.add_argument("--runtime", type=int, default=10, help="fio seconds per case")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--guest-iops", type=int, default=500)
    ap.add_argument("--caps", default="100M", help="fixed caps to measure, comma-separated")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the table here too")
    cfg = ap.parse_args(argv)
    if cfg.quick:
        cfg.size, cfg.runtime, cfg.reps = 64 * MiB, 2, 1
    cases = ["idle", "max", "auto"] + [c for c in cfg.caps.split(",") if c]
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="rdr-", dir="/tmp"))
    try:
        bench.prepare_images(workdir, cfg.size)
        results: dict[str, list[Result]] = {c: [] for c in cases}
        for rep in range(cfg.reps):
            for case in cases:
                r = measure(workdir, case, cfg.size, cfg.guest_iops, cfg.runtime)
                print(f"rep {rep + 1} {case}: p99 {r.p99_us:.0f} us, resync "
                      f"{r.resync_mibs:.0f} MiB/s", file=sys.stderr)
                results[case].append(r)
        table = render(results, cfg)
        print(table)
        if cfg.out:
            cfg.out.write_text(table + "\n")
    finally:
        bench._stop_all_live()
        if cfg.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
