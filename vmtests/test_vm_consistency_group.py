"""Scenario 5: a root disk and a data disk in one consistency group (``disk=root:...
disk=data:...`` on both nodes). The guest appends each record to a file on the root disk,
then to its slot on the data disk (/dev/vdb): after the controller's failover both disks
must be at the same checkpoint, which the checker sees as file count == raw count (or one
more)."""

from __future__ import annotations

import pytest

from vmtests.harness import Scenario, continue_on_secondary, lose_primary


@pytest.mark.timeout(150)
def test_two_disks_fail_over_at_the_same_checkpoint(scenario: Scenario) -> None:
    pair = scenario.pair({"root": scenario.disk("root"), "data": scenario.raw_disk("data")})
    vm, ctl = scenario.protected_guest(pair, "primary-guest")
    last, _ = lose_primary(scenario, pair, vm, ctl)
    continue_on_secondary(scenario, pair, last, vm, 20)
