"""The controller's way to a libvirt guest's monitor (issue 20, item 2), without a guest.

The real thing (a libvirtd running the guest, the controller pausing it for checkpoints)
is vmtests/test_vm_libvirt.py; here: what a user sees for a wrong combination, and for a
libvirt that does not answer.
"""

from __future__ import annotations

import subprocess

import pytest

from repdisk.controller.guest import LibvirtMonitor
from repdisk.errors import ControlError
from tests.helpers.commands import REPDISK


def test_qmp_and_libvirt_domain_together_is_one_line(tmp_path) -> None:
    result = subprocess.run([REPDISK, "controller", "--primary", "p.qmp", "--secondary",
                             "s.qmp", "--control", "c.qmp", "--qmp", "g.qmp",
                             "--libvirt-domain", "guest"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("repdisk: error: libvirt-domain: libvirt owns that guest's "
                             "monitor: give --libvirt-domain or --qmp, not both\n")
    assert list(tmp_path.iterdir()) == []


def test_a_libvirt_that_does_not_answer_is_a_control_error(tmp_path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/no-libvirtd.sock"
    monitor = LibvirtMonitor("guest", uri)
    with pytest.raises(ControlError, match=r"^libvirt qemu\+unix:///system\?socket=.*: cannot "
                                           r"connect: .*; is libvirtd running\?$"):
        monitor.execute("stop")
    monitor.close()

