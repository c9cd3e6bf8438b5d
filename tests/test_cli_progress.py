"""Long operations show their progress on a terminal (and only there)."""

from __future__ import annotations

import subprocess

from tests.helpers.commands import REPDISK, on_a_terminal
from tests.helpers.nodes import MiB, Nodes, make_disk


def _failover_ready(tmp_path, nodes: Nodes):
    """A started secondary whose hidden overlay holds 48 MiB, so the failover commit has work."""
    sec = nodes.secondary(make_disk(str(tmp_path / "s.img"), 64 * MiB, fill=0x11))
    sec.ctl("replication-start", mode="secondary")
    sec.ctl("replication-do-checkpoint")
    h = sec.client("replica")
    for off in range(0, 48 * MiB, 4 * MiB):
        h.pwrite(b"\x22" * (4 * MiB), off)
    h.shutdown()
    return sec


def test_failover_on_a_terminal_shows_progress_to_completion(tmp_path, nodes: Nodes) -> None:
    sec = _failover_ready(tmp_path, nodes)
    text = on_a_terminal([REPDISK, "ctl", sec.control, "failover"])
    assert "disk0 failover: 48.0/48.0 MiB (100%)" in text, text
    assert text.rstrip().endswith("ok"), text
    # the disk rolled back to the checkpoint
    assert sec.client("active").pread(MiB, 0) == b"\x11" * MiB


def test_without_a_terminal_there_is_no_progress_noise(tmp_path, nodes: Nodes) -> None:
    sec = _failover_ready(tmp_path, nodes)
    proc = subprocess.run([REPDISK, "ctl", sec.control, "failover"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ok\n" and proc.stderr == ""
