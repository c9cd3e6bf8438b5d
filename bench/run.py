"""Benchmark repdisk against its peers in one run, on the same files and the same machine.

Every system serves the same primary image (and, where it replicates, the same secondary
image) over an NBD Unix socket, and fio's `nbd` engine drives it, so the client side is
identical and the only variable is the server stack:

  file           nbdkit's C file plugin on the primary image: the limit for any nbdkit server
  passthrough    bench/passthrough.py, a minimal nbdkit Python plugin: the ceiling for repdisk's
  qemu           qemu-storage-daemon: quorum(vote-threshold=1, fifo) over [file node on the
                 primary, nbd client -> qemu-nbd on the secondary]: QEMU's own replication peer
  repdisk-sync   repdisk primary (write-mode sync) replicating to a repdisk secondary
  repdisk-async  the same in write-mode async

Repetitions are interleaved (rep 1 of every system, then rep 2 ...) so slow drift of the
machine spreads over all systems; the median of each metric is reported. A system that cannot
start is skipped with a note in the table; the run goes on.

Run from the repository root: `.venv/bin/python -m bench.run [--quick] [--systems a,b]`.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import datetime as dt
import functools
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import nbd

from repdisk.errors import RepdiskError  # a control command of repdisk's hooks failed
from repdisk.qmp import QMPClient

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
PASSTHROUGH = BENCH_DIR / "passthrough.py"
REPDISK = ROOT / ".venv" / "bin" / "repdisk"
PRIMARY_IMG = "primary.img"
SECONDARY_IMG = "secondary.img"
MiB = 1 << 20
CHUNK = 4 * MiB
PAGE = 4096  # see prepare_images
VERIFY_LEN = 4 * MiB
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

Cleanup = Callable[[], None]
StartFn = Callable[[Path], "tuple[str, Cleanup]"]


# ---------------------------------------------------------------------------------------------
# Processes: every child is tracked, dies with us (PR_SET_PDEATHSIG), and is stopped in reverse
# start order (clients before the servers they talk to).

_LIVE: set[subprocess.Popen[bytes]] = set()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the harness dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not exit on SIGTERM, killing it", proc.pid)
            proc.kill()
            proc.wait()
    _LIVE.discard(proc)


def _stop_all_live() -> None:
    for proc in list(_LIVE):
        _stop_process(proc)


def _raise_system_exit(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops its processes."""
    raise SystemExit(128 + signum)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Procs:
    """The processes one system started, with their logs in `logdir`."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        self.logdir.mkdir(parents=True, exist_ok=True)
        logpath = self.logdir / f"{name}.log"
        log.debug("starting %s: %s", name, " ".join(argv))
        with open(logpath, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    preexec_fn=_die_with_parent)
        _LIVE.add(proc)
        self._procs.append((name, proc, logpath))
        return proc, logpath

    def serve(self, name: str, argv: list[str], nbd_sockets: Sequence[Path],
              control_sockets: Sequence[Path] = ()) -> None:
        """Start a server and return once it serves NBD on `nbd_sockets` and accepts
        connections on `control_sockets`."""
        for path in (*nbd_sockets, *control_sockets):
            path.unlink(missing_ok=True)
        proc, logpath = self.spawn(name, argv)
        for path in nbd_sockets:
            _wait_until(name, proc, logpath, path, _probe_nbd)
        for path in control_sockets:
            _wait_until(name, proc, logpath, path, _probe_connect)

    def stop(self) -> None:
        for _name, proc, _logpath in reversed(self._procs):
            _stop_process(proc)
        self._procs.clear()


def _probe_nbd(path: Path) -> None:
    """A full NBD handshake ended with NBD_OPT_ABORT: the server logs no error for it."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(_unix_uri(path))
    h.opt_abort()


def _probe_connect(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))


def _wait_until(name: str, proc: subprocess.Popen[bytes], logpath: Path, path: Path,
                probe: Callable[[Path], None]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before listening "
                               f"on {path}: {_tail(logpath)}")
        if path.exists():
            try:
                probe(path)
                return
            except (OSError, nbd.Error):
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} is not listening on {path} after {START_TIMEOUT:.0f} s:"
                               f" {_tail(logpath)}")
        time.sleep(0.02)


def _started(workdir: Path, build: Callable[[Procs], str]) -> tuple[str, Cleanup]:
    """Run `build` with a fresh Procs; on any failure stop what it had started, then raise."""
    procs = Procs(workdir / "logs")
    try:
        return build(procs), procs.stop
    except BaseException:
        procs.stop()
        raise


def _socket_path(workdir: Path, name: str) -> Path:
    path = workdir / "sock" / f"{name}.sock"
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(str(path)) > 100:
        raise RuntimeError(f"socket path {path} is too long for a unix socket: use a shorter "
                           "--workdir")
    return path


def _unix_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


# ---------------------------------------------------------------------------------------------
# The systems. Each start function takes the work directory (PRIMARY_IMG and SECONDARY_IMG are
# there) and returns (NBD URI to benchmark, cleanup).

def _start_nbdkit(workdir: Path, name: str, plugin: list[str]) -> tuple[str, Cleanup]:
    sock = _socket_path(workdir, name)
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), *plugin]

    def build(procs: Procs) -> str:
        procs.serve(f"nbdkit-{name}", argv, [sock])
        return _unix_uri(sock)

    return _started(workdir, build)


def start_file(workdir: Path) -> tuple[str, Cleanup]:
    return _start_nbdkit(workdir, "file", ["file", f"file={workdir / PRIMARY_IMG}"])


def start_passthrough(workdir: Path) -> tuple[str, Cleanup]:
    return _start_nbdkit(workdir, "passthrough",
                         ["python", str(PASSTHROUGH), f"file={workdir / PRIMARY_IMG}"])


def _blockdev(spec: dict[str, Any]) -> list[str]:
    return ["--blockdev", json.dumps(spec)]


def start_qemu(workdir: Path) -> tuple[str, Cleanup]:
    """QEMU's peer stack: qemu-nbd serves the secondary; qemu-storage-daemon exports a quorum
    whose children are the primary's file node (read first: fifo) and an NBD client to it."""
    sec_sock = _socket_path(workdir, "qemu-sec")
    pri_sock = _socket_path(workdir, "qemu-pri")
    secondary = ["qemu-nbd", "--format=raw", "--persistent", "--export-name=secondary",
                 f"--socket={sec_sock}", str(workdir / SECONDARY_IMG)]
    primary = [
        "qemu-storage-daemon",
        *_blockdev({"driver": "file", "node-name": "pri-file",
                    "filename": str(workdir / PRIMARY_IMG)}),
        *_blockdev({"driver": "nbd", "node-name": "sec-nbd", "export": "secondary",
                    "server": {"type": "unix", "path": str(sec_sock)}}),
        *_blockdev({"driver": "quorum", "node-name": "quorum", "vote-threshold": 1,
                    "read-pattern": "fifo", "children": ["pri-file", "sec-nbd"]}),
        "--nbd-server", f"addr.type=unix,addr.path={pri_sock}",
        "--export", "type=nbd,id=exp0,node-name=quorum,name=quorum,writable=on",
    ]

    def build(procs: Procs) -> str:
        procs.serve("qemu-nbd-secondary", secondary, [sec_sock])
        procs.serve("qemu-storage-daemon", primary, [pri_sock])
        return _unix_uri(pri_sock, "quorum")

    return _started(workdir, build)


def _require_repdisk_nodes() -> str:
    """The repdisk console script, if it has `primary` and `secondary`; else NotImplementedError."""
    if not REPDISK.exists():
        raise NotImplementedError(f"repdisk: {REPDISK} is missing: run `make setup`")
    for sub in ("primary", "secondary"):
        res = subprocess.run([str(REPDISK), sub, "--help"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise NotImplementedError(f"repdisk {sub} is not available yet ({why})")
    return str(REPDISK)


def _ctl(repdisk: str, control: Path, *command: str) -> None:
    res = subprocess.run([repdisk, "ctl", str(control), *command], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"repdisk ctl {control} {' '.join(command)} failed: "
                           f"{res.stderr.strip() or res.stdout.strip()}")


def start_repdisk_pair(workdir: Path, mode: str) -> tuple[str, Cleanup]:
    """A repdisk secondary on SECONDARY_IMG and a primary on PRIMARY_IMG replicating to it with
    `--write-mode mode` (sync|async), both started replicating. Returns the primary's URI."""
    repdisk = _require_repdisk_nodes()
    s1, c1 = _socket_path(workdir, "rd-sec"), _socket_path(workdir, "rd-sec-ctl")
    s2, c2 = _socket_path(workdir, "rd-pri"), _socket_path(workdir, "rd-pri-ctl")
    secondary = [repdisk, "secondary", "--disk", str(workdir / SECONDARY_IMG),
                 "--nbd-socket", str(s1), "--control", str(c1)]
    primary = [repdisk, "primary", "--disk", str(workdir / PRIMARY_IMG),
               "--secondary", _unix_uri(s1, "replica"), "--nbd-socket", str(s2),
               "--control", str(c2), "--write-mode", mode]

    def build(procs: Procs) -> str:
        procs.serve("repdisk-secondary", secondary, [s1], [c1])
        procs.serve(f"repdisk-primary-{mode}", primary, [s2], [c2])
        _ctl(repdisk, c1, "replication-start", "mode=secondary")
        _ctl(repdisk, c2, "replication-start", "mode=primary")
        return _unix_uri(s2)

    return _started(workdir, build)


def repdisk_checkpoint(workdir: Path) -> None:
    """Before each job: a pair checkpoint, so every job starts as right after one (empty
    overlays: the secondary copies each cluster's old contents the first time the job
    writes it), whatever the jobs before it wrote; a deployment checkpoints every few
    seconds, so that copy is part of its steady state, and job order must not hide it."""
    primary = QMPClient(timeout=30).connect(str(_socket_path(workdir, "rd-pri-ctl")))
    try:
        secondary = QMPClient(timeout=30).connect(str(_socket_path(workdir, "rd-sec-ctl")))
        try:
            primary.execute("replication-do-checkpoint")
            try:
                secondary.execute("replication-do-checkpoint")
            finally:
                primary.execute("replication-resume")
        finally:
            secondary.close()
    finally:
        primary.close()


def repdisk_catch_up(workdir: Path, timeout: float = 120.0) -> tuple[int, float]:
    """After a job: the primary's lag (bytes acknowledged to fio, not yet confirmed by the
    secondary) and the seconds until it is 0.  An async primary's IOPS mean little without
    them: they say how far behind the secondary was when fio stopped."""
    client = QMPClient(timeout=10).connect(str(_socket_path(workdir, "rd-pri-ctl")))
    try:
        def lag() -> int:
            q = client.execute("query-replication")
            return sum(d["lag_bytes"] + d["dirty_bytes"] for d in q["disks"])

        t0, first = time.monotonic(), lag()
        left = first
        while left and time.monotonic() - t0 < timeout:
            time.sleep(0.01)
            left = lag()
        if left:
            raise RuntimeError(f"the secondary was still {left} bytes behind {timeout:g}s "
                               "after the job")
        return first, time.monotonic() - t0
    finally:
        client.close()


@dataclass(frozen=True)
class System:
    name: str
    description: str
    start: StartFn
    replicated: bool  # writes must reach SECONDARY_IMG too (checked before measuring)
    # Before each job (repdisk: a checkpoint, see repdisk_checkpoint).
    before_job: Callable[[Path], None] | None = None
    # After each job: (lag bytes, seconds to catch up) of a system that acknowledges first.
    catch_up: Callable[[Path], tuple[int, float]] | None = None


SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("file", "nbdkit file plugin (C), primary image only: the limit", start_file, False),
    System("passthrough", "nbdkit Python passthrough plugin: the ceiling for Python plugins",
           start_passthrough, False),
    System("qemu", "qemu-storage-daemon quorum(file, nbd->qemu-nbd), vote-threshold=1",
           start_qemu, True),
    System("repdisk-sync", "repdisk primary, write-mode sync, -> repdisk secondary",
           functools.partial(start_repdisk_pair, mode="sync"), True, repdisk_checkpoint),
    System("repdisk-async", "repdisk primary, write-mode async, -> repdisk secondary",
           functools.partial(start_repdisk_pair, mode="async"), True, repdisk_checkpoint,
           repdisk_catch_up),
]}
PEERS = ("file", "passthrough", "qemu")


# ---------------------------------------------------------------------------------------------
# Workloads and fio.

@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    rwmixread: int | None = None

    def fio_options(self) -> list[str]:
        opts = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}"]
        return opts + ([f"--rwmixread={self.rwmixread}"] if self.rwmixread is not None else [])


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("randwrite4k", "randwrite", "4k", 16),
    Workload("randread4k", "randread", "4k", 16),
    Workload("seqwrite1m", "write", "1m", 4),
    Workload("randrw4k-70r", "randrw", "4k", 16, rwmixread=70),
]}


@dataclass
class Sample:
    iops: float
    mbps: float  # 10^6 bytes per second, reads and writes together
    p99_us: float  # 99th percentile completion latency, reads and writes together


def run_fio(name: str, uri: str, options: list[str], output: Path) -> Sample:
    """One fio job against `uri`; statistics of reads and writes are merged (`mixed`)."""
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", *options,
            "--unified_rw_reporting=mixed", "--output-format=json", f"--output={output}"]
    runtime = next((int(o.split("=")[1]) for o in options if o.startswith("--runtime=")), 0)
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=runtime + 120, preexec_fn=_die_with_parent)
    if res.returncode != 0:
        raise RuntimeError(f"fio {name} on {uri} failed with status {res.returncode}: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
    return parse_fio(output)


def parse_fio(path: Path) -> Sample:
    """IOPS, MB/s and p99 from fio's JSON (written with unified_rw_reporting=mixed)."""
    try:
        job = json.loads(path.read_text())["jobs"][0]
        mixed = job["mixed"]
        sample = Sample(iops=mixed["iops"], mbps=mixed["bw_bytes"] / 1e6,
                        p99_us=mixed["clat_ns"]["percentile"]["99.000000"] / 1000)
    except (ValueError, KeyError, IndexError) as err:
        raise RuntimeError(f"fio output {path} is not the expected JSON: {err!r}") from err
    if job["error"] or not mixed["io_bytes"]:
        raise RuntimeError(f"fio job in {path} failed: error {job['error']}, "
                           f"{mixed['io_bytes']} bytes done")
    return sample


# ---------------------------------------------------------------------------------------------
# Images and the replication check.

def prepare_images(workdir: Path, size: int) -> None:
    """Write both images fully with the same random data, so reads hit real blocks and the
    secondary starts identical to the primary (as after a full sync).

    Written PAGE bytes per call: Linux (6.x, ext4 with large folios) caches a file in folios
    as large as the writes that created it, and a 4 KiB write into a 2 MiB folio dirties the
    whole folio. Images written in 4 MiB calls cut the nbdkit file plugin's 4 KiB random
    writes from ~190k to ~15k IOPS on the bench machine, for every system alike: the table
    then measured the kernel's writeback, not the data paths. Small folios are what a disk
    written by a guest in 4 KiB blocks has."""
    paths = [workdir / PRIMARY_IMG, workdir / SECONDARY_IMG]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for p in paths]
    try:
        for offset in range(0, size, CHUNK):
            chunk = memoryview(os.urandom(min(CHUNK, size - offset)))
            for fd in fds:
                for page in range(0, len(chunk), PAGE):
                    os.pwrite(fd, chunk[page:page + PAGE], offset + page)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _read_region(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def verify_replication(system: System, workdir: Path, size: int, rawdir: Path) -> None:
    """Write a fresh pattern through the system, stop it, and require every byte of the
    region to be that pattern in BOTH images; raise a one-line error otherwise."""
    pattern = os.urandom(4)
    offset, length = size // 2, min(VERIFY_LEN, size // 2)
    expected = pattern * (length // len(pattern))
    uri, cleanup = system.start(workdir)
    try:
        run_fio(f"verify-{system.name}", uri,
                ["--rw=write", "--bs=1m", "--iodepth=4", f"--offset={offset}",
                 f"--size={length}", f"--buffer_pattern=0x{pattern.hex()}",
                 "--scramble_buffers=0", "--end_fsync=1"],
                rawdir / f"verify-{system.name}.json")
    finally:
        cleanup()
    for img in (PRIMARY_IMG, SECONDARY_IMG):
        if _read_region(workdir / img, offset, length) != expected:
            raise RuntimeError(f"{system.name} did not write {img}: {length} bytes at {offset} "
                               "differ from what fio wrote")
    log.info("%s wrote both images: %d bytes at %d checked", system.name, length, offset)


# ---------------------------------------------------------------------------------------------
# The run.

@dataclass
class Cell:
    system: str
    workload: str
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    catch_ups: list[tuple[int, float]] = field(default_factory=list)  # System.catch_up

    def median(self) -> Sample | None:
        if not self.samples:
            return None
        return Sample(*(statistics.median(getattr(s, f) for s in self.samples)
                        for f in ("iops", "mbps", "p99_us")))


@dataclass
class Config:
    """One run's choices, resolved from the command line (--quick only changes defaults)."""

    systems: list[str]
    workloads: list[str]
    runtime: int
    reps: int
    size: int
    out: Path
    workdir: Path
    own_workdir: bool  # created by us, so removed at the end
    costs: bool = False  # also run bench/costs.py into out
    quick: bool = False


def _measure_system(system: System, cfg: Config, rep: int, cells: dict[tuple[str, str], Cell],
                    rawdir: Path) -> None:
    """Start the system once and run every workload on it (one repetition)."""
    uri, cleanup = system.start(cfg.workdir)
    try:
        for wname in cfg.workloads:
            cell = cells[(system.name, wname)]
            options = [*WORKLOADS[wname].fio_options(), f"--runtime={cfg.runtime}",
                       "--time_based"]
            try:
                if system.before_job is not None:
                    system.before_job(cfg.workdir)
                cell.samples.append(run_fio(wname, uri, options,
                                            rawdir / f"{system.name}-{wname}-r{rep}.json"))
                if system.catch_up is not None:
                    cell.catch_ups.append(system.catch_up(cfg.workdir))
            except (RuntimeError, subprocess.TimeoutExpired, OSError, RepdiskError) as err:
                log.warning("%s %s rep %d: %s", system.name, wname, rep, err)
                cell.errors.append(str(err))
    finally:
        cleanup()


def run_benchmark(cfg: Config) -> tuple[dict[tuple[str, str], Cell], dict[str, str]]:
    """All repetitions of all systems; returns the cells and a note per skipped system."""
    rawdir = cfg.out / "raw"
    rawdir.mkdir(parents=True, exist_ok=True)
    cells = {(s, w): Cell(s, w) for s in cfg.systems for w in cfg.workloads}
    skipped: dict[str, str] = {}
    log.info("writing %d MiB primary and secondary images in %s", cfg.size // MiB, cfg.workdir)
    prepare_images(cfg.workdir, cfg.size)
    for name in cfg.systems:
        if SYSTEMS[name].replicated:
            _try(name, skipped, lambda n=name: verify_replication(SYSTEMS[n], cfg.workdir,
                                                                  cfg.size, rawdir))
    for rep in range(cfg.reps):
        for name in cfg.systems:
            if name in skipped:
                continue
            log.info("rep %d/%d: %s", rep + 1, cfg.reps, name)
            os.sync()  # each system starts with no dirty pages left by the previous one
            _try(name, skipped,
                 lambda n=name: _measure_system(SYSTEMS[n], cfg, rep, cells, rawdir))
    return cells, skipped


def _try(name: str, skipped: dict[str, str], action: Callable[[], None]) -> None:
    """Run a system's action; a system that cannot start or verify is skipped, with why."""
    try:
        action()
    except (NotImplementedError, RuntimeError, OSError, subprocess.SubprocessError) as err:
        log.warning("skipping %s: %s", name, err)
        skipped[name] = f"{type(err).__name__}: {err}".replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# Reporting.

def _ratio(value: Sample | None, ref: Sample | None) -> str:
    if value is None or ref is None or not ref.iops:
        return "–"
    return f"{value.iops / ref.iops:.2f}×"


def render_markdown(cfg: Config, meta: dict[str, Any], cells: dict[tuple[str, str], Cell],
                    skipped: dict[str, str]) -> str:
    lines = [
        f"# repdisk benchmark {meta['timestamp']}", "",
        f"{meta['machine']}; {', '.join(meta['versions'].values())}.",
        f"Image {cfg.size // MiB} MiB (fully written), runtime {cfg.runtime} s time_based, "
        f"{cfg.reps} repetition(s), median shown. MB/s = 10^6 B/s; p99 = 99th percentile "
        "completion latency (reads and writes merged); ratios are of IOPS.", "",
        "| workload | system | IOPS | MB/s | p99 (µs) | vs qemu | vs file |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for wname in cfg.workloads:
        for sname in cfg.systems:
            cell = cells[(sname, wname)]
            med = cell.median()
            if med is None:
                why = "skipped" if sname in skipped else "failed"
                lines.append(f"| {wname} | {sname} | {why} | – | – | – | – |")
                continue
            lines.append(
                f"| {wname} | {sname} | {med.iops:,.0f} | {med.mbps:,.1f} | {med.p99_us:,.0f} |"
                f" {_ratio(med, _median_of(cells, 'qemu', wname))} |"
                f" {_ratio(med, _median_of(cells, 'file', wname))} |")
    lines += ["", "Systems:", ""]
    lines += [f"- **{n}**: {SYSTEMS[n].description}" for n in cfg.systems]
    notes = [f"- {c.system} {c.workload}: when fio stopped the secondary was "
             f"{max(b for b, _ in c.catch_ups) / MiB:,.1f} MiB behind at most and caught up "
             f"within {max(t for _, t in c.catch_ups):.2f} s"
             for c in cells.values() if c.catch_ups]
    notes += [f"- {n}: skipped: {why}" for n, why in skipped.items()]
    notes += [f"- {c.system} {c.workload}: {len(c.errors)} failed run(s): {c.errors[0]}"
              for c in cells.values() if c.errors]
    if meta.get("chart_note"):
        notes.append(f"- chart: {meta['chart_note']}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def _median_of(cells: dict[tuple[str, str], Cell], system: str, workload: str) -> Sample | None:
    cell = cells.get((system, workload))
    return cell.median() if cell else None


def write_chart(cfg: Config, cells: dict[tuple[str, str], Cell], path: Path) -> str | None:
    """IOPS and p99 per workload and system; returns a note instead if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, no chart (`make setup` installs the bench extra)"
    fig, axes = plt.subplots(2, len(cfg.workloads), figsize=(4 * len(cfg.workloads), 7),
                             squeeze=False)
    for col, wname in enumerate(cfg.workloads):
        meds = [cells[(s, wname)].median() for s in cfg.systems]
        for row, (attr, label) in enumerate((("iops", "IOPS"), ("p99_us", "p99 latency (µs)"))):
            ax = axes[row][col]
            values = [getattr(m, attr) if m else 0.0 for m in meds]
            bars = ax.bar(cfg.systems, values, color=[f"C{i}" for i in range(len(values))])
            ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "n/a" for v in values],
                         fontsize=7)
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            if row == 0:
                ax.set_title(wname)
    fig.suptitle(f"fio over NBD, {cfg.size // MiB} MiB image, {cfg.runtime} s x {cfg.reps}, "
                 "median")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "missing"
    return (out.strip().splitlines() or ["?"])[0]


def _machine() -> str:
    model = "unknown cpu"
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                     model)
    return f"{os.cpu_count()} × {model}, Linux {platform.release()}"


def write_results(cfg: Config, cells: dict[tuple[str, str], Cell],
                  skipped: dict[str, str]) -> str:
    """results.md, results.json and chart.png in cfg.out; returns the Markdown."""
    meta: dict[str, Any] = {
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": {"fio": _version(["fio", "--version"]),
                     "nbdkit": _version(["nbdkit", "--version"]),
                     "qemu": _version(["qemu-storage-daemon", "--version"])},
        "config": {"runtime": cfg.runtime, "reps": cfg.reps, "size": cfg.size,
                   "systems": cfg.systems, "workloads": cfg.workloads},
    }
    meta["chart_note"] = write_chart(cfg, cells, cfg.out / "chart.png")
    markdown = render_markdown(cfg, meta, cells, skipped)
    (cfg.out / "results.md").write_text(markdown)
    data = {"meta": meta, "skipped": skipped,
            "workloads": {n: asdict(WORKLOADS[n]) for n in cfg.workloads},
            "results": [{"system": c.system, "workload": c.workload,
                         "median": asdict(m) if (m := c.median()) else None,
                         "samples": [asdict(s) for s in c.samples], "errors": c.errors,
                         "catch_ups": c.catch_ups}
                        for c in cells.values()]}
    (cfg.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    return markdown


# ---------------------------------------------------------------------------------------------
# Command line.

def _names(value: str, known: dict[str, Any], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}: "
                                         f"choose from {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None) -> Config:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repetition, 3 s runtime, 256 MiB image")
    ap.add_argument("--systems", type=lambda v: _names(v, SYSTEMS, "system"),
                    default=list(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)} (all)")
    ap.add_argument("--workloads", type=lambda v: _names(v, WORKLOADS, "workload"),
                    default=list(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)} (all)")
    ap.add_argument("--runtime", type=int, help="seconds per fio job (10; --quick 3)")
    ap.add_argument("--reps", type=int, help="repetitions, median reported (3; --quick 1)")
    ap.add_argument("--size-mib", type=int, help="image size in MiB (1024; --quick 256)")
    ap.add_argument("--out", type=Path,
                    help="output directory (results/bench-<timestamp> in the repository)")
    ap.add_argument("--workdir", type=Path,
                    help="where the images and sockets go (a fresh dir in /var/tmp, removed)")
    ap.add_argument("--costs", action="store_true",
                    help="also measure the costs that must not grow with the disk "
                         "(bench/costs.py: checkpoint, failover commit, resync, RSS)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Config(
        systems=args.systems, workloads=args.workloads,
        runtime=args.runtime or (3 if args.quick else 10),
        reps=args.reps or (1 if args.quick else 3),
        size=(args.size_mib or (256 if args.quick else 1024)) * MiB,
        out=(args.out or ROOT / "results" / f"bench-{stamp}").resolve(),
        workdir=args.workdir or Path(tempfile.mkdtemp(prefix="rdbench-", dir="/var/tmp")),
        own_workdir=args.workdir is None,
        costs=args.costs,
        quick=args.quick,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    atexit.register(_stop_all_live)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_system_exit)
    try:
        cells, skipped = run_benchmark(cfg)
        markdown = write_results(cfg, cells, skipped)
        if cfg.costs:
            from .costs import run_costs
            costs_dir = cfg.workdir / "costs"
            costs_dir.mkdir(exist_ok=True)
            markdown += "\nCosts (bench/costs.py):\n\n" + run_costs(cfg.out, costs_dir,
                                                                      cfg.quick)
    finally:
        _stop_all_live()
        if (cfg.workdir / "logs").exists():
            shutil.copytree(cfg.workdir / "logs", cfg.out / "logs", dirs_exist_ok=True)
        if cfg.own_workdir:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
    print(markdown)
    print(f"results in {cfg.out}")
    measured = any(c.samples for c in cells.values())
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
