"""The VM scenarios' shared harness: a replicated pair under a real guest, and its evidence.

A :class:`Scenario` owns everything one test starts (repdisk nodes, guest VMs, the process
that protects the pair) and an output folder holding the evidence a person can look at: each
guest's serial console (``<name>.console.log``), each node's log, and ``timeline.txt``, one
line per event (boot, checkpoint with its guest pause, kill, failover, resume). The
timeline is written as it happens, so it survives a test that hangs or is killed, and
``vmtests/conftest.py`` adds it to the report of a failed test.

:class:`Pair` runs the checkpoint protocol of docs/DESIGN.md ("Controller contract") over the
nodes' control sockets and :class:`Protector` drives it on a timer with a heartbeat on the
primary, the way the controller does.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repdisk import ctlclient
from repdisk.errors import RepdiskError
from tests.conftest import NodeProc, Nodes
from vmtests.guest import (Guest, GuestVM, build_disk, build_raw_disk, check_records,
                           crash_fsck_clean)
from vmtests.guest.qemu import RECORD_RE, QemuError, QmpClient

log = logging.getLogger(__name__)

# Evidence outlives pytest's tmp_path (which other test runs prune); paths stay short
# enough for Unix sockets.
EVIDENCE_ROOT = Path(os.environ.get("REPDISK_VM_EVIDENCE", "/tmp/repdisk-vmtests"))
INTERVAL = 1.0           # seconds between checkpoints
HEARTBEAT_TIMEOUT = 1.0  # seconds without an answer from the primary before failing over
# A heartbeat to a dead node is an expected failure: qemu.qmp's log of each refused connect
# would bury a failed test's report.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
CONTROL_ERRORS = (RepdiskError, OSError, TimeoutError)
# What a guest kernel prints when a block request fails (blk_update_request / buffer layer).
KERNEL_IO_ERROR = re.compile(r"I/O error|blk_update_request|Buffer I/O error", re.I)
BOOTED = "REPDISK-BOOTED"


class Timeline:
    """Events with their time since the scenario began, appended to a file as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self._lock = threading.Lock()
        path.write_text("")

    def mark(self, event: str, detail: str = "") -> float:
        """Record ``event`` now; returns the monotonic time it was recorded at."""
        now = time.monotonic()
        line = f"{now - self.t0:8.3f}s  {event:<18} {detail}".rstrip()
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
    """One completed pair checkpoint: when, how long the guest was paused, what it covers."""

    number: int
    at: float      # monotonic time the guest was stopped
    pause: float   # seconds between QMP stop and cont
    records: int   # the last record the console announced while the guest was stopped
    vm_state: bool


class Pair:
    """A primary and a secondary node serving the same disks (one consistency group)."""

    def __init__(self, nodes: Nodes, timeline: Timeline, pri_disks: dict[str, Path],
                 sec_disks: dict[str, Path], primary_keys: dict[str, str]) -> None:
        self.nodes = nodes
        self.timeline = timeline
        self.pri_disks = pri_disks
        self.sec_disks = sec_disks
        self.primary_keys = primary_keys
        self.sec = self._start_secondary()
        self.pri = nodes.start("primary", "pri", self._disk_keys(pri_disks) + [
            ("secondary", self.sec.uri("replica")), *primary_keys.items()])
        self.sec.ctl("replication-start", mode="secondary")
        self.pri.ctl("replication-start", mode="primary")
        keys = " ".join(f"{k}={v}" for k, v in primary_keys.items())
        timeline.mark("replication", f"started: disks {', '.join(pri_disks)} {keys}")

    @staticmethod
    def _disk_keys(disks: dict[str, Path]) -> list[tuple[str, str]]:
        return [("disk", f"{name}:{path}") for name, path in disks.items()]

    def _start_secondary(self) -> NodeProc:
        return self.nodes.start("secondary", "sec", self._disk_keys(self.sec_disks))

    def uris(self, node: NodeProc, view: str = "") -> list[str]:
        """The NBD URIs of every disk of ``node`` (``view`` "active" on the secondary)."""
        return [node.uri(f"{view}/{name}" if view else name) for name in self.pri_disks]

    def checkpoint(self, qmp: QmpClient | None, number: int, console: Callable[[], int],
                   vm_state: Path | None = None) -> Checkpoint:
        """One pair checkpoint, the contract's steps with the guest paused meanwhile.

        One change of order: the VM state is saved *before* the primary's hold begins, not
        during it. A migration ends by flushing the guest's disks, and the primary holds that
        flush with the writes until the hold expires (timeout / 2): measured, the pause grew
        from ~0.1 s to exactly timeout / 2. The stopped guest cannot write, so the disk is
        the same before and after the hold begins.

        ``console`` returns the last record the guest announced; it is read while the guest
        is stopped (after the checkpoint's steps, so the console pipe has drained).
        """
        stopped = time.monotonic()
        if qmp:
            qmp.execute("stop")
        try:
            if qmp and vm_state:
                save_vm_state(qmp, vm_state / "vmstate.tmp")
            self.pri.ctl("replication-do-checkpoint")
            try:
                self.sec.ctl("replication-get-error")
                self.sec.ctl("replication-do-checkpoint")
                if qmp and vm_state:
                    os.replace(vm_state / "vmstate.tmp", vm_state / "vmstate")
            finally:
                self.pri.ctl("replication-resume")
            records = console()
        finally:
            if qmp:
                qmp.execute("cont")
        pause = time.monotonic() - stopped
        cp = Checkpoint(number, stopped, pause, records, bool(qmp and vm_state))
        self.timeline.mark("checkpoint", f"#{number} pause {pause * 1000:.1f} ms, records "
                                         f"{records}{', vm-state saved' if cp.vm_state else ''}")
        return cp

    def failover(self) -> None:
        self.sec.ctl("replication-stop", failover=True)

    def restart_secondary(self) -> None:
        """Start the secondary's nbdkit again on the same files, then its replication."""
        for stale in (self.sec.control, self.sec.listen.socket):
            if stale and os.path.exists(stale):
                os.unlink(stale)
        epoch = self.pri.ctl("query-replication")["epoch"]
        self.sec = self._start_secondary()
        self.sec.ctl("replication-start", mode="secondary", epoch=epoch)
        self.timeline.mark("secondary back", f"nbdkit restarted, replication started "
                                             f"(epoch {epoch})")

    def resync(self) -> int:
        sent = self.pri.ctl("replication-resync")["bytes"]
        self.timeline.mark("resync", f"{sent} bytes copied to the secondary")
        return sent


def save_vm_state(qmp: QmpClient, path: Path, timeout: float = 30.0) -> None:
    """Migrate the (stopped) guest's state into ``path`` and wait until it is complete."""
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    qmp.execute("migrate", uri=f"exec:cat > {path}")
    deadline = time.monotonic() + timeout
    while True:
        status = qmp.execute("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise QemuError(f"saving the guest's state to {path}: migration {status}")
        time.sleep(0.01)


class Protector:
    """Checkpoints the pair every ``interval`` s and fails over when the primary is lost.

    The controller's loop (DESIGN.md), driven from the test: each round pings the primary's
    control socket; ``heartbeat_timeout`` s without an answer is a loss, answered by the
    secondary's failover. A checkpoint that fails (e.g. a degraded primary refuses it) is
    recorded and retried at the next interval.
    """

    def __init__(self, pair: Pair, vm: GuestVM, qmp_path: Path, *, interval: float = INTERVAL,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
                 vm_state: Path | None = None) -> None:
        self.pair = pair
        self.vm = vm
        self.qmp = QmpClient(qmp_path)
        self.interval = interval
        self.heartbeat_timeout = heartbeat_timeout
        self.vm_state = vm_state
        self.checkpoints: list[Checkpoint] = []
        self.failed_checkpoints = 0
        self.serving = threading.Event()  # the secondary serves the disks
        self.serving_at = 0.0  # monotonic time the failover completed
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="protector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # reported by wait_* and close()
            self.error = err
            self.pair.timeline.mark("protector error", repr(err))
            with self._cond:
                self._cond.notify_all()

    def _loop(self) -> None:
        last_seen = next_checkpoint = time.monotonic()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            if self._primary_answers():
                last_seen = now
            elif now - last_seen > self.heartbeat_timeout:
                self._fail_over(last_seen)
                return
            if now >= next_checkpoint:
                next_checkpoint = now + self.interval
                self._checkpoint()

    def _primary_answers(self) -> bool:
        try:
            ctlclient.execute(self.pair.pri.control, "query-replication", timeout=1.0)
            return True
        except CONTROL_ERRORS:
            return False

    def _checkpoint(self) -> None:
        number = len(self.checkpoints) + self.failed_checkpoints + 1
        try:
            cp = self.pair.checkpoint(self.qmp, number, self.vm.last_record, self.vm_state)
        except (*CONTROL_ERRORS, QemuError) as err:
            self.pair.timeline.mark("checkpoint failed", f"#{number}: {err}")
            with self._cond:
                self.failed_checkpoints += 1
                self._cond.notify_all()
            return
        with self._cond:
            self.checkpoints.append(cp)
            self._cond.notify_all()

    def _fail_over(self, last_seen: float) -> None:
        self.pair.timeline.mark("primary lost", f"no answer for {self.heartbeat_timeout:g}s")
        self.pair.failover()
        self.serving_at = self.pair.timeline.mark("failover", "secondary committed, serving")
        self.serving.set()
        with self._cond:
            self._cond.notify_all()

    def wait_checkpoints(self, count: int, timeout: float) -> Checkpoint:
        """Wait until ``count`` checkpoints completed; return the last one."""
        self.wait_for(lambda: len(self.checkpoints) >= count, timeout,
                      f"{count} completed checkpoints")
        return self.checkpoints[-1]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate()`` holds (checked after each checkpoint, failed or not)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate() or self.error is not None
                                     or self.serving.is_set(), timeout)
        self._raise_error()
        if not ok or not predicate():
            raise AssertionError(f"no {what} within {timeout:g}s: {len(self.checkpoints)} "
                                 f"checkpoints, {self.failed_checkpoints} failed")

    def wait_serving(self, timeout: float) -> None:
        if not self.serving.wait(timeout):
            self._raise_error()
            raise AssertionError(f"no failover within {timeout:g}s of the primary's loss")

    def _raise_error(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the protector failed: {self.error!r}") from self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        try:
            self.qmp.close()
        except OSError:
            pass


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
        return max(b - a for a, b in zip(times, times[1:]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Scenario:
    """Everything one VM test starts, and its evidence folder; close() stops it all.

    ``folder`` gets the evidence (timeline, consoles, node logs) and the sockets; ``work``
    the disk images and saved VM states, which are large.
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

    def pair(self, disks: dict[str, Path], **primary_keys: str) -> Pair:
        """Start a secondary on copies of ``disks`` and a primary on them; replication runs."""
        sec_disks = {}
        for name, path in disks.items():
            sec_disks[name] = path.with_name(f"sec-{path.name}")
            shutil.copyfile(path, sec_disks[name])
        return Pair(self.nodes, self.timeline, disks, sec_disks,
                    {k.replace("_", "-"): v for k, v in primary_keys.items()})

    def vm(self, name: str, drives: Sequence[str | Path], **kwargs: Any) -> GuestVM:
        """Start a guest whose console goes to ``<name>.console.log``; it also gets a second
        QMP monitor, ``vm_control(name)``, for whoever protects it (QEMU allows one client
        per monitor)."""
        control = self.vm_control(name)
        vm = GuestVM(drives, guest=self.guest, accel=self.accel,
                     log_path=self.folder / f"{name}.console.log",
                     extra_args=["-qmp", f"unix:{control},server=on,wait=off"], **kwargs)
        self.vms.append(vm)
        self._stack.callback(vm.close)
        vm.start()
        self.timeline.mark("vm start", f"{name} on {', '.join(map(str, drives))}"
                                       + (f" (incoming {kwargs['incoming']})"
                                          if kwargs.get("incoming") else ""))
        return vm

    def vm_control(self, name: str) -> Path:
        return self.folder / f"{name}.ctl.qmp"

    def wait_booted(self, vm: GuestVM, name: str, timeout: float = 60.0) -> float:
        """Wait for REPDISK-BOOTED; returns the seconds it took."""
        vm.wait_for(f"^{BOOTED}", timeout)
        took = time.monotonic() - vm.started_at
        self.timeline.mark("booted", f"{name} in {took:.2f}s")
        return took

    def protect(self, pair: Pair, vm: GuestVM, name: str, **kwargs: Any) -> Protector:
        protector = Protector(pair, vm, self.vm_control(name), **kwargs)
        self._stack.callback(protector.close)
        return protector

    def kill(self, what: str, kill: Callable[[], None]) -> float:
        """SIGKILL something (a VM, a node) and mark it; returns the monotonic time."""
        kill()
        return self.timeline.mark("kill -9", what)

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


def records_of(vm: GuestVM) -> list[int]:
    """Every record number the guest announced, in order."""
    return [int(n) for n in RECORD_RE.findall(vm.console)]



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
                 protector: Protector) -> tuple[Checkpoint, int]:
    """SIGKILL the primary's guest QEMU and nbdkit now, wait for the failover and check
    the old guest's console; returns the last checkpoint and the last record announced."""
    killed = scenario.kill("primary guest QEMU", vm.kill)
    scenario.kill("primary nbdkit", pair.pri.kill)
    announced = vm.last_record()
    protector.wait_serving(30)
    scenario.timeline.mark("serving", f"{protector.serving_at - killed:.2f}s from the loss "
                                      f"(heartbeat timeout {protector.heartbeat_timeout:g}s)")
    last = protector.checkpoints[-1]
    assert announced > last.records, "the guest wrote nothing after the last checkpoint"
    assert console_problems(vm) == []
    return last, announced


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


def continue_on_secondary(scenario: Scenario, pair: Pair, last: Checkpoint, announced: int,
                          more: int) -> GuestVM:
    """After a failover: the secondary's disks are at the last checkpoint; a guest booted on
    its ``active`` exports continues the records from there and writes ``more`` of them."""
    # Everything announced by the checkpoint, and at most the one record that was between
    # its file and its console line when the guest was stopped: nothing later.
    count = check_secondary_disk(pair, last.records, last.records + 1)
    scenario.timeline.mark("checked", f"disk at failover: {count} records (checkpoint "
                                      f"{last.records}, console at the loss {announced})")
    vm = scenario.vm("secondary-guest", pair.uris(pair.sec, "active"), workload="records")
    scenario.wait_booted(vm, "secondary-guest")
    # The guest keeps a record that reached the file but not the raw region: it may go on
    # with count + 2 (see checker.py).
    resume = vm.wait_for(r"^REPDISK-RESUME next=(\d+)\r?$", 30)
    assert int(resume.group(1)) in (count + 1, count + 2), resume.group(0)
    vm.wait_for_record(count + more, 60)
    scenario.kill("secondary guest QEMU", vm.kill)
    assert console_problems(vm) == []
    check_secondary_disk(pair, vm.last_record(), vm.last_record() + 1)
    return vm
