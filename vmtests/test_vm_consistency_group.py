"""Scenario 5: a root disk and a data disk in one consistency group (``disk=root:...
disk=data:...`` on both nodes). The guest appends each record to a file on the root disk,
then to its slot on the data disk (/dev/vdb): after a failover both disks must be at the same
checkpoint, which the checker sees as file count == raw count (or one more)."""

from __future__ import annotations

import time

import pytest

from vmtests.harness import INTERVAL, Scenario, continue_on_secondary, lose_primary



@pytest.mark.timeout(150)
def test_two_disks_fail_over_at_the_same_checkpoint(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root"), "data": scenario.raw_disk("data")},
                         timeout="5s")
    vm = scenario.vm("primary-guest", pair.uris(pair.pri), workload="records")
    scenario.wait_booted(vm, "primary-guest")
    protector = scenario.protect(pair, vm, "primary-guest")
    protector.wait_checkpoints(3, 60)
    time.sleep(INTERVAL / 2)
    last, announced = lose_primary(scenario, pair, vm, protector)
    continue_on_secondary(scenario, pair, last, announced, 20)
