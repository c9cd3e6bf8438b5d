"""Scenario 1: a guest runs on the primary and shuts down cleanly; after a final checkpoint
and a failover, both asked of the controller, the secondary holds exactly the primary's disk,
byte for byte.

The controller runs without ``--qmp`` here: a guest that powers off takes its monitor with
it, and the final checkpoint comes after that. Its checkpoints are then crash-consistent
without pausing the guest (the primary's barrier + hold, docs/DESIGN.md), which this
scenario covers while the guest writes; the others cover the paused ones.
"""

from __future__ import annotations

import time

import pytest

from repdisk.qmp.client import execute
from vmtests.guest import check_records, fsck_clean
from vmtests.harness import Scenario, console_problems, first_difference, read_export

RECORDS = 200


@pytest.mark.timeout(150)
def test_clean_shutdown_leaves_a_byte_identical_secondary(scenario: Scenario) -> None:
    disk = scenario.disk("root")
    pair = scenario.pair({"root": disk})
    ctl = scenario.controller(pair)
    ctl.wait_running()
    vm = scenario.vm("guest", pair.uris(pair.pri), workload="poweroff-after", records=RECORDS)
    started = time.time()
    scenario.wait_booted(vm, "guest")
    assert vm.wait(120) == 0, vm.tail()
    scenario.timeline.mark("poweroff", f"guest wrote {vm.last_record()} records, exit 0")
    assert "REPDISK-POWEROFF" in vm.console and console_problems(vm) == []
    assert ctl.last_checkpoint().time > started, "no checkpoint while the guest ran"

    final = execute(ctl.control, "replication-do-checkpoint")
    assert final["pause"] == 0
    execute(ctl.control, "controller-failover", {"reason": "the guest shut down"})
    failover = ctl.wait_failover()
    assert failover.vm_state is None and ctl.query()["old_primary_fenced"]

    primary = disk.read_bytes()
    assert first_difference(primary, pair.sec_disks["root"].read_bytes()) is None
    assert first_difference(primary, read_export(pair.sec.uri("active"))) is None
    assert check_records(pair.sec_disks["root"]) == (RECORDS, [])
    assert fsck_clean(pair.sec_disks["root"])
