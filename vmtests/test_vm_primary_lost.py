"""Scenarios 2 and 3: the primary (its guest's QEMU and its nbdkit) is SIGKILLed while the
guest writes; the secondary takes over, and a guest carries on from the last checkpoint on
the secondary's ``active`` export: rebooted on it, or resumed from the checkpoint's saved
VM state (``--vm-state``) without a reboot."""

from __future__ import annotations

import time

import pytest

from vmtests.harness import (BOOTED, INTERVAL, Checkpoint, Pair, Scenario, check_secondary_disk,
                             console_problems, continue_on_secondary, lose_primary,
                             records_of, restore_vm)

MORE_RECORDS = 20  # the new guest must write this many past the checkpoint


def run_and_lose_primary(scenario: Scenario, pair: Pair, vm_state: bool) -> tuple[Checkpoint, int]:
    """Run the guest on the primary under protection; kill the primary between checkpoints."""
    vm = scenario.vm("primary-guest", pair.uris(pair.pri), workload="records")
    scenario.wait_booted(vm, "primary-guest")
    protector = scenario.protect(pair, vm, "primary-guest",
                                 vm_state=scenario.work if vm_state else None)
    protector.wait_checkpoints(3, 60)
    time.sleep(INTERVAL / 2)  # between two checkpoints: the guest is writing
    return lose_primary(scenario, pair, vm, protector)


@pytest.mark.timeout(150)
def test_primary_lost_guest_reboots_on_the_secondary(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root")}, timeout="5s")
    last, announced = run_and_lose_primary(scenario, pair, vm_state=False)
    continue_on_secondary(scenario, pair, last, announced, MORE_RECORDS)


@pytest.mark.timeout(150)
def test_primary_lost_guest_resumes_from_the_saved_vm_state(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root")}, timeout="5s")
    last, announced = run_and_lose_primary(scenario, pair, vm_state=True)
    count = check_secondary_disk(pair, last.records, last.records + 1)

    vm = restore_vm(scenario, "secondary-guest", pair.uris(pair.sec, "active"),
                    scenario.work / "vmstate", workload="records")
    vm.wait_for_record(last.records + MORE_RECORDS, 60)
    scenario.kill("secondary guest QEMU", vm.kill)
    records = records_of(vm)
    scenario.timeline.mark("checked", f"resumed guest wrote {records[0]}..{records[-1]} "
                                      f"(checkpoint {last.records}, disk {count}, console at "
                                      f"the loss {announced})")
    assert BOOTED not in vm.console, "the guest rebooted instead of resuming"
    # Its memory is the checkpoint's: it goes on with the record after the checkpoint's.
    assert records == list(range(last.records + 1, records[-1] + 1))
    assert console_problems(vm) == []
    check_secondary_disk(pair, vm.last_record(), vm.last_record() + 1)
