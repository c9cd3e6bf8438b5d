"""Issue 20, item 3: the README's libvirt section, run with a real libvirtd.

The test sets libvirt up itself and stops it at the end (vmtests/libvirtd.py), once with
QEMU as root and once as ``libvirt-qemu``. From the README's "Under libvirt" section it
takes, word for word: the socket options of both nodes, the two ``<disk>`` elements (the
folder ``/srv/repdisk/`` replaced by the test's), the domain name and the controller's
``--libvirt-domain`` and ``--on-failover`` options. Then:

- ``virsh create guest.xml`` boots the guest on the primary (TCG, direct kernel boot, serial
  console to a file; created paused, so the controller starts the pair before its first
  write, as the other VM tests do), writing numbered records;
- the controller checkpoints it, pausing it through libvirt (as libvirt-qemu also saving its
  state with ``--vm-state``, into a folder only root may enter);
- the primary's host dies: ``virsh destroy`` of the guest and kill -9 of the primary node;
- the controller fails over, and its hook (the README's ``virsh destroy``, ``virsh create
  guest-on-sec.xml``) boots the guest on the secondary's ``active`` export: it
  carries on from the last checkpoint's records; at the end the secondary's disk holds
  gapless records and its file system is clean.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest

from vmtests.harness import Scenario, check_secondary_disk, console_problems, lose_primary
from vmtests.libvirtd import Libvirtd, LibvirtGuest, domain_xml, virsh

ROOT = Path(__file__).resolve().parent.parent
FOLDER = "/srv/repdisk/"     # the README's folder, replaced by the test's
MORE_RECORDS = 10            # the guest on the secondary writes this many past the checkpoint


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("### Under libvirt", 1)[1].split("\n## ", 1)[0]


def readme_commands() -> list[list[str]]:
    """The section's shell commands, continuation lines joined, as argument lists."""
    block = readme_section().split("```sh", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").strip().splitlines()]


def readme_disks() -> list[str]:
    """The section's two ``<disk>`` elements: on the primary, then on the secondary."""
    return re.findall(r"```xml\n(.*?)```", readme_section(), re.S)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def readme_setup() -> tuple[dict[str, str], str, str, str]:
    """(socket keys of both nodes, domain name, controller's --on-failover, virsh create of
    the guest on the primary) as the README gives them."""
    commands = {tuple(argv[:2]): argv for argv in readme_commands()}
    keys = {}
    for role in ("secondary", "primary"):
        argv = commands["repdisk", role]
        keys[role] = {k: option(argv, f"--{k}") for k in ("socket-group", "socket-mode")}
    assert keys["primary"] == keys["secondary"], keys
    controller = commands["repdisk", "controller"]
    create = shlex.join(commands["virsh", "-c"])
    return (keys["primary"], option(controller, "--libvirt-domain"),
            option(controller, "--on-failover"), create)


def test_the_readme_section_is_what_this_test_runs() -> None:
    keys, domain, hook, create = readme_setup()
    assert keys == {"socket-group": "libvirt-qemu", "socket-mode": "0660"}
    assert (domain, hook, create) == (
        "guest", "virsh -c qemu:///system destroy guest; virsh -c qemu:///system create "
                 "/srv/repdisk/guest-on-$(basename $REPDISK_SECONDARY_CONTROL .qmp).xml",
        "virsh -c qemu:///system create /srv/repdisk/guest.xml")
    primary, secondary = readme_disks()
    assert f"socket='{FOLDER}pri.sock'" in primary and "name='active'" not in primary
    assert f"socket='{FOLDER}sec.sock'" in secondary and "name='active'" in secondary


@pytest.mark.timeout(300)
@pytest.mark.parametrize("qemu_user", ["root", "libvirt-qemu"])
def test_libvirt_guest_checkpointed_then_booted_on_the_secondary(scenario: Scenario,
                                                                 qemu_user: str) -> None:
    folder = scenario.folder
    keys, domain, hook, create = readme_setup()
    here = lambda text: text.replace(FOLDER, f"{folder}/")  # noqa: E731
    daemon = Libvirtd(qemu_user)
    scenario._stack.callback(daemon.close)
    daemon.start()
    scenario.timeline.mark("libvirtd", f"up in {daemon.start_seconds:.2f}s, QEMU as "
                                       f"{qemu_user}")
    pair = scenario.pair({"root": scenario.disk("root")}, node_keys=keys)
    assert Path(pair.pri.listen.socket or "") == folder / "pri.sock"
    assert Path(pair.sec.listen.socket or "") == folder / "sec.sock"
    xmls = {}
    for name, disk in zip(("guest", "guest-on-sec"), readme_disks(), strict=False):
        xmls[name] = folder / f"{name}.xml"
        xmls[name].write_text(domain_xml(domain, scenario.guest, folder, here(disk),
                                         folder / f"{name}.serial.log"))
    assert here(create).split()[-1] == str(xmls["guest"])

    vm = LibvirtGuest(daemon, xmls["guest"], folder / "guest.serial.log",
                      folder / "primary-guest.console.log", scenario.guest, paused=True)
    scenario._stack.callback(vm.close)
    vm.start()
    created = time.monotonic() - vm.started_at
    scenario.timeline.mark("vm start", f"virsh create --paused {xmls['guest'].name}: "
                                       f"{created:.2f}s")
    # Checkpoints every 2 s: a TCG guest paused through libvirt for each one writes slowly
    # on a busy host, and lose_primary needs it to write past the last checkpoint.
    # As libvirt-qemu, the controller also saves the guest's state (--vm-state) through
    # libvirt: a descriptor of a file QEMU's user could not open.
    ctl = scenario.controller(pair, None, interval=2.0, vm_state=qemu_user != "root",
                              extra_args=["--libvirt-domain", domain],
                              on_failover=here(hook))
    ctl.wait_running()
    # The controller's first checkpoint continues the guest (QMP cont) if it is still paused.
    state = virsh("domstate", domain).strip()
    if state == "paused":
        virsh("resume", domain)
    boot = scenario.wait_booted(vm, "primary-guest",
                                since=scenario.timeline.mark("resume", f"guest was {state}"))

    last, failover = lose_primary(scenario, pair, vm, ctl)
    assert last.pause > 0      # the controller stopped the guest through libvirt
    if qemu_user != "root":
        assert failover.vm_state == scenario.work / "vmstate"
        assert last.vm_state_bytes == failover.vm_state.stat().st_size > 1 << 20
        assert failover.vm_state.stat().st_uid == 0 and scenario.work.stat().st_mode & 0o077 == 0
    lo, hi = last.bounds(vm)

    assert pair.sec.control == str(folder / "sec.qmp")     # the hook's guest-on-sec.xml
    new = LibvirtGuest(daemon, xmls["guest-on-sec"], folder / "guest-on-sec.serial.log",
                       folder / "secondary-guest.console.log", scenario.guest, created=True)
    scenario._stack.callback(new.close)
    new.start()
    new.wait_for("^REPDISK-BOOTED", 60)
    up = time.time() - failover.record["time"] + failover.record["loss_to_serving"]
    scenario.timeline.mark("booted", f"secondary-guest: {up:.2f}s after the primary's last "
                                     f"answer (serving after "
                                     f"{failover.record['loss_to_serving']:.2f}s)")
    # It goes on from the checkpoint: count + 1, or count + 2 (checker.py), count in lo..hi.
    resume = int(new.wait_for(r"^REPDISK-RESUME next=(\d+)\r?\n", 30).group(1))
    assert lo + 1 <= resume <= hi + 2, (resume, lo, hi)
    new.wait_for_record(resume + MORE_RECORDS, 60)
    scenario.kill("secondary guest", new.kill)
    assert console_problems(new) == []
    count = check_secondary_disk(pair, new.last_record(), new.last_record() + 1)
    scenario.timeline.mark("checked", f"QEMU as {qemu_user}: created {created:.2f}s, boot "
                                      f"{boot:.2f}s, checkpoint #{last.seq} ({lo}..{hi}), "
                                      f"guest on the secondary from record {resume} after "
                                      f"{up:.2f}s, disk {count} records gapless, e2fsck clean")
