"""Scenario 4: the secondary's nbdkit is SIGKILLed while the guest writes. The guest must not
notice (no I/O error, no stall beyond the primary's timeout); the controller marks the pair
degraded and takes no checkpoint meanwhile; when the secondary's process comes back on the
same files the controller re-protects it by itself (starts it, resyncs the dirty regions,
checkpoints), and a later failover still gives a clean guest."""

from __future__ import annotations

import time

import pytest

from vmtests.harness import (
    INTERVAL,
    RecordWatch,
    Scenario,
    console_problems,
    continue_on_secondary,
    lose_primary,
)

TIMEOUT = 2.0  # the primary's timeout: the longest a guest write may wait for the secondary


@pytest.mark.timeout(180)
def test_secondary_lost_guest_goes_on_then_resync_and_failover(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root")}, timeout=f"{TIMEOUT:g}s")
    # The controller's heartbeat-timeout must exceed the primary's timeout (timing rules).
    vm, ctl = scenario.protected_guest(pair, "primary-guest", heartbeat_timeout=TIMEOUT + 0.5)
    watch = RecordWatch(vm)
    vm.wait_for_record(1, 30)
    ctl.next_checkpoint()  # the guest is writing and the pair is protected

    killed = scenario.kill("secondary nbdkit", pair.sec.kill)
    at_kill = vm.last_record()
    q = ctl.wait_for(lambda q: q["state"] == "degraded", 10, "degraded pair")
    done = q["counters"]["checkpoints"]
    time.sleep(2 * INTERVAL)  # two checkpoint intervals with the secondary down
    q = ctl.query()
    assert q["state"] == "degraded" and q["counters"]["checkpoints"] == done, q["counters"]
    down = vm.last_record()
    scenario.timeline.mark("guest wrote", f"records {at_kill + 1}..{down} with the "
                                          f"secondary down")
    assert down > at_kill

    pair.restart_secondary()
    q = ctl.wait_for(lambda q: q["state"] == "running" and q["counters"]["checkpoints"] > done,
                     60, "re-protection by the controller")
    assert q["counters"]["resync_bytes"] > 0, "the dirty regions were not copied"
    ctl.next_checkpoint()  # and the periodic checkpoints go on
    gap = watch.longest_gap(since=time.monotonic() - (time.time() - killed) - 1.0)
    watch.close()
    scenario.timeline.mark("longest stall", f"{gap * 1000:.0f} ms between two records from "
                                            f"the loss to the resync (timeout {TIMEOUT:g}s)")
    assert gap < TIMEOUT
    assert console_problems(vm) == []

    last, _ = lose_primary(scenario, pair, vm, ctl)
    assert last.bounds(vm)[0] > down  # a checkpoint after the resync counts
    continue_on_secondary(scenario, pair, last, vm, 20)
