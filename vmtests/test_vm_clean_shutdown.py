"""Scenario 1: a guest runs on the primary and shuts down cleanly; after a final checkpoint
and a failover the secondary holds exactly the primary's disk, byte for byte."""

from __future__ import annotations

import pytest

from vmtests.guest import check_records, fsck_clean
from vmtests.harness import Scenario, console_problems, first_difference, read_export

RECORDS = 200


@pytest.mark.timeout(150)
def test_clean_shutdown_leaves_a_byte_identical_secondary(scenario: Scenario) -> None:
    disk = scenario.disk("root")
    pair = scenario.pair({"root": disk})
    vm = scenario.vm("guest", pair.uris(pair.pri), workload="poweroff-after", records=RECORDS)
    scenario.wait_booted(vm, "guest")
    protector = scenario.protect(pair, vm, "guest", interval=1.0, heartbeat_timeout=3.0)
    assert vm.wait(120) == 0, vm.tail()
    scenario.timeline.mark("poweroff", f"guest wrote {vm.last_record()} records, exit 0")
    protector.close()
    assert protector.checkpoints, "no checkpoint completed while the guest ran"
    assert "REPDISK-POWEROFF" in vm.console and console_problems(vm) == []

    pair.checkpoint(None, len(protector.checkpoints) + 1, vm.last_record)  # the final one
    pair.failover()
    scenario.timeline.mark("failover", "secondary committed")

    primary = disk.read_bytes()
    assert first_difference(primary, pair.sec_disks["root"].read_bytes()) is None
    assert first_difference(primary, read_export(pair.sec.uri("active"))) is None
    assert check_records(pair.sec_disks["root"]) == (RECORDS, [])
    assert fsck_clean(pair.sec_disks["root"])
