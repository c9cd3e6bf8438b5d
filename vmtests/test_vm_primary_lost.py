"""Scenarios 2 and 3: the primary (its guest's QEMU and its nbdkit) is SIGKILLed while the
guest writes; the controller fails over to the secondary and runs its hook, and a guest
carries on from the last checkpoint on the secondary's ``active`` export: rebooted on it,
or resumed from the checkpoint's saved VM state (``--vm-state``) without a reboot."""

from __future__ import annotations

import pytest

from vmtests.harness import (
    BOOTED,
    Scenario,
    check_secondary_disk,
    console_problems,
    continue_on_secondary,
    lose_primary,
    records_of,
    restore_vm,
)

MORE_RECORDS = 20  # the new guest must write this many past the checkpoint


@pytest.mark.timeout(150)
def test_primary_lost_guest_reboots_on_the_secondary(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root")})
    vm, ctl = scenario.protected_guest(pair, "primary-guest")
    last, failover = lose_primary(scenario, pair, vm, ctl)
    assert failover.vm_state is None
    continue_on_secondary(scenario, pair, last, vm, MORE_RECORDS)


@pytest.mark.timeout(150)
def test_primary_lost_guest_resumes_from_the_saved_vm_state(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root")})
    old, ctl = scenario.protected_guest(pair, "primary-guest", vm_state=True)
    last, failover = lose_primary(scenario, pair, old, ctl)
    assert failover.vm_state == scenario.work / "vmstate"
    assert last.vm_state_bytes == failover.vm_state.stat().st_size
    lo, hi = last.bounds(old)
    count = check_secondary_disk(pair, lo, hi)

    vm = restore_vm(scenario, "secondary-guest", pair.uris(pair.sec, "active"),
                    failover.vm_state, workload="records")
    vm.wait_for_record(hi + MORE_RECORDS, 60)
    scenario.kill("secondary guest QEMU", vm.kill)
    records = records_of(vm)
    # Its memory is the checkpoint's: the first record it prints is the one after the
    # last it printed before the stop (P in Checkpoint's terms), so it tells P exactly.
    printed = records[0] - 1
    scenario.timeline.mark("checked", f"resumed guest wrote {records[0]}..{records[-1]}: "
                                      f"printed {printed} before the checkpoint #{last.seq} "
                                      f"({lo}..{hi}), disk {count}")
    assert BOOTED not in vm.console, "the guest rebooted instead of resuming"
    assert records == list(range(records[0], records[-1] + 1))
    assert lo <= printed < hi and count in (printed, printed + 1)
    assert console_problems(vm) == []
    check_secondary_disk(pair, vm.last_record(), vm.last_record() + 1)
