"""Costs that must grow with the work, not with the disk (issue 6, item 2).

Each number comes from repdisk's own code paths; where a process boundary matters, from real
nodes:

  checkpoint     the secondary's checkpoint (drop hidden + active: ``SecondaryReplica``,
                 library) on 1 GiB, 64 GiB and 1 TiB sparse disks with the same dirty bytes
                 written through the replica view (copy-before-write fills hidden), and on one
                 disk for several dirty sizes.  The primary's half of a checkpoint is a barrier
                 on the link, which does not depend on the disk at all.
  failover       ``stop(failover=True)`` committing hidden + active into the disk (library):
                 committed bytes / time.
  resync         a ``PrimaryReplica`` (library) whose local writes were made while not
                 replicating, started against a real ``repdisk secondary`` node: the copy of
                 every dirty region over NBD (``_copy_dirty``, the code resync runs) - time,
                 bytes the forwarder sent, and the dirty map's bytes.
  rss            resident memory (psutil) of real primary and secondary nbdkit nodes serving a
                 1 GiB and a 1 TiB sparse disk after the same writes.

Dirty data is written as 1 MiB pieces at random 1 MiB-aligned offsets spread over the whole
disk (the worst case for anything that scans), from a fixed seed. Run with
`.venv/bin/python -m bench.costs` or `python -m bench.run --costs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from repdisk.block.rawimage import RawImage
from repdisk.node.config import default, primary_settings
from repdisk.replication.framework import ReplicationMode
from repdisk.replication.primary import PrimaryReplica
from repdisk.replication.secondary import SecondaryReplica
from repdisk.units import parse_size

from . import run as bench

log = logging.getLogger(__name__)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PIECE = MiB
DISK_SIZES = (GiB, 64 * GiB, TiB)
EQUAL_DIRTY = 64 * MiB
DIRTY_SWEEP = (MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB)
SWEEP_DISK = 64 * GiB
FAILOVER_BYTES = 256 * MiB
RESYNC_BYTES = 256 * MiB
RSS_WRITES = 64 * MiB


@dataclass
class Costs:
    """Every measured number and the ratios derived from them (JSON-able)."""

    checkpoint_by_disk: dict[str, float] = field(default_factory=dict)   # disk -> seconds
    checkpoint_by_dirty: dict[str, float] = field(default_factory=dict)  # dirty -> seconds
    failover: dict[str, float] = field(default_factory=dict)
    resync: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)                  # node/disk -> MiB
    ratios: dict[str, float] = field(default_factory=dict)


def _human(n: int) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _offsets(size: int, nbytes: int, seed: int = 6) -> list[int]:
    """Distinct PIECE-aligned offsets spread over the disk covering ``nbytes``."""
    slots = size // PIECE
    return sorted(random.Random(seed).sample(range(slots), nbytes // PIECE))


def _sparse(path: Path, size: int) -> str:
    RawImage.create(path, size, exist_ok=True).close()
    return str(path)


def _remove_image(path: Path) -> None:
    """An image and everything named after it (overlays, bitmaps, state file)."""
    for p in path.parent.glob(path.name + "*"):
        p.unlink()


def _fresh_secondary(workdir: Path, size: int) -> SecondaryReplica:
    _remove_image(workdir / "sec.img")
    sec = SecondaryReplica.open("d0", _sparse(workdir / "sec.img", size),
                                cluster_size=parse_size("cluster-size", default("cluster-size")))
    sec.start(ReplicationMode.SECONDARY)
    return sec


def _write_replica(sec: SecondaryReplica, nbytes: int, data: memoryview) -> None:
    for piece in _offsets(sec.size, nbytes):
        sec.replica_view.pwrite(data, piece * PIECE)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def checkpoint_latency(workdir: Path, size: int, dirty: int, data: memoryview,
                       reps: int) -> float:
    """Median seconds of a secondary checkpoint with ``dirty`` bytes in hidden."""
    sec = _fresh_secondary(workdir, size)
    try:
        samples = []
        for _ in range(reps):
            _write_replica(sec, dirty, data)
            samples.append(_timed(sec.checkpoint))
        return statistics.median(samples)
    finally:
        sec.close()


def failover_commit(workdir: Path, nbytes: int, data: memoryview) -> dict[str, float]:
    """Commit ``nbytes`` of hidden (primary writes) plus a quarter as much of active."""
    sec = _fresh_secondary(workdir, 64 * GiB)
    try:
        sec.checkpoint()  # consistent: failover allowed
        _write_replica(sec, nbytes, data)
        for piece in _offsets(sec.size, nbytes // 4, seed=7):
            sec.active_view.pwrite(data, piece * PIECE)
        committed = sec.hidden_overlay.allocated_bytes + sec.active_overlay.allocated_bytes
        seconds = _timed(lambda: sec.stop(failover=True))
    finally:
        sec.close()
    return {"bytes": committed, "seconds": seconds, "mb_per_s": committed / seconds / 1e6}


def resync(workdir: Path, size: int, nbytes: int, data: memoryview) -> dict[str, float]:
    """Dirty ``nbytes`` on a library primary, then copy them to a real secondary node."""
    pri_img, sec_img = workdir / "rs-pri.img", workdir / "rs-sec.img"
    _remove_image(pri_img)
    _remove_image(sec_img)
    with _secondary_node(workdir, _sparse(sec_img, size)) as uri:
        pri = PrimaryReplica("d0", RawImage.open(_sparse(pri_img, size)), uri,
                             primary_settings())
        try:
            for piece in _offsets(size, nbytes, seed=8):  # not replicating yet: all dirty
                pri.view.pwrite(data, piece * PIECE)
            dirty = pri.dirty.dirty_bytes
            seconds = _timed(lambda: pri.start(ReplicationMode.PRIMARY))
            fwd = pri.link.forwarder
            sent = fwd.stats["bytes"] if fwd is not None else 0
            left = pri.dirty.dirty_bytes
        finally:
            pri.close()
    return {"written": nbytes, "dirty": dirty, "sent": sent, "left": left,
            "seconds": seconds, "mb_per_s": sent / seconds / 1e6}


class _secondary_node:
    """A real ``repdisk secondary`` node, replication started; yields its replica URI."""

    def __init__(self, workdir: Path, disk: str) -> None:
        self.workdir, self.disk = workdir, disk
        self.procs = bench.Procs(workdir / "logs")

    def __enter__(self) -> str:
        repdisk = bench._require_repdisk_nodes()
        sock = bench._socket_path(self.workdir, "cost-sec")
        ctl = bench._socket_path(self.workdir, "cost-sec-ctl")
        try:
            self.procs.serve("cost-secondary", [repdisk, "secondary", "--disk", self.disk,
                                                "--nbd-socket", str(sock), "--control",
                                                str(ctl)], [sock], [ctl])
            bench._ctl(repdisk, ctl, "replication-start", "mode=secondary")
        except BaseException:
            self.procs.stop()
            raise
        return bench._unix_uri(sock, "replica")

    def __exit__(self, *exc: object) -> None:
        self.procs.stop()


def node_rss(workdir: Path, size: int, data: memoryview) -> dict[str, float]:
    """RSS (MiB) of a real primary and secondary nbdkit node on ``size``-byte sparse disks,
    after RSS_WRITES of 1 MiB writes through the primary."""
    import nbd

    tag = _human(size).replace(" ", "")
    for name in (bench.PRIMARY_IMG, bench.SECONDARY_IMG):
        _remove_image(workdir / name)
    _sparse(workdir / f"rss-{tag}-pri.img", size)
    _sparse(workdir / f"rss-{tag}-sec.img", size)
    uri, cleanup = _start_pair(workdir, tag)
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        for piece in _offsets(size, RSS_WRITES, seed=9):
            h.pwrite(data, piece * PIECE)
        h.flush()
        h.shutdown()
        return {role: psutil.Process(pid).memory_info().rss / MiB
                for role, pid in _node_pids(workdir).items()}
    finally:
        cleanup()


def _start_pair(workdir: Path, tag: str) -> tuple[str, bench.Cleanup]:
    """bench.start_repdisk_pair on this size's images (it uses fixed image names)."""
    for role, img in (("primary", bench.PRIMARY_IMG), ("secondary", bench.SECONDARY_IMG)):
        link = workdir / img
        os.symlink(workdir / f"rss-{tag}-{role[:3]}.img", link)
    return bench.start_repdisk_pair(workdir, "sync")


def _node_pids(workdir: Path) -> dict[str, int]:
    """The nbdkit processes serving images in ``workdir``, by role."""
    pids = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "nbdkit" in cmd and str(workdir) in cmd:
            pids["primary" if "role=primary" in cmd else "secondary"] = proc.info["pid"]
    return pids


def measure(workdir: Path, quick: bool = False) -> Costs:
    data = memoryview(os.urandom(PIECE))
    reps = 1 if quick else 3
    costs = Costs()
    for size in DISK_SIZES:
        log.info("checkpoint, %s disk, %s dirty", _human(size), _human(EQUAL_DIRTY))
        costs.checkpoint_by_disk[_human(size)] = checkpoint_latency(
            workdir, size, EQUAL_DIRTY, data, reps)
    for dirty in DIRTY_SWEEP[:3] if quick else DIRTY_SWEEP:
        log.info("checkpoint, %s disk, %s dirty", _human(SWEEP_DISK), _human(dirty))
        costs.checkpoint_by_dirty[_human(dirty)] = checkpoint_latency(
            workdir, SWEEP_DISK, dirty, data, reps)
    log.info("failover commit")
    costs.failover = failover_commit(workdir, FAILOVER_BYTES // (4 if quick else 1), data)
    log.info("resync")
    costs.resync = resync(workdir, TiB, RESYNC_BYTES // (4 if quick else 1), data)
    for size in (GiB, TiB):
        log.info("node RSS, %s disks", _human(size))
        for role, mib in node_rss(workdir, size, data).items():
            costs.rss[f"{role} {_human(size)}"] = mib
    by_disk = costs.checkpoint_by_disk
    costs.ratios = {
        "checkpoint 1 TiB / 1 GiB (equal dirty)": by_disk["1 TiB"] / by_disk["1 GiB"],
        "checkpoint 64 GiB / 1 GiB (equal dirty)": by_disk["64 GiB"] / by_disk["1 GiB"],
        "resync bytes sent / dirty bytes": costs.resync["sent"] / costs.resync["dirty"],
        "primary RSS 1 TiB / 1 GiB": costs.rss["primary 1 TiB"] / costs.rss["primary 1 GiB"],
        "secondary RSS 1 TiB / 1 GiB": (costs.rss["secondary 1 TiB"]
                                        / costs.rss["secondary 1 GiB"]),
    }
    return costs


def render(costs: Costs) -> str:
    """The costs as one Markdown table (plus the ratios)."""
    rows = [(f"checkpoint latency, {_human(EQUAL_DIRTY)} dirty, {d} disk",
             f"{s * 1000:,.1f} ms") for d, s in costs.checkpoint_by_disk.items()]
    rows += [(f"checkpoint latency, {d} dirty, {_human(SWEEP_DISK)} disk", f"{s * 1000:,.1f} ms")
             for d, s in costs.checkpoint_by_dirty.items()]
    f, r = costs.failover, costs.resync
    rows.append((f"failover commit ({f['bytes'] / MiB:,.0f} MiB)",
                 f"{f['mb_per_s']:,.0f} MB/s ({f['seconds']:.2f} s)"))
    rows.append((f"resync over NBD ({r['dirty'] / MiB:,.0f} MiB dirty, 1 TiB disk)",
                 f"{r['mb_per_s']:,.0f} MB/s ({r['seconds']:.2f} s), "
                 f"sent {r['sent'] / MiB:,.0f} MiB, {r['left']:.0f} B left dirty"))
    rows += [(f"RSS, {k} sparse disk node", f"{v:,.0f} MiB") for k, v in costs.rss.items()]
    rows += [(k, f"{v:.2f}") for k, v in costs.ratios.items()]
    lines = ["| cost | measured |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def run_costs(out: Path, workdir: Path | None = None, quick: bool = False) -> str:
    """Measure, write costs.md and costs.json into ``out``, return the Markdown."""
    own = workdir is None
    wd = workdir or Path(tempfile.mkdtemp(prefix="rdcost-", dir="/var/tmp"))
    try:
        costs = measure(wd, quick)
    finally:
        bench._stop_all_live()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
    markdown = render(costs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "costs.md").write_text(markdown)
    (out / "costs.json").write_text(json.dumps(costs.__dict__, indent=2) + "\n")
    return markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.costs", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, smaller amounts")
    ap.add_argument("--out", type=Path, default=Path("results") / "costs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    print(run_costs(args.out.resolve(), quick=args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
