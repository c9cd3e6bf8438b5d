"""Issue 20, item 4: the guest as an ``ocf:heartbeat:VirtualDomain`` resource of the real
Corosync/Pacemaker cluster of tests/test_pacemaker.py (issue 17).

The cluster runs the README's "Running under Pacemaker" configuration word for word, then
the README's ``pacemaker:virtualdomain`` block puts a libvirt domain in place of the Dummy
guest (colocated with the promoted repdisk instance, ordered after its promotion), which
the checkpointer pauses through libvirt (``libvirt_domain``). Each
pair node runs its own libvirtd (vmtests/libvirtd.py, ``start_in_node``) and has the
domain's XML at /var/lib/repdisk/guest.xml, its disk the node's own NBD export; the guest
writes numbered records. A power cut of the primary's node (every process of it: QEMU,
libvirtd, the repdisk node, Pacemaker) is fenced; the survivor is promoted and Pacemaker
starts the guest there: it carries on from the records of a checkpoint taken before the
cut, and the survivor's disk ends gapless and e2fsck-clean.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from pathlib import Path

import psutil
import pytest

from repdisk.qmp.client import QMPClient
from tests.helpers.pacemaker import DISK, NBD_PORT, RUN, Pair, make_pair, readme_block
from vmtests.guest import Guest, build_disk, check_records, crash_fsck_clean
from vmtests.harness import console_problems
from vmtests.libvirtd import URI, LibvirtGuest, domain_xml, start_in_node

GUEST_XML = "/var/lib/repdisk/guest.xml"
SERIAL = "/var/lib/repdisk/guest.serial.log"
MORE_RECORDS = 5


def node_disk_xml(address: str) -> str:
    return ("<disk type='network' device='disk'>\n"
            "  <driver name='qemu' type='raw' cache='none'/>\n"
            f"  <source protocol='nbd'><host name='{address}' port='{NBD_PORT}'/></source>\n"
            "  <target dev='vda' bus='virtio'/>\n"
            "</disk>")


def guest_qemus(address: str) -> list[int]:
    """PIDs of the QEMU processes whose disk is the NBD export at ``address``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "qemu-system" in cmdline and f'"host":"{address}"' in cmdline:
            found.append(proc.info["pid"])
    return found


@pytest.mark.timeout(420)
def test_virtualdomain_follows_the_promoted_instance_across_a_power_cut(
        request: pytest.FixtureRequest, guest: Guest, tmp_path: Path) -> None:
    image = build_disk(tmp_path / "guest.img", 64, guest=guest)
    with contextlib.contextmanager(make_pair)(
            2, make_disk=lambda path: shutil.copyfile(image, path)) as pair:
        request.node.repdisk_cluster = pair.cluster
        run_case(pair, guest)


def run_case(pair: Pair, guest: Guest) -> None:
    assert "ocf:heartbeat:Dummy" not in readme_block("virtualdomain")
    for node in pair.pair:
        took = start_in_node(node.run, Path(node.folder) / "libvirt")
        files = Path(node.path("/var/lib/repdisk"))
        Path(node.path(GUEST_XML)).write_text(domain_xml(
            "guest", guest, files, node_disk_xml(node.address), SERIAL,
            seen_as="/var/lib/repdisk"))
        pair.note(f"libvirtd on {node.name} answers after {took:.1f}s")
    p, s = pair.wait_healthy()
    pair.cluster.nodes[0].run(["sh", "-ec", readme_block("virtualdomain")])
    pair.note("guest replaced by VirtualDomain (README)")

    def follow(node, name: str) -> LibvirtGuest:
        vm = LibvirtGuest(None, Path(node.path(GUEST_XML)), Path(node.path(SERIAL)),
                          Path(pair.folder) / f"{name}.console.log", guest, created=True,
                          run_virsh=lambda *a, **k: node.up and node.run(
                              ["virsh", "-c", URI, *a], check=False))
        return vm.start()

    old = follow(p, "primary-guest")
    try:
        pair.cluster.wait(lambda: "REPDISK-BOOTED" in old.console, 120,
                          f"the guest booted on {p.name}")
        pair.note(f"guest booted on {p.name}")
        old.wait_for_record(old.last_record() + 3, 60)
        lo = old.last_record()   # fsync'd before now: in every checkpoint that begins later
        pair.wait_checkpoints(s, 2)
        # The checkpointer paused the guest through libvirt (libvirt_domain) for each.
        ckpt = QMPClient(timeout=10).connect(p.path(f"{RUN}/rd.ckpt.qmp"))
        try:
            pauses = [c["pause"] for c in ckpt.execute("query-controller")["last_checkpoints"]]
        finally:
            ckpt.close()
        pair.note(f"checkpointer's last pauses of the guest: "
                  f"{', '.join(f'{x * 1000:.0f} ms' for x in pauses)}")
        assert pauses and min(pauses) > 0, pauses
        old.wait_for_record(old.last_record() + 1, 30)
        p.power_cut()
        cut = time.monotonic()
        # A power cut leaves no QEMU behind, as on a real host (and the fence agent finds
        # the node's processes the same way).
        assert guest_qemus(p.address) == [], guest_qemus(p.address)
    finally:
        old.close()           # once the console file is read to its end
    at_cut = old.last_record()
    pair.note(f"console of the guest on {p.name}: {at_cut} records at the cut, {lo} before "
              f"the last checkpoints")
    assert console_problems(old) == []

    new = follow(s, "survivor-guest")
    try:
        pair.cluster.wait(lambda: "REPDISK-BOOTED" in new.console, 180,
                          f"the guest booted on {s.name}")
        up = time.monotonic() - cut
        pair.note(f"guest booted on {s.name}, {up:.1f}s after the power cut")
        where = s.run(["crm_resource", "--locate", "--resource", "guest"]).stdout
        assert f"running on: {s.name}" in where, where
        resume = int(new.wait_for(r"^REPDISK-RESUME next=(\d+)\r?\n", 30).group(1))
        assert lo + 1 <= resume <= at_cut + 2, (resume, lo, at_cut)
        new.wait_for_record(resume + MORE_RECORDS, 60)
        s.run(["crm_resource", "--resource", "guest", "--meta", "--set-parameter",
               "target-role", "--parameter-value", "Stopped"])
        pair.cluster.wait(lambda: s.run(["virsh", "-c", URI, "domstate", "guest"],
                                        check=False).returncode != 0,
                          60, "the guest stopped")
    finally:
        new.close()
    assert console_problems(new) == []
    disk = Path(s.path(DISK))
    clean, report = crash_fsck_clean(disk)
    assert clean, report
    count, problems = check_records(disk, None)
    assert problems == [] and count >= new.last_record(), (problems, count)
    pair.note(f"checked: survivor went on from record {resume} ({lo}..{at_cut} at the cut), "
              f"{count} records gapless, e2fsck clean; guest up {up:.1f}s after the cut")
    print(f"\n{pair.cluster.timeline_text()}")
    assert re.search(r"guest booted on", pair.cluster.timeline_text())
