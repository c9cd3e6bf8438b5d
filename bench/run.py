"""Benchmark repdisk against its peers in one run, on the same files and the same machine.

Every system serves the same primary image (and, where it replicates, the same secondary
image) over an NBD Unix socket, and fio's `nbd` engine drives it, so the client side is
identical and the only variable is the server stack:

  file           nbdkit's C file plugin on the primary image: the limit for any nbdkit server
  passthrough    bench/passthrough.py, a minimal nbdkit Python plugin: the ceiling for repdisk's
  qemu-quorum    qemu-storage-daemon: quorum(vote-threshold=1, fifo) over [file node on the
                 primary, nbd client -> qemu-nbd on the secondary]: QEMU's stack with no
                 checkpoint buffers, the lower bound
  qemu-colo      the same primary; the secondary is COLO's data path: qemu-storage-daemon with
                 a copy-before-write filter whose target is a hidden qcow2 backed by the
                 secondary disk, checkpointed like repdisk's: the fair peer
  repdisk-sync   repdisk primary (write-mode sync) replicating to a repdisk secondary
  repdisk-async  the same in write-mode async

Every job runs hot (the page cache as the jobs before left it) and cold (dropped first).
Repetitions are interleaved (rep 1 of every system, then rep 2 ...) so slow drift of the
machine spreads over all systems; the median of each metric is reported with its range. A
system that cannot start is skipped with a note in the table; the run goes on.

Run from the repository root: `.venv/bin/python -m bench.run [--quick] [--systems a,b]`.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import dataclasses
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbd

from repdisk.errors import RepdiskError  # a control command of repdisk's hooks failed
from repdisk.qmp.client import QMPClient

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


def _quorum_primary(workdir: Path, sec_sock: Path, export: str, pri_sock: Path) -> list[str]:
    """qemu-storage-daemon exporting a quorum whose children are the primary's file node (read
    first: fifo) and an NBD client to the secondary's `export` on `sec_sock`."""
    return [
        "qemu-storage-daemon",
        *_blockdev({"driver": "file", "node-name": "pri-file",
                    "filename": str(workdir / PRIMARY_IMG)}),
        *_blockdev({"driver": "nbd", "node-name": "sec-nbd", "export": export,
                    "server": {"type": "unix", "path": str(sec_sock)}}),
        *_blockdev({"driver": "quorum", "node-name": "quorum", "vote-threshold": 1,
                    "read-pattern": "fifo", "children": ["pri-file", "sec-nbd"]}),
        "--nbd-server", f"addr.type=unix,addr.path={pri_sock}",
        "--export", "type=nbd,id=exp0,node-name=quorum,name=quorum,writable=on",
    ]


def start_qemu_quorum(workdir: Path) -> tuple[str, Cleanup]:
    """QEMU's stack with no checkpoint buffers: qemu-nbd serves the secondary image."""
    sec_sock = _socket_path(workdir, "qemu-sec")
    pri_sock = _socket_path(workdir, "qemu-pri")
    secondary = ["qemu-nbd", "--format=raw", "--persistent", "--export-name=secondary",
                 f"--socket={sec_sock}", str(workdir / SECONDARY_IMG)]

    def build(procs: Procs) -> str:
        procs.serve("qemu-nbd-secondary", secondary, [sec_sock])
        procs.serve("qemu-storage-daemon", _quorum_primary(workdir, sec_sock, "secondary",
                                                           pri_sock), [pri_sock])
        return _unix_uri(pri_sock, "quorum")

    return _started(workdir, build)


# COLO's secondary data path, from what QEMU 7.2 has (no `replication` driver in a storage
# daemon): node `top` (raw, exported) -> `cbw<N>` (copy-before-write, file = `sec-file`,
# target = `hidden<N>`) -> `sec-file`; `hidden<N>` is a qcow2 on COLO_HIDDEN % N, created
# empty with no backing file in its header and opened with `backing` = `sec-file`, as
# COLO's hidden disk is. A checkpoint moves `top` onto generation N+1 (colo_checkpoint).
COLO_HIDDEN = "colo-hidden-%d.qcow2"


def _colo_hidden(workdir: Path, gen: int) -> dict[str, Any]:
    """Create generation `gen`'s empty hidden disk; its blockdev options."""
    path = workdir / (COLO_HIDDEN % gen)
    size = (workdir / SECONDARY_IMG).stat().st_size
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True, capture_output=True, timeout=30)
    return {"driver": "qcow2", "node-name": f"hidden{gen}", "backing": "sec-file",
            "file": {"driver": "file", "node-name": f"hidden{gen}-file",
                     "filename": str(path)}}


def _colo_filter(gen: int) -> dict[str, Any]:
    return {"driver": "copy-before-write", "node-name": f"cbw{gen}", "file": "sec-file",
            "target": f"hidden{gen}"}


def start_qemu_colo(workdir: Path) -> tuple[str, Cleanup]:
    """The fair peer: the quorum primary, and a secondary whose first write to a cluster
    after a checkpoint copies the cluster's old contents into a hidden qcow2 first."""
    sec_sock = _socket_path(workdir, "colo-sec")
    pri_sock = _socket_path(workdir, "colo-pri")
    qmp_sock = _socket_path(workdir, "colo-qmp")
    for old in workdir.glob(COLO_HIDDEN.replace("%d", "*")):
        old.unlink()
    secondary = [
        "qemu-storage-daemon",
        *_blockdev({"driver": "file", "node-name": "sec-file",
                    "filename": str(workdir / SECONDARY_IMG)}),
        *_blockdev(_colo_hidden(workdir, 0)),
        *_blockdev(_colo_filter(0)),
        *_blockdev({"driver": "raw", "node-name": "top", "file": "cbw0"}),
        "--nbd-server", f"addr.type=unix,addr.path={sec_sock}",
        "--export", "type=nbd,id=exp0,node-name=top,name=secondary,writable=on",
        "--chardev", f"socket,id=qmp0,path={qmp_sock},server=on,wait=off",
        "--monitor", "chardev=qmp0",
    ]

    def build(procs: Procs) -> str:
        procs.serve("qemu-colo-secondary", secondary, [sec_sock], [qmp_sock])
        procs.serve("qemu-colo-primary", _quorum_primary(workdir, sec_sock, "secondary",
                                                         pri_sock), [pri_sock])
        return _unix_uri(pri_sock, "quorum")

    return _started(workdir, build)


def colo_checkpoint(workdir: Path) -> None:
    """A COLO checkpoint of the secondary: `top` is reopened onto a fresh filter and an
    empty hidden disk, and the old ones are dropped (their contents are what COLO would
    discard or commit). QEMU 7.2 aborts (`bdrv_parent_drained_end_single_no_poll`) when the
    old filter is detached while the old hidden disk still backs onto `sec-file`, so that
    backing link is cut first."""
    client = QMPClient(timeout=30).connect(str(_socket_path(workdir, "colo-qmp")))
    try:
        nodes = client.execute("query-named-block-nodes", {"flat": True})
        gen = max(int(n["node-name"][3:]) for n in nodes if n["node-name"].startswith("cbw"))
        client.execute("blockdev-add", _colo_hidden(workdir, gen + 1))
        client.execute("blockdev-add", _colo_filter(gen + 1))
        client.execute("blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": f"hidden{gen}", "file": f"hidden{gen}-file",
             "backing": None}]})
        client.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": "top", "file": f"cbw{gen + 1}"}]})
        client.execute("blockdev-del", {"node-name": f"cbw{gen}"})
        client.execute("blockdev-del", {"node-name": f"hidden{gen}"})
    finally:
        client.close()
    (workdir / (COLO_HIDDEN % gen)).unlink()


def check_colo_hidden(workdir: Path, offset: int, old: bytes) -> None:
    """After the replication check (one write of len(old) bytes at `offset`, no checkpoint):
    the hidden disk holds exactly the clusters written, with the secondary's old contents."""
    hidden = workdir / (COLO_HIDDEN % 0)
    res = subprocess.run(["qemu-img", "map", "--output=json", str(hidden)],
                         capture_output=True, text=True, timeout=30, check=True)
    data: list[tuple[int, int]] = []
    for e in json.loads(res.stdout):  # guest-contiguous runs, wherever the clusters landed
        if not e["data"]:
            continue
        if data and sum(data[-1]) == e["start"]:
            data[-1] = (data[-1][0], data[-1][1] + e["length"])
        else:
            data.append((e["start"], e["length"]))
    if data != [(offset, len(old))]:
        raise RuntimeError(f"qemu-colo's hidden disk holds {data}, not the written clusters "
                           f"[({offset}, {len(old)})]")
    raw = workdir / "colo-hidden.raw"
    try:
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(hidden), str(raw)],
                       capture_output=True, timeout=60, check=True)
        if _read_region(raw, offset, len(old)) != old:
            raise RuntimeError("qemu-colo's hidden disk does not hold the secondary's old "
                               "contents of the written clusters")
    finally:
        raw.unlink(missing_ok=True)


def _require_repdisk_nodes(repdisk: Path = REPDISK) -> str:
    """The repdisk console script, if it has `primary` and `secondary`; else NotImplementedError."""
    if not repdisk.exists():
        raise NotImplementedError(f"repdisk: {repdisk} is missing: run `make setup`")
    for sub in ("primary", "secondary"):
        res = subprocess.run([str(repdisk), sub, "--help"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise NotImplementedError(f"repdisk {sub} is not available yet ({why})")
    return str(repdisk)


def _ctl(repdisk: str, control: Path, *command: str) -> None:
    res = subprocess.run([repdisk, "ctl", str(control), *command], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"repdisk ctl {control} {' '.join(command)} failed: "
                           f"{res.stderr.strip() or res.stdout.strip()}")


def start_repdisk_pair(workdir: Path, mode: str, threads: int | None = None,
                       secondary_threads: int | None = None, cluster_size: str | None = None,
                       repdisk_path: Path = REPDISK) -> tuple[str, Cleanup]:
    """A repdisk secondary on SECONDARY_IMG and a primary on PRIMARY_IMG replicating to it with
    `--write-mode mode` (sync|async), both started replicating, with `--threads` if given
    (`threads` on the primary, `secondary_threads` on the secondary) and the secondary's
    `--cluster-size` if given, both run by the `repdisk_path` command. Returns the primary's
    URI."""
    repdisk = _require_repdisk_nodes(repdisk_path)
    s1, c1 = _socket_path(workdir, "rd-sec"), _socket_path(workdir, "rd-sec-ctl")
    s2, c2 = _socket_path(workdir, "rd-pri"), _socket_path(workdir, "rd-pri-ctl")
    secondary = [repdisk, "secondary", "--disk", str(workdir / SECONDARY_IMG),
                 "--nbd-socket", str(s1), "--control", str(c1),
                 *(["--threads", str(secondary_threads)] if secondary_threads else []),
                 # overlays of their own: those of the default size stay valid beside them
                 *(["--cluster-size", cluster_size,
                    "--hidden", str(workdir / f"{SECONDARY_IMG}.hidden-{cluster_size}"),
                    "--active", str(workdir / f"{SECONDARY_IMG}.active-{cluster_size}")]
                   if cluster_size else [])]
    primary = [repdisk, "primary", "--disk", str(workdir / PRIMARY_IMG),
               "--secondary", _unix_uri(s1, "replica"), "--nbd-socket", str(s2),
               "--control", str(c2), "--write-mode", mode,
               *(["--threads", str(threads)] if threads else [])]

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


# cfast-sync: a benchmark-only prototype, never the product. bench/cfast/syncprimary.c is a
# sync primary's steady state in C (nbdkit plugin, each worker thread writes to the secondary
# on its own libnbd handle, no thread crossed), against a real repdisk secondary (or, for
# `cfast-sync-filesec`, nbdkit's file plugin on the secondary image: no copy-before-write).
# It writes untagged to `replica`, which a started secondary accepts (an operator's
# connection, unfenced: src/repdisk/replication/sessions.py), and a secondary no tagged
# session wrote to takes a checkpoint alone (SessionFence.checkpointable).
CFAST_SRC = BENCH_DIR / "cfast" / "syncprimary.c"


def build_cfast(workdir: Path) -> Path:
    """Compile bench/cfast/syncprimary.c into the work directory (once per run)."""
    lib = workdir / "syncprimary.so"
    if not lib.exists() or lib.stat().st_mtime < CFAST_SRC.stat().st_mtime:
        res = subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-o", str(lib), str(CFAST_SRC),
                              "-lnbd", "-lpthread"], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"cannot build {CFAST_SRC} (apt-get install nbdkit-plugin-dev "
                               f"libnbd-dev gcc): {res.stderr.strip()[-300:]}")
    return lib


def start_cfast(workdir: Path, threads: int | None = None, secondary: str = "repdisk",
                repdisk_path: Path = REPDISK) -> tuple[str, Cleanup]:
    """The C sync primary (nbdkit `-t threads`, nbdkit's default 16 if None) on PRIMARY_IMG,
    replicating to a repdisk secondary on SECONDARY_IMG started as the repdisk systems start
    theirs (default threads, `replication-start mode=secondary`), or to nbdkit's file plugin
    (`secondary="file"`)."""
    lib = build_cfast(workdir)
    s1, c1 = _socket_path(workdir, "cf-sec"), _socket_path(workdir, "cf-sec-ctl")
    s2 = _socket_path(workdir, "cf-pri")
    primary = ["nbdkit", "-f", "--exit-with-parent", "-U", str(s2),
               *(["-t", str(threads)] if threads else []),
               str(lib), f"file={workdir / PRIMARY_IMG}", f"secondary={_unix_uri(s1, 'replica')}"]

    def build(procs: Procs) -> str:
        if secondary == "file":
            procs.serve("nbdkit-file-secondary",
                        ["nbdkit", "-f", "--exit-with-parent", "-U", str(s1), "file",
                         f"file={workdir / SECONDARY_IMG}"], [s1])
        else:
            repdisk = _require_repdisk_nodes(repdisk_path)
            procs.serve("repdisk-secondary",
                        [repdisk, "secondary", "--disk", str(workdir / SECONDARY_IMG),
                         "--nbd-socket", str(s1), "--control", str(c1)], [s1], [c1])
            _ctl(repdisk, c1, "replication-start", "mode=secondary")
        procs.serve("cfast-primary", primary, [s2])
        return _unix_uri(s2)

    return _started(workdir, build)


def cfast_checkpoint(workdir: Path) -> None:
    """Before each job: a checkpoint of the secondary alone (no primary to hold), which
    empties its overlays as repdisk_checkpoint's does."""
    client = QMPClient(timeout=30).connect(str(_socket_path(workdir, "cf-sec-ctl")))
    try:
        client.execute("replication-do-checkpoint")
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
    # After the replication check: (workdir, offset, the secondary's old bytes there);
    # raises if the system's checkpoint buffer does not hold what it must.
    check_buffer: Callable[[Path, int, bytes], None] | None = None


def _pair(mode: str, threads: int | None, secondary_threads: int | None = None) -> System:
    """repdisk-MODE with `--threads` on the primary and/or the secondary (named
    repdisk-MODE-tP or -tPsS, or -sS): for thread-count experiments."""
    name = (f"repdisk-{mode}" + (f"-t{threads}" if threads else "-")
            + (f"s{secondary_threads}" if secondary_threads else "")).replace("--", "-")
    return System(name, f"repdisk-{mode} with nbdkit threads primary {threads or 'default'}, "
                  f"secondary {secondary_threads or 'default'}",
                  functools.partial(start_repdisk_pair, mode=mode, threads=threads,
                                    secondary_threads=secondary_threads), True,
                  repdisk_checkpoint, repdisk_catch_up if mode == "async" else None)


def _clustered(mode: str, cluster_size: str) -> System:
    """repdisk-MODE with the secondary's overlays at ``cluster_size`` (named
    repdisk-MODE-cSIZE): for cluster-size experiments."""
    return System(f"repdisk-{mode}-c{cluster_size}",
                  f"repdisk-{mode} with the secondary's overlay clusters of {cluster_size}",
                  functools.partial(start_repdisk_pair, mode=mode, cluster_size=cluster_size),
                  True, repdisk_checkpoint, repdisk_catch_up if mode == "async" else None)


SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("qemu-colo", "qemu-storage-daemon quorum(file, nbd->secondary qemu-storage-daemon "
           "raw(copy-before-write(file, target=hidden qcow2 backed by it))), checkpointed "
           "before each job: COLO's data path", start_qemu_colo, True, colo_checkpoint,
           check_buffer=check_colo_hidden),
    System("qemu-quorum", "qemu-storage-daemon quorum(file, nbd->qemu-nbd), vote-threshold=1, "
           "no checkpoint buffers", start_qemu_quorum, True),
    System("file", "nbdkit file plugin (C), primary image only: the limit", start_file, False),
    System("passthrough", "nbdkit Python passthrough plugin: the ceiling for Python plugins",
           start_passthrough, False),
    System("repdisk-sync", "repdisk primary, write-mode sync, -> repdisk secondary",
           functools.partial(start_repdisk_pair, mode="sync"), True, repdisk_checkpoint),
    System("repdisk-async", "repdisk primary, write-mode async, -> repdisk secondary",
           functools.partial(start_repdisk_pair, mode="async"), True, repdisk_checkpoint,
           repdisk_catch_up),
    *(_pair("sync", t, s) for t in (4, 16, 64) for s in (None, 1, 4, 16) if t != 4 or s),
    *(_pair("async", None, s) for s in (1, 4, 16)),
    *(_pair("async", t) for t in (1, 4, 16)),
    _pair("async", 1, 1),
    *(_clustered(mode, c) for mode in ("sync", "async") for c in ("4K", "16K")),
    System("cfast-sync", "benchmark-only C sync primary (bench/cfast/syncprimary.c, nbdkit "
           "default threads = 16) -> repdisk secondary", start_cfast, True, cfast_checkpoint),
    System("cfast-sync-t16", "cfast-sync with nbdkit -t 16 given explicitly",
           functools.partial(start_cfast, threads=16), True, cfast_checkpoint),
    System("cfast-sync-filesec", "C sync primary -> nbdkit file plugin on the secondary "
           "image (no copy-before-write): the secondary's share",
           functools.partial(start_cfast, secondary="file"), True),
]}
# What a run measures unless --systems says otherwise (the rest are for experiments).
DEFAULT_SYSTEMS = ["qemu-colo", "qemu-quorum", "file", "passthrough", "repdisk-sync",
                   "repdisk-async"]
REFERENCE = "qemu-colo"  # the ratios in the table are to this system's IOPS
PEERS = ("qemu-colo", "qemu-quorum", "file", "passthrough")


def add_baseline(systems: list[str], checkout: Path, only: list[str] | None) -> list[str]:
    """For an A/B of a change in one interleaved run: each repdisk system of `systems` (of
    `only`, if given) again as `base-NAME`, run by the `repdisk` of another checkout
    (CHECKOUT/.venv/bin/repdisk). Returns `systems` with those added after their own."""
    repdisk = checkout.resolve() / ".venv" / "bin" / "repdisk"
    out = []
    for name in systems:
        out.append(name)
        system = SYSTEMS[name]
        if isinstance(system.start, functools.partial) and \
                system.start.func is start_repdisk_pair and (only is None or name in only):
            base = f"base-{name}"
            SYSTEMS[base] = dataclasses.replace(
                system, name=base, description=f"{name} run by {repdisk}",
                start=functools.partial(system.start, repdisk_path=repdisk))
            out.append(base)
    return out


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
    Workload("randwrite4k-qd1", "randwrite", "4k", 1),
    Workload("randread4k", "randread", "4k", 16),
    Workload("seqwrite1m", "write", "1m", 4),
    Workload("randrw4k-70r", "randrw", "4k", 16, rwmixread=70),
    # For queue-depth sweeps (--workloads), not in a default run:
    Workload("randwrite4k-qd4", "randwrite", "4k", 4),
    Workload("randwrite4k-qd64", "randwrite", "4k", 64),
]}
DEFAULT_WORKLOADS = ["randwrite4k", "randwrite4k-qd1", "randread4k", "seqwrite1m",
                     "randrw4k-70r"]
# Every job runs in each of these page-cache states (see _prepare_cache).
CACHES = ("hot", "cold")


@dataclass
class Sample:
    iops: float
    mbps: float  # 10^6 bytes per second, reads and writes together
    p99_us: float  # 99th percentile completion latency, reads and writes together
    p50_us: float  # median completion latency, reads and writes together


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
    """IOPS, MB/s, p99 and p50 from fio's JSON (written with unified_rw_reporting=mixed)."""
    try:
        job = json.loads(path.read_text())["jobs"][0]
        mixed = job["mixed"]
        percentile = mixed["clat_ns"]["percentile"]
        sample = Sample(iops=mixed["iops"], mbps=mixed["bw_bytes"] / 1e6,
                        p99_us=percentile["99.000000"] / 1000,
                        p50_us=percentile["50.000000"] / 1000)
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
    region to be that pattern in BOTH images, and the system's checkpoint buffer (if it
    has a check_buffer) to hold the region's old contents; raise a one-line error otherwise."""
    pattern = os.urandom(4)
    offset, length = size // 2, min(VERIFY_LEN, size // 2)
    expected = pattern * (length // len(pattern))
    old = _read_region(workdir / SECONDARY_IMG, offset, length)
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
    if system.check_buffer is not None:
        system.check_buffer(workdir, offset, old)
    log.info("%s wrote both images: %d bytes at %d checked", system.name, length, offset)


# ---------------------------------------------------------------------------------------------
# The run.

@dataclass
class Cell:
    system: str
    workload: str
    cache: str  # one of CACHES
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    catch_ups: list[tuple[int, float]] = field(default_factory=list)  # System.catch_up
    # Per job, at its start: the share of both images in the page cache, the load average.
    resident: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)

    def median(self) -> Sample | None:
        if not self.samples:
            return None
        return Sample(*(statistics.median(getattr(s, f) for s in self.samples)
                        for f in ("iops", "mbps", "p99_us", "p50_us")))

    def iops_range(self) -> tuple[float, float]:
        return (min(s.iops for s in self.samples), max(s.iops for s in self.samples))


Cells = dict[tuple[str, str, str], Cell]  # by (system, workload, cache)


@dataclass
class Config:
    """One run's choices, resolved from the command line (--quick only changes defaults)."""

    systems: list[str]
    workloads: list[str]
    caches: list[str]
    runtime: int
    reps: int
    size: int
    out: Path
    workdir: Path
    own_workdir: bool  # created by us, so removed at the end
    costs: bool = False  # also run bench/costs.py into out
    quick: bool = False


def drop_page_cache() -> None:
    """Write back dirty pages, then drop the clean page cache of the whole machine (root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError as err:
        raise RuntimeError(f"cannot drop the page cache ({err.strerror}): cold jobs need "
                           "root; run as root or with --caches hot") from err


def warm_page_cache(workdir: Path) -> None:
    """Read both images into the page cache (what a cold phase of the system before dropped):
    hot jobs then start with all of them cached, whatever ran before."""
    buf = bytearray(CHUNK)
    for img in (PRIMARY_IMG, SECONDARY_IMG):
        with open(workdir / img, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_share(workdir: Path) -> float:
    """The share of both images' bytes in the page cache (fincore, util-linux)."""
    paths = [str(workdir / PRIMARY_IMG), str(workdir / SECONDARY_IMG)]
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *paths],
                         capture_output=True, text=True, timeout=30, check=True)
    resident = size = 0
    for line in res.stdout.split("\n"):
        if line.strip():
            r, n = line.split()
            resident, size = resident + int(r), size + int(n)
    return resident / size if size else 0.0


def _measure_system(system: System, cfg: Config, rep: int, cells: Cells, rawdir: Path) -> None:
    """Start the system once and run every workload on it in every cache state (one
    repetition): all hot jobs first (the images read into the cache before the first, then
    the cache as the jobs before left it, written back), then the cold ones, each after a
    checkpoint (if the system takes one) and then a drop of the cache."""
    uri, cleanup = system.start(cfg.workdir)
    try:
        for cache in cfg.caches:
            if cache == "hot":
                warm_page_cache(cfg.workdir)
            for wname in cfg.workloads:
                cell = cells[(system.name, wname, cache)]
                options = [*WORKLOADS[wname].fio_options(), f"--runtime={cfg.runtime}",
                           "--time_based"]
                try:
                    # The job before's dirty pages are written back first, in every cache
                    # state: else a job pays for the one before it, and a checkpoint's
                    # flush of gigabytes outlasts its hold.
                    os.sync()
                    if system.before_job is not None:
                        system.before_job(cfg.workdir)
                    if cache == "cold":
                        drop_page_cache()
                    cell.resident.append(resident_share(cfg.workdir))
                    cell.loads.append(os.getloadavg()[0])
                    cell.samples.append(run_fio(
                        wname, uri, options,
                        rawdir / f"{system.name}-{wname}-{cache}-r{rep}.json"))
                    if system.catch_up is not None:
                        cell.catch_ups.append(system.catch_up(cfg.workdir))
                except (RuntimeError, subprocess.SubprocessError, OSError,
                        RepdiskError) as err:
                    log.warning("%s %s %s rep %d: %s", system.name, wname, cache, rep, err)
                    cell.errors.append(str(err))
    finally:
        cleanup()


def run_benchmark(cfg: Config) -> tuple[Cells, dict[str, str]]:
    """All repetitions of all systems; returns the cells and a note per skipped system."""
    rawdir = cfg.out / "raw"
    rawdir.mkdir(parents=True, exist_ok=True)
    cells = {(s, w, c): Cell(s, w, c)
             for s in cfg.systems for w in cfg.workloads for c in cfg.caches}
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
                 lambda n=name, r=rep: _measure_system(SYSTEMS[n], cfg, r, cells, rawdir))
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


def render_markdown(cfg: Config, meta: dict[str, Any], cells: Cells,
                    skipped: dict[str, str]) -> str:
    lines = [
        f"# repdisk benchmark {meta['timestamp']}", "",
        f"{meta['machine']}; {', '.join(meta['versions'].values())}.",
        f"Image {cfg.size // MiB} MiB (fully written), runtime {cfg.runtime} s time_based, "
        f"{cfg.reps} repetition(s), median shown with the range of IOPS over them. Cache "
        "`hot`: both images read into the page cache before a system's first hot job, then "
        "as the jobs before left it; `cold`: dropped right before the job. MB/s = 10^6 B/s; "
        "p50/p99 = completion latency percentiles (reads and writes "
        f"merged); ratios are of IOPS, to {REFERENCE} and to file in the same cache state.", "",
        f"| workload | system | cache | IOPS | IOPS range | MB/s | p50 (µs) | p99 (µs) "
        f"| vs {REFERENCE} | vs file |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wname in cfg.workloads:
        for sname in cfg.systems:
            for cache in cfg.caches:
                cell = cells[(sname, wname, cache)]
                med = cell.median()
                if med is None:
                    why = "skipped" if sname in skipped else "failed"
                    lines.append(f"| {wname} | {sname} | {cache} | {why} | – | – | – | – | – "
                                 "| – |")
                    continue
                low, high = cell.iops_range()
                lines.append(
                    f"| {wname} | {sname} | {cache} | {med.iops:,.0f} | {low:,.0f}–{high:,.0f} "
                    f"| {med.mbps:,.1f} | {med.p50_us:,.0f} | {med.p99_us:,.0f} |"
                    f" {_ratio(med, _median_of(cells, REFERENCE, wname, cache))} |"
                    f" {_ratio(med, _median_of(cells, 'file', wname, cache))} |")
    lines += ["", "Systems:", ""]
    lines += [f"- **{n}**: {SYSTEMS[n].description}" for n in cfg.systems]
    notes = []
    for cache in cfg.caches:
        shares = [r for c in cells.values() if c.cache == cache for r in c.resident]
        if shares:
            notes.append(f"- {cache} jobs started with {min(shares):.0%}–{max(shares):.0%} of "
                         "the two images in the page cache")
    loads = [x for c in cells.values() for x in c.loads]
    if loads:
        notes.append(f"- load average (1 min) at the jobs' starts: {min(loads):.1f}–"
                     f"{max(loads):.1f} on {os.cpu_count()} CPUs (other work on the machine "
                     "shows here)")
    notes += [f"- {c.system} {c.workload} {c.cache}: when fio stopped the secondary was "
              f"{max(b for b, _ in c.catch_ups) / MiB:,.1f} MiB behind at most and caught up "
              f"within {max(t for _, t in c.catch_ups):.2f} s"
              for c in cells.values() if c.catch_ups]
    notes += [f"- {n}: skipped: {why}" for n, why in skipped.items()]
    notes += [f"- {c.system} {c.workload} {c.cache}: {len(c.errors)} failed run(s): "
              f"{c.errors[0]}" for c in cells.values() if c.errors]
    if meta.get("chart_note"):
        notes.append(f"- chart: {meta['chart_note']}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def _median_of(cells: Cells, system: str, workload: str, cache: str) -> Sample | None:
    cell = cells.get((system, workload, cache))
    return cell.median() if cell else None


def write_chart(cfg: Config, cells: Cells, path: Path) -> str | None:
    """IOPS and p99 per workload, system and cache state; returns a note instead if
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, no chart (`make setup` installs the bench extra)"
    fig, axes = plt.subplots(2, len(cfg.workloads), figsize=(4 * len(cfg.workloads), 7),
                             squeeze=False)
    width = 0.8 / len(cfg.caches)
    for col, wname in enumerate(cfg.workloads):
        for row, (attr, label) in enumerate((("iops", "IOPS"), ("p99_us", "p99 latency (µs)"))):
            ax = axes[row][col]
            for i, cache in enumerate(cfg.caches):
                meds = [cells[(s, wname, cache)].median() for s in cfg.systems]
                values = [getattr(m, attr) if m else 0.0 for m in meds]
                xs = [x + (i - (len(cfg.caches) - 1) / 2) * width
                      for x in range(len(cfg.systems))]
                bars = ax.bar(xs, values, width, label=cache, color=f"C{i}")
                ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "n/a" for v in values],
                             fontsize=6)
            ax.set_xticks(range(len(cfg.systems)), cfg.systems)
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            if row == 0:
                ax.set_title(wname)
                ax.legend(fontsize=7)
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


def write_results(cfg: Config, cells: Cells,
                  skipped: dict[str, str]) -> str:
    """results.md, results.json and chart.png in cfg.out; returns the Markdown."""
    meta: dict[str, Any] = {
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": {"fio": _version(["fio", "--version"]),
                     "nbdkit": _version(["nbdkit", "--version"]),
                     "qemu": _version(["qemu-storage-daemon", "--version"])},
        "config": {"runtime": cfg.runtime, "reps": cfg.reps, "size": cfg.size,
                   "systems": cfg.systems, "workloads": cfg.workloads, "caches": cfg.caches},
    }
    meta["chart_note"] = write_chart(cfg, cells, cfg.out / "chart.png")
    markdown = render_markdown(cfg, meta, cells, skipped)
    (cfg.out / "results.md").write_text(markdown)
    data = {"meta": meta, "skipped": skipped,
            "workloads": {n: asdict(WORKLOADS[n]) for n in cfg.workloads},
            "results": [{"system": c.system, "workload": c.workload, "cache": c.cache,
                         "median": asdict(m) if (m := c.median()) else None,
                         "samples": [asdict(s) for s in c.samples], "errors": c.errors,
                         "catch_ups": c.catch_ups, "resident": c.resident, "loads": c.loads}
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
                    default=DEFAULT_SYSTEMS, help=f"comma list of {', '.join(SYSTEMS)} "
                    f"({', '.join(DEFAULT_SYSTEMS)})")
    ap.add_argument("--workloads", type=lambda v: _names(v, WORKLOADS, "workload"),
                    default=DEFAULT_WORKLOADS, help=f"comma list of {', '.join(WORKLOADS)} "
                    f"({', '.join(DEFAULT_WORKLOADS)})")
    ap.add_argument("--caches", type=lambda v: _names(v, dict.fromkeys(CACHES), "cache state"),
                    default=list(CACHES), help="comma list of hot, cold (both; cold drops the "
                    "page cache before each job, as root)")
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
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="also run each repdisk system from another checkout (made with "
                         "`make setup`) as base-NAME: an A/B of a change in one run")
    ap.add_argument("--baseline-systems", type=lambda v: _names(v, SYSTEMS, "system"),
                    help="with --baseline: only these systems (every repdisk one)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Config(
        systems=(add_baseline(args.systems, args.baseline, args.baseline_systems)
                 if args.baseline else args.systems),
        workloads=args.workloads, caches=args.caches,
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
