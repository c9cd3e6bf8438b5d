"""Scenario 4: the secondary's nbdkit is SIGKILLed while the guest writes. The guest must not
notice (no I/O error, no stall beyond the primary's timeout); the secondary comes back on the
same files, is resynced, becomes consistent at the next checkpoint, and a later failover
still gives a clean guest."""

from __future__ import annotations

import time

import pytest

from vmtests.harness import (INTERVAL, RecordWatch, Scenario, console_problems,
                             continue_on_secondary, lose_primary)

TIMEOUT = 2.0  # the primary's timeout: the longest a guest write may wait for the secondary


@pytest.mark.timeout(180)
def test_secondary_lost_guest_goes_on_then_resync_and_failover(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root")}, timeout=f"{TIMEOUT:g}s")
    vm = scenario.vm("primary-guest", pair.uris(pair.pri), workload="records")
    scenario.wait_booted(vm, "primary-guest")
    watch = RecordWatch(vm)
    protector = scenario.protect(pair, vm, "primary-guest")
    protector.wait_checkpoints(2, 60)

    killed = scenario.kill("secondary nbdkit", pair.sec.kill)
    at_kill = vm.last_record()
    done = len(protector.checkpoints)
    protector.wait_for(lambda: protector.failed_checkpoints >= 2, 30,
                       "two refused checkpoints")  # a degraded primary refuses them
    assert len(protector.checkpoints) == done, "a checkpoint succeeded without a secondary"
    down = vm.last_record()
    scenario.timeline.mark("guest wrote", f"records {at_kill + 1}..{down} with the "
                                          f"secondary down")
    assert down > at_kill

    pair.restart_secondary()
    pair.resync()
    done = len(protector.checkpoints)
    protector.wait_checkpoints(done + 2, 60)  # the secondary is consistent again
    gap = watch.longest_gap(since=killed - 1.0)
    watch.close()
    scenario.timeline.mark("longest stall", f"{gap * 1000:.0f} ms between two records from "
                                            f"the loss to the resync (timeout {TIMEOUT:g}s)")
    assert gap < TIMEOUT
    assert console_problems(vm) == []

    time.sleep(INTERVAL / 2)
    last, announced = lose_primary(scenario, pair, vm, protector)
    assert last.records > down  # a checkpoint after the resync counts
    continue_on_secondary(scenario, pair, last, announced, 20)
