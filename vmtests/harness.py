"""The VM scenarios' shared harness: a replicated pair under a real guest, and its evidence.

A :class:`Scenario` owns everything one test starts (repdisk nodes, guest VMs, the
``repdisk controller`` process that protects the pair) and an output folder holding the
evidence a person can look at: each guest's serial console (``<name>.console.log``), each
node's log, the controller's log (``controller.log``) and ``timeline.txt``, one line per event
(boot, the controller's state changes and checkpoints with their guest pause, kill,
failover, hook, resume). The timeline is written as it happens, so it survives a test that
hangs or is killed, and ``vmtests/conftest.py`` adds it to the report of a failed test.

The pair is protected the way an operator would protect it: the real controller
(:class:`ControllerProc`) starts replication (secondary first), pauses the guest through a
QMP monitor of its own for each checkpoint, detects the primary's death and fails over, runs
its ``--on-failover`` hook and re-protects a secondary that comes back. The test only starts
and kills processes and reads what the controller reports (``query-controller``, its hook's
file); it never drives the nodes' control sockets itself.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repdisk.errors import RepdiskError
from repdisk.qmp.client import execute
from tests.helpers.nodes import NodeProc, Nodes
from vmtests.guest import (
    Guest,
    GuestVM,
    build_disk,
    build_raw_disk,
    check_records,
    crash_fsck_clean,
)
from vmtests.guest.qemu import RECORD_RE, QemuError, die_with_parent

log = logging.getLogger(__name__)

# Evidence outlives pytest's tmp_path (which other test runs prune); paths stay short
# enough for Unix sockets.
EVIDENCE_ROOT = Path(os.environ.get("REPDISK_VM_EVIDENCE", "/tmp/repdisk-vmtests"))
REPDISK = Path(sys.executable).with_name("repdisk")  # the venv's entry point
INTERVAL = 1.0           # seconds between checkpoints
HEARTBEAT = 0.2          # seconds between the controller's heartbeats
HEARTBEAT_TIMEOUT = 1.2  # seconds without an answer from the primary before failing over
# The primary's isolation-timeout and timeout must stay below the controller's
# heartbeat-timeout (docs/failure-matrix.md, "Timing rules"; the controller checks them).
ISOLATION_TIMEOUT = 0.6
PRIMARY_TIMEOUT = 1.0
# A query to a controller that has exited is an expected failure while it shuts down:
# qemu.qmp's log of each refused connect would bury a failed test's report.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
CONTROL_ERRORS = (RepdiskError, OSError, TimeoutError)
# What a guest kernel prints when a block request fails (blk_update_request / buffer layer).
KERNEL_IO_ERROR = re.compile(r"I/O error|blk_update_request|Buffer I/O error", re.I)
BOOTED = "REPDISK-BOOTED"
# The --on-failover hook: the controller's environment for the new guest, written atomically.
HOOK = ("printf 'REPDISK_EPOCH=%s\\nREPDISK_VM_STATE=%s\\n' \"$REPDISK_EPOCH\" "
        "\"${{REPDISK_VM_STATE:-}}\" > {tmp} && mv {tmp} {file}")


class Timeline:
    """Events with their time since the scenario began, appended to a file as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.lines: list[str] = []
        self._lock = threading.Lock()
        path.write_text("")

    def mark(self, event: str, detail: str = "", wall: float | None = None) -> float:
        """Record ``event`` now, or at ``wall`` (``time.time()``, for an event another
        process reported); returns the monotonic time it was recorded at."""
        now = time.monotonic()
        at = now - self.t0 if wall is None else wall - self.wall0
        line = f"{at:8.3f}s  {event:<18} {detail}".rstrip()
        with self._lock:
            self.lines.append(line)
            with open(self.path, "a") as f:
                f.write(line + "\n")
        log.info("timeline: %s", line)
        return now

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


@dataclass(frozen=True)
class Checkpoint:
    """One completed pair checkpoint as the controller recorded it (``last_checkpoints``).

    Which records it holds, from the console alone (:meth:`bounds`). Let P be the last
    record the guest printed before the controller's QMP ``stop``, and C the records the
    checkpoint holds (what a failover leaves on the secondary's disk). The workload prints
    record N only after N is fsync'd to both of its places, ``stop`` drains the guest's
    I/O before the primary's barrier, and the stopped guest runs no code; so C is P, or
    P + 1 when the guest was stopped between record P + 1's fsyncs and its console line.
    The controller takes ``time`` before it sends ``stop`` and ``duration`` ends after
    ``cont`` returned, and the console reader stamps each record line when it reads it:

    - lower bound ``lo`` = the last record read before ``time``: it was printed before the
      stop, so lo <= P <= C. Exact: a record the guest announced before the checkpoint
      began and the failover lost fails it, whatever the timing.
    - upper bound ``hi`` = 1 + the last record read before ``time + duration``: P was printed
      before the stop, so it is read by then unless the reader lags by more than the whole
      checkpoint (tens of ms at least; it reads continuously), hence C <= P + 1 <= hi. A
      failover that kept any write made after ``cont`` holds record hi + 1 or more and
      fails it (the test makes sure the guest wrote past hi before the kill).
    """

    seq: int
    time: float       # wall clock, taken before the guest was stopped
    duration: float   # seconds, until after it was continued
    pause: float      # seconds between QMP stop and cont (0 without --qmp)
    vm_state_bytes: int | None

    @classmethod
    def of(cls, rec: dict[str, Any]) -> Checkpoint:
        return cls(rec["seq"], rec["time"], rec["duration"], rec["pause"],
                   rec.get("vm_state_bytes"))

    @property
    def end(self) -> float:
        return self.time + self.duration

    def bounds(self, vm: GuestVM) -> tuple[int, int]:
        """(lo, hi): the checkpoint holds between lo and hi records (see the class)."""
        return vm.records_before(self.time), vm.records_before(self.end) + 1


@dataclass(frozen=True)
class Failover:
    """What the controller's hook was given, and the controller's record of the failover."""

    epoch: int
    vm_state: Path | None
    record: dict[str, Any]   # query-controller's "failover"


class Pair:
    """A primary and a secondary node serving the same disks (one consistency group).

    Only the processes: the controller starts, checkpoints and fails over replication.
    """

    def __init__(self, nodes: Nodes, timeline: Timeline, pri_disks: dict[str, Path],
                 sec_disks: dict[str, Path], primary_keys: dict[str, str],
                 node_keys: dict[str, str] | None = None) -> None:
        self.nodes = nodes
        self.node_keys = node_keys or {}   # keys of both nodes (e.g. socket-group)
        self.timeline = timeline
        self.pri_disks = pri_disks
        self.sec_disks = sec_disks
        self.sec = self._start_secondary()
        self.pri = nodes.start("primary", "pri", self._disk_keys(pri_disks) + [
            ("secondary", self.sec.uri("replica")), *self.node_keys.items(),
            *primary_keys.items()])
        keys = " ".join(f"{k}={v}" for k, v in primary_keys.items())
        timeline.mark("nodes", f"secondary and primary up: disks {', '.join(pri_disks)} {keys}")

    @staticmethod
    def _disk_keys(disks: dict[str, Path]) -> list[tuple[str, str]]:
        return [("disk", f"{name}:{path}") for name, path in disks.items()]

    def _start_secondary(self) -> NodeProc:
        return self.nodes.start("secondary", "sec", self._disk_keys(self.sec_disks)
                                + list(self.node_keys.items()))

    def uris(self, node: NodeProc, view: str = "") -> list[str]:
        """The NBD URIs of every disk of ``node`` (``view`` "active" on the secondary)."""
        return [node.uri(f"{view}/{name}" if view else name) for name in self.pri_disks]

    def restart_secondary(self) -> None:
        """Start the secondary's nbdkit again on the same files (the controller notices)."""
        for stale in (self.sec.control, self.sec.listen.socket):
            if stale and os.path.exists(stale):
                os.unlink(stale)
        self.sec = self._start_secondary()
        self.timeline.mark("secondary back", "nbdkit restarted on the same files")


class ControllerProc:
    """``repdisk controller`` as a process, watched through its control socket.

    A thread polls ``query-controller`` (every 50 ms) and copies each new event into the
    timeline at the time the controller stamped it, and keeps every checkpoint record
    (the controller keeps only its last ten). The ``--on-failover`` hook writes the
    environment it was given (``REPDISK_EPOCH``, ``REPDISK_VM_STATE``) into
    ``failover.env``, which is how the test learns where and how to start the new guest.
    """

    POLL = 0.05

    def __init__(self, pair: Pair, folder: Path, timeline: Timeline, *,
                 guest_qmp: Path | None = None, vm_state: Path | None = None,
                 interval: float = INTERVAL, heartbeat: float = HEARTBEAT,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT, extra_args: Sequence[str] = (),
                 on_failover: str | None = None) -> None:
        """``extra_args``: more controller options (e.g. --libvirt-domain NAME);
        ``on_failover``: a command the hook runs first (e.g. starting the guest)."""
        self.timeline = timeline
        self.control = str(folder / "ctl.qmp")
        self.hook_file = folder / "failover.env"
        self.heartbeat_timeout = heartbeat_timeout
        hook = HOOK.format(tmp=shlex.quote(f"{self.hook_file}.tmp"),
                           file=shlex.quote(str(self.hook_file)))
        hook = f"{on_failover} && {hook}" if on_failover else hook
        cmd = [str(REPDISK), "controller", "--primary", pair.pri.control,
               "--secondary", pair.sec.control, "--control", self.control,
               "--interval", f"{interval:g}s", "--heartbeat", f"{heartbeat:g}s",
               "--heartbeat-timeout", f"{heartbeat_timeout:g}s", "--on-failover", hook]
        cmd += ["--qmp", str(guest_qmp)] if guest_qmp else []
        cmd += ["--vm-state", str(vm_state)] if vm_state else []
        cmd += extra_args
        with open(folder / "controller.log", "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        timeline.mark("controller", "started: " + shlex.join(cmd[1:]))
        self.checkpoints: dict[int, Checkpoint] = {}
        self._seen: set[tuple[float, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="controller-watch",
                                        daemon=True)
        self._thread.start()

    # -- reading what the controller reports --------------------------------------------

    def query(self) -> dict[str, Any]:
        """``query-controller`` now; also records its new events and checkpoints."""
        q = execute(self.control, "query-controller", timeout=10.0)
        self._record(q)
        return q

    def _record(self, q: dict[str, Any]) -> None:
        with self._lock:
            for rec in q["last_checkpoints"]:
                self.checkpoints.setdefault(rec["seq"], Checkpoint.of(rec))
            for ev in q["events"]:
                key = (ev["time"], ev["event"])
                if key not in self._seen:
                    self._seen.add(key)
                    self.timeline.mark(*self._describe(ev["event"], ev["data"]), wall=ev["time"])

    def _describe(self, event: str, data: dict[str, Any]) -> tuple[str, str]:
        """A timeline line for one controller event."""
        if event == "CHECKPOINT_COMPLETED":
            cp = self.checkpoints.get(data["seq"])
            state = f", vm-state {cp.vm_state_bytes >> 20} MiB" \
                if cp and cp.vm_state_bytes else ""
            return "checkpoint", (f"#{data['seq']} guest paused {data['pause'] * 1000:.1f} ms "
                                  f"(checkpoint {data['duration'] * 1000:.1f} ms{state})")
        if event == "CONTROLLER_STATE_CHANGED":
            why = f" ({data['why']})" if data.get("why") else ""
            return "controller state", f"{data['from']} -> {data['to']}{why}"
        if event == "FAILOVER_COMPLETED":
            loss = data.get("loss_to_serving")
            return "failover", (f"epoch {data['epoch']}, commit {data['failover']:.3f}s"
                                + (f", loss->serving {loss:.3f}s (controller)" if loss else ""))
        return event.lower(), " ".join(f"{k}={v}" for k, v in data.items())

    def _watch(self) -> None:
        said_gone = False
        while not self._stop.wait(self.POLL):
            try:
                self.query()
            except CONTROL_ERRORS:
                if self.proc.poll() is not None and not said_gone:
                    said_gone = True
                    self.timeline.mark("controller exit", f"rc {self.proc.returncode}")

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                 what: str) -> dict[str, Any]:
        """Poll ``query-controller`` until ``predicate`` holds on it; return the answer."""
        deadline = time.monotonic() + timeout
        q: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the controller exited (rc {self.proc.returncode}) "
                                     f"while waiting for {what}; see controller.log")
            try:
                q = self.query()
            except CONTROL_ERRORS:
                q = {}
            if q and predicate(q):
                return q
            time.sleep(self.POLL)
        raise AssertionError(f"no {what} within {timeout:g}s: controller {q.get('state')}, "
                             f"counters {q.get('counters')}")

    def wait_running(self, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_for(lambda q: q["state"] == "running", timeout, "running pair")

    def last_checkpoint(self) -> Checkpoint:
        self.query()
        with self._lock:
            return self.checkpoints[max(self.checkpoints)]

    def next_checkpoint(self, timeout: float = 30.0,
                        began_after: float | None = None) -> Checkpoint:
        """Wait for a checkpoint that completes after this call and, with ``began_after``
        (``time.time()``), began after that too (one already under way when the call came
        completes after it, but holds only what came before it began); return it."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.query()["counters"]["checkpoints"]
            self.wait_for(lambda q, done=done: q["counters"]["checkpoints"] > done,
                          max(0.0, deadline - time.monotonic()), f"checkpoint after #{done}")
            last = self.last_checkpoint()
            if began_after is None or last.time >= began_after:
                return last

    def wait_failover(self, timeout: float = 30.0) -> Failover:
        """Wait until the controller failed over and its hook wrote ``failover.env``."""
        q = self.wait_for(lambda q: q["failover"] is not None and self.hook_file.exists(),
                          timeout, "failover and hook")
        env = dict(line.split("=", 1) for line in self.hook_file.read_text().splitlines())
        self.timeline.mark("hook ran", " ".join(f"{k}={v}" for k, v in env.items()))
        return Failover(int(env["REPDISK_EPOCH"]),
                        Path(env["REPDISK_VM_STATE"]) if env["REPDISK_VM_STATE"] else None,
                        q["failover"])

    def close(self) -> None:
        """SIGTERM the controller (it closes its sockets), SIGKILL it if it lingers."""
        self._stop.set()
        self._thread.join(5)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RecordWatch:
    """Samples a guest's announced record count, to find the longest stall between records."""

    def __init__(self, vm: GuestVM, period: float = 0.01) -> None:
        self.vm = vm
        self.changes: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        last = -1
        while not self._stop.wait(period):
            count = self.vm.last_record()
            if count != last:
                self.changes.append((time.monotonic(), count))
                last = count

    def longest_gap(self, since: float = 0.0, until: float | None = None) -> float:
        """The longest time in [since, until] the count did not move (seconds)."""
        times = [t for t, _ in self.changes if t >= since]
        end = time.monotonic() if until is None else until
        times = [since, *[t for t in times if t <= end], end] if times else [since, end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Scenario:
    """Everything one VM test starts, and its evidence folder; close() stops it all.

    ``folder`` gets the evidence (timeline, consoles, node and controller logs) and the
    sockets; ``work`` the disk images and saved VM states, which are large.
    """

    def __init__(self, folder: Path, work: Path, guest: Guest, accel: str) -> None:
        self.folder = folder
        self.work = work
        self.guest = guest
        self.accel = accel
        self.timeline = Timeline(folder / "timeline.txt")
        self.nodes = Nodes(str(folder))
        self._stack = ExitStack()
        self._stack.callback(self.nodes.close)
        self.vms: list[GuestVM] = []
        self.timeline.mark("scenario", f"accel {accel}, evidence in {folder}, disks in {work}")

    def disk(self, name: str, size_mb: int = 64) -> Path:
        """A fresh guest root disk (ext4 + raw region)."""
        return build_disk(self.work / f"{name}.img", size_mb, guest=self.guest)

    def raw_disk(self, name: str, size_mb: int = 8) -> Path:
        return build_raw_disk(self.work / f"{name}.img", size_mb)

    def pair(self, disks: dict[str, Path], node_keys: dict[str, str] | None = None,
             **primary_keys: str) -> Pair:
        """Start a secondary on copies of ``disks`` and a primary on them (not replicating
        yet: the controller starts them); ``node_keys`` go to both nodes."""
        sec_disks = {}
        for name, path in disks.items():
            sec_disks[name] = path.with_name(f"sec-{path.name}")
            shutil.copyfile(path, sec_disks[name])
        keys = {"isolation-timeout": f"{ISOLATION_TIMEOUT:g}s", "timeout": f"{PRIMARY_TIMEOUT:g}s",
                **{k.replace("_", "-"): v for k, v in primary_keys.items()}}
        return Pair(self.nodes, self.timeline, disks, sec_disks, keys, node_keys)

    def vm(self, name: str, drives: Sequence[str | Path], paused: bool = False,
           **kwargs: Any) -> GuestVM:
        """Start a guest whose console goes to ``<name>.console.log`` (``paused``: created
        stopped, QEMU's -S). It also gets a second QMP monitor, ``vm_control(name)``, for the
        controller (QEMU allows one client per monitor; the test uses the first)."""
        control = self.vm_control(name)
        vm = GuestVM(drives, guest=self.guest, accel=self.accel,
                     log_path=self.folder / f"{name}.console.log",
                     extra_args=["-qmp", f"unix:{control},server=on,wait=off",
                                 *(["-S"] if paused else [])], **kwargs)
        self.vms.append(vm)
        self._stack.callback(vm.close)
        vm.start()
        self.timeline.mark("vm start", f"{name} on {', '.join(map(str, drives))}"
                                       + (f" (incoming {kwargs['incoming']})"
                                          if kwargs.get("incoming") else "")
                                       + (" (paused)" if paused else ""))
        return vm

    def vm_control(self, name: str) -> Path:
        return self.folder / f"{name}.ctl.qmp"

    def wait_booted(self, vm: GuestVM, name: str, since: float | None = None,
                    timeout: float = 60.0) -> float:
        """Wait for REPDISK-BOOTED; returns the seconds it took since ``since`` (monotonic;
        default: QEMU's start)."""
        vm.wait_for(f"^{BOOTED}", timeout)
        took = time.monotonic() - (vm.started_at if since is None else since)
        self.timeline.mark("booted", f"{name} in {took:.2f}s")
        return took

    def controller(self, pair: Pair, guest: str | None = None, vm_state: bool = False,
                   **kwargs: Any) -> ControllerProc:
        """Start ``repdisk controller`` on the pair (pausing guest ``guest`` through its
        second monitor for each checkpoint; saving its state in ``work`` with ``vm_state``)."""
        ctl = ControllerProc(pair, self.folder, self.timeline,
                             guest_qmp=self.vm_control(guest) if guest else None,
                             vm_state=self.work if vm_state else None, **kwargs)
        self._stack.callback(ctl.close)
        return ctl

    def protected_guest(self, pair: Pair, name: str, vm_state: bool = False,
                        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
                        **kwargs: Any) -> tuple[GuestVM, ControllerProc]:
        """A guest (default workload: records) on the primary's exports under the controller,
        from its first write on.

        QEMU is created paused, so the controller can connect to its monitor and start the
        pair (secondary first) before the guest writes anything; the guest runs once the
        controller reports ``running`` (its first checkpoint's ``cont`` may start it first).
        """
        vm = self.vm(name, pair.uris(pair.pri), paused=True, **{"workload": "records",
                                                                 **kwargs})
        ctl = self.controller(pair, name, vm_state, heartbeat_timeout=heartbeat_timeout)
        ctl.wait_running()
        vm.qmp("cont")
        self.wait_booted(vm, name, since=self.timeline.mark("cont", f"{name} runs"))
        return vm, ctl

    def kill(self, what: str, kill: Callable[[], None]) -> float:
        """SIGKILL something (a VM, a node) and mark it; returns the wall-clock time."""
        kill()
        at = time.time()
        self.timeline.mark("kill -9", what, wall=at)
        return at

    def close(self) -> None:
        self._stack.close()
        self.timeline.mark("scenario end", "every process stopped")

    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def evidence_folder(test_name: str) -> Path:
    """A fresh evidence folder for one test: ``EVIDENCE_ROOT/<test name>`` (emptied first)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name.removeprefix("test_"))[:48]
    folder = EVIDENCE_ROOT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def console_problems(vm: GuestVM) -> list[str]:
    """Lines of a guest's console that show a failure: REPDISK-FAIL or a kernel I/O error."""
    return [line for line in vm.console.splitlines()
            if "REPDISK-FAIL" in line or KERNEL_IO_ERROR.search(line)]


def records_of(*vms: GuestVM) -> list[int]:
    """Every record number the guest announced, in order.  Several VMs: one guest whose
    serial console went from each to the next by live migration, which may cut a line
    (``R`` on one console, ``EPDISK-RECORD 28`` on the next)."""
    return [int(n) for n in RECORD_RE.findall("".join(vm.console for vm in vms))]



def read_export(uri: str) -> bytes:
    """Every byte of an NBD export (libnbd, in 4 MiB requests)."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        buf = bytearray(size)
        view = memoryview(buf)
        for offset in range(0, size, 4 << 20):
            n = min(4 << 20, size - offset)
            view[offset:offset + n] = h.pread(n, offset)
        return bytes(buf)
    finally:
        h.shutdown()


def first_difference(a: bytes, b: bytes) -> str | None:
    """None if equal, else where two disk images first differ (for the assertion message)."""
    if a == b:
        return None
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    offset = next(i for i in range(0, len(a), 4096) if a[i:i + 4096] != b[i:i + 4096])
    return f"first differing 4 KiB block at offset {offset}"


def restore_vm(scenario: Scenario, name: str, drives: Sequence[str | Path], state: Path,
               timeout: float = 30.0, **kwargs: Any) -> GuestVM:
    """Start a guest from a saved VM state (-incoming defer, then migrate-incoming) and run it.

    The machine (memory, devices, the drives' node names) is the one the state was saved
    from: both come from the same :class:`GuestVM` defaults.
    """
    vm = scenario.vm(name, drives, incoming="defer", **kwargs)
    vm.qmp("migrate-incoming", uri=f"exec:cat {state}")
    deadline = time.monotonic() + timeout
    while (status := vm.qmp("query-status"))["status"] == "inmigrate":
        if time.monotonic() > deadline:
            raise QemuError(f"{name}: loading {state} took more than {timeout:g}s")
        time.sleep(0.01)
    if not status["running"]:
        vm.qmp("cont")
    scenario.timeline.mark("resumed", f"{name} from {state.name} "
                                      f"({state.stat().st_size >> 20} MiB) in "
                                      f"{time.monotonic() - vm.started_at:.2f}s")
    return vm


def lose_primary(scenario: Scenario, pair: Pair, vm: GuestVM,
                 ctl: ControllerProc) -> tuple[Checkpoint, Failover]:
    """Between two checkpoints, SIGKILL the primary's guest QEMU and nbdkit; wait for the
    controller's failover and hook; check the old guest's console. Returns the last
    checkpoint and the failover."""
    vm.wait_for_record(vm.last_record() + 1, 30)
    ctl.next_checkpoint(began_after=time.time())  # it holds that record at least
    time.sleep(INTERVAL / 2)  # mid-interval: the guest has written past the checkpoint
    # A slow guest (TCG on a busy host) may need longer to write past it: wait for that.
    deadline = time.monotonic() + 30
    while (vm.last_record() <= ctl.last_checkpoint().bounds(vm)[1]
           and time.monotonic() < deadline):
        time.sleep(0.02)
    guest_killed = scenario.kill("primary guest QEMU", vm.kill)
    killed = scenario.kill("primary nbdkit", pair.pri.kill)
    announced = vm.last_record()
    failover = ctl.wait_failover()
    serving = failover.record["time"] - killed
    scenario.timeline.mark("serving", f"the secondary serves {serving:.3f}s after the "
                                      f"primary's kill (heartbeat-timeout "
                                      f"{ctl.heartbeat_timeout:g}s)")
    assert failover.epoch == failover.record["epoch"] >= 2
    # The controller counts from the primary's last answer, which came before the kill.
    loss = failover.record["loss_to_serving"]
    assert ctl.heartbeat_timeout <= loss and serving <= loss < ctl.heartbeat_timeout + 2.0
    last = ctl.last_checkpoint()
    lo, hi = last.bounds(vm)
    scenario.timeline.mark("last checkpoint", f"#{last.seq}: between {lo} and {hi} records; "
                                              f"console at the kill {announced}")
    assert last.end < guest_killed and lo > 0
    assert announced > hi, "the guest wrote nothing after the last checkpoint"
    assert console_problems(vm) == []
    return last, failover


def check_secondary_disk(pair: Pair, at_least: int, at_most: int) -> int:
    """The secondary's disks (root, and data if the pair has it) are crash-clean and hold
    gapless records, between ``at_least`` and ``at_most`` of them; returns the count."""
    root = pair.sec_disks["root"]
    clean, report = crash_fsck_clean(root)
    assert clean, report
    count, problems = check_records(root, pair.sec_disks.get("data"))
    assert problems == []
    assert at_least <= count <= at_most, (count, at_least, at_most)
    return count


def continue_on_secondary(scenario: Scenario, pair: Pair, last: Checkpoint, old: GuestVM,
                          more: int) -> GuestVM:
    """After a failover: the secondary's disks are at the last checkpoint; a guest booted on
    its ``active`` exports continues the records from there and writes ``more`` of them."""
    lo, hi = last.bounds(old)
    count = check_secondary_disk(pair, lo, hi)
    scenario.timeline.mark("checked", f"disk at failover: {count} records (checkpoint "
                                      f"#{last.seq}: {lo}..{hi}), e2fsck clean")
    vm = scenario.vm("secondary-guest", pair.uris(pair.sec, "active"), workload="records")
    scenario.wait_booted(vm, "secondary-guest")
    # The guest keeps a record that reached the file but not the raw region: it may go on
    # with count + 2 (see checker.py).
    resume = vm.wait_for(r"^REPDISK-RESUME next=(\d+)\r?\n", 30)
    assert int(resume.group(1)) in (count + 1, count + 2), resume.group(0)
    vm.wait_for_record(count + more, 60)
    scenario.kill("secondary guest QEMU", vm.kill)
    assert console_problems(vm) == []
    check_secondary_disk(pair, vm.last_record(), vm.last_record() + 1)
    return vm
