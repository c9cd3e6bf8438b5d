"""Fixtures for the VM tests: the cached guest, the accelerator, disks and QEMU processes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `vmtests.guest` must import however pytest is started
    sys.path.insert(0, str(ROOT))

from vmtests.guest import Guest, GuestVM, build_disk, choose_accel, ensure_guest, qemu_available  # noqa: E402
from vmtests.harness import Scenario, evidence_folder  # noqa: E402


@pytest.fixture(scope="session")
def built_guest() -> Guest:
    """The guest's kernel, initramfs and root tree (built once, then cached on disk)."""
    return ensure_guest()


@pytest.fixture(scope="session")
def guest(built_guest: Guest) -> Guest:
    """The guest, for tests that boot it: skipped only when QEMU is not installed."""
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup.sh installs "
                    "qemu-system-x86)")
    return built_guest


@pytest.fixture(scope="session")
def accel(guest: Guest) -> str:
    """"kvm" where a probe boot under KVM works, else "tcg"."""
    return choose_accel(guest)


@pytest.fixture
def disk(built_guest: Guest, tmp_path: Path) -> Path:
    """A fresh 64 MiB guest disk image (56 MiB ext4 + 8 MiB raw region)."""
    return build_disk(tmp_path / "disk.img", 64, guest=built_guest)


@pytest.fixture
def start_vm(guest: Guest, accel: str, tmp_path: Path) -> Iterator[Callable[..., GuestVM]]:
    """Start a GuestVM (console log in tmp_path); every VM started is killed at teardown."""
    vms: list[GuestVM] = []

    def start(drives: Any, **kwargs: Any) -> GuestVM:
        vm = GuestVM(drives, guest=guest, accel=accel,
                     log_path=tmp_path / f"console{len(vms)}.log", **kwargs)
        vms.append(vm)
        return vm.start()

    yield start
    for vm in vms:
        vm.close()


@pytest.fixture
def scenario(request: pytest.FixtureRequest, guest: Guest, accel: str,
             tmp_path: Path) -> Iterator[Scenario]:
    """A VM scenario: its processes (all stopped at the end), its evidence folder (see
    harness.evidence_folder) and its disks (in tmp_path)."""
    with Scenario(evidence_folder(request.node.name), tmp_path, guest, accel) as s:
        yield s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed scenario's report shows its timeline and where its evidence is."""
    outcome = yield
    report = outcome.get_result()
    scenario = getattr(item, "funcargs", {}).get("scenario")
    if report.failed and isinstance(scenario, Scenario):
        report.sections.append(("repdisk timeline", f"evidence: {scenario.folder}\n"
                                                    f"{scenario.timeline.text()}"))
