"""The test guest itself: it boots from a file and from an NBD export, its records workload
survives reboots and crashes, and the host-side checker catches every broken disk state."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmtests.guest import (
    GuestVM,
    build_raw_disk,
    check_records,
    crash_fsck_clean,
    fsck_clean,
    nbdkit_file,
    record_line,
)
from vmtests.guest.build import RECORDS_PATH, SLOT_SIZE
from vmtests.guest.checker import raw_layout

StartVM = Callable[..., GuestVM]
BOOT_LIMIT = 30.0  # seconds to REPDISK-BOOTED; about 2 s under TCG on an idle machine


def run_to_poweroff(vm: GuestVM, records: int | None = None) -> float:
    """Wait for the guest to boot, write its records and power off; return the boot time."""
    vm.wait_for(r"^REPDISK-BOOTED", BOOT_LIMIT)
    boot = time.monotonic() - vm.started_at
    assert vm.wait(60) == 0, vm.tail()
    assert "REPDISK-POWEROFF" in vm.console
    assert records is None or vm.last_record() == records, vm.tail()
    return boot


@pytest.mark.timeout(90)
@pytest.mark.parametrize("via", ["file", "nbdkit"])
def test_boot_and_poweroff_after_20_records(start_vm: StartVM, disk: Path, accel: str,
                                            via: str) -> None:
    if via == "file":
        boot = run_to_poweroff(start_vm([disk], workload="poweroff-after", records=20), 20)
    else:
        with nbdkit_file(disk) as uri:
            boot = run_to_poweroff(start_vm([uri], workload="poweroff-after", records=20), 20)
    print(f"boot to REPDISK-BOOTED from {via} under {accel}: {boot:.2f}s")
    assert check_records(disk) == (20, [])
    assert fsck_clean(disk)


@pytest.mark.timeout(90)
def test_records_continue_after_reboot(start_vm: StartVM, disk: Path) -> None:
    run_to_poweroff(start_vm([disk], workload="poweroff-after", records=5), 5)
    vm = start_vm([disk], workload="poweroff-after", records=7)
    run_to_poweroff(vm, 12)
    assert "REPDISK-RESUME next=6" in vm.console
    assert check_records(disk) == (12, [])
    assert fsck_clean(disk)


@pytest.mark.timeout(90)
def test_two_disks_put_the_raw_region_on_vdb(start_vm: StartVM, disk: Path,
                                             tmp_path: Path) -> None:
    raw = build_raw_disk(tmp_path / "raw.img", 4)
    run_to_poweroff(start_vm([disk, raw], workload="poweroff-after", records=10), 10)
    assert check_records(disk, raw) == (10, [])
    offset, length = raw_layout(disk)
    with open(disk, "rb") as f:
        assert os.pread(f.fileno(), length, offset) == bytes(length)  # vda's tail untouched


@pytest.mark.timeout(120)
def test_sigkill_mid_workload_leaves_a_recoverable_disk(start_vm: StartVM, disk: Path) -> None:
    vm = start_vm([disk], workload="records")
    vm.wait_for_record(15, 60)
    vm.kill()
    announced = vm.last_record()
    assert vm.proc is not None and vm.proc.returncode == -9
    clean, report = crash_fsck_clean(disk)
    assert clean, report
    count, problems = check_records(disk)
    assert problems == []
    assert count >= announced
    # The next boot replays the journal itself and continues after the durable records.
    # (count + 1 if record count + 1 reached the file but not the raw region: it is completed.)
    vm = start_vm([disk], workload="poweroff-after", records=3)
    run_to_poweroff(vm)
    assert vm.last_record() in (count + 3, count + 4), vm.tail()
    assert check_records(disk) == (vm.last_record(), [])
    assert fsck_clean(disk)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("raw_records, tail, marker", [
    (6, b"", "REPDISK-RESUME next=8"),  # crashed between the file's fsync and the raw slot's
    (7, b"REC 8 0123", "REPDISK-TRUNCATE keeping 7"),  # a torn last line
])
def test_guest_recovers_a_crashed_record(start_vm: StartVM, disk: Path, tmp_path: Path,
                                         raw_records: int, tail: bytes, marker: str) -> None:
    write_records(disk, 7, raw_records, tmp_path, tail)
    vm = start_vm([disk], workload="poweroff-after", records=2)
    run_to_poweroff(vm, 9)
    assert marker in vm.console
    assert check_records(disk) == (9, [])
    assert fsck_clean(disk)


@pytest.mark.timeout(60)
def test_idle_guest_answers_qmp_and_quits(start_vm: StartVM, disk: Path) -> None:
    vm = start_vm([disk])
    vm.wait_for(r"^REPDISK-BOOTED workload=idle", BOOT_LIMIT)
    vm.wait_for(r"^REPDISK-IDLE", 10)
    assert vm.qmp("query-status")["status"] == "running"
    assert [b["inserted"]["node-name"] for b in vm.qmp("query-block")] == ["disk0"]
    vm.shutdown()
    assert vm.proc is not None and vm.proc.returncode == 0
    assert check_records(disk) == (0, [])


@pytest.mark.timeout(60)
def test_incoming_guest_waits_for_a_migration(start_vm: StartVM, disk: Path) -> None:
    vm = start_vm([disk], incoming="defer")
    assert vm.qmp("query-status")["status"] == "inmigrate"
    assert vm.console == ""  # the guest has not started
    vm.kill()
    assert vm.proc is not None and vm.proc.returncode == -9


# The checker, on disks whose records are written by the host (debugfs -w, no VM needed).

def write_records(disk: Path, file_records: int, raw_records: int, tmp_path: Path,
                  tail: bytes = b"") -> None:
    lines = tmp_path / "records.log"
    lines.write_bytes(b"".join(record_line(i) + b"\n" for i in range(1, file_records + 1)) + tail)
    subprocess.run(["debugfs", "-w", "-R", f"write {lines} {RECORDS_PATH}", str(disk)],
                   check=True, capture_output=True)
    offset, _ = raw_layout(disk)
    with open(disk, "r+b") as f:
        for i in range(1, raw_records + 1):
            slot = (record_line(i) + b"\n").ljust(SLOT_SIZE, b"\0")
            os.pwrite(f.fileno(), slot, offset + (i - 1) * SLOT_SIZE)


def corrupt(disk: Path, offset: int) -> None:
    with open(disk, "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 0x01]), offset)


@pytest.mark.parametrize("file_records, raw_records, count, ok", [
    (7, 7, 7, True), (7, 6, 6, True), (7, 5, 5, False), (6, 7, 6, False), (0, 0, 0, True)])
def test_checker_file_and_raw_counts(disk: Path, tmp_path: Path, file_records: int,
                                     raw_records: int, count: int, ok: bool) -> None:
    write_records(disk, file_records, raw_records, tmp_path)
    found, problems = check_records(disk)
    assert (found, problems == []) == (count, ok), problems
    assert check_records(disk.read_bytes()) == (found, problems)  # bytes work the same


def test_checker_finds_a_bad_raw_slot_and_a_stale_one(disk: Path, tmp_path: Path) -> None:
    write_records(disk, 9, 9, tmp_path)
    offset, _ = raw_layout(disk)
    corrupt(disk, offset + 4 * SLOT_SIZE + 30)  # record 5's payload
    count, problems = check_records(disk)
    assert count == 4
    assert any("slot 5 is not zero after 4 valid records" in p for p in problems), problems


def test_checker_finds_a_bad_line_and_a_torn_tail(disk: Path, tmp_path: Path) -> None:
    write_records(disk, 6, 6, tmp_path, tail=b"REC 7 0123")
    count, problems = check_records(disk)
    assert count == 6
    assert problems == [f"{RECORDS_PATH}: torn last line b'REC 7 0123'"]
    bad = tmp_path / "bad.img"
    shutil.copyfile(disk, bad)
    data = bytearray(bad.read_bytes())
    line3 = data.find(record_line(3))  # in the file's data block: the raw region comes last
    data[line3 + len(record_line(3)) - 1] ^= 0x01
    count, problems = check_records(bytes(data))
    assert count == 2
    assert any("line 3 is not record 3" in p for p in problems), problems


def test_fsck_clean_rejects_a_damaged_filesystem(disk: Path) -> None:
    assert fsck_clean(disk)
    corrupt(disk, 1024 + 0x58)  # a byte of the superblock's UUID: its checksum fails
    assert not fsck_clean(disk)
