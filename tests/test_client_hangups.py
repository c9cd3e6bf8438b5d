"""A client that hangs up with requests under way leaves its node up.

nbdkit 1.32.4-1.33.9 (Debian 12's) aborted the whole node when a client went away while two
of its replies were under way: a guest's QEMU killed during I/O took its primary down, and a
primary that crashed or gave up on a hung link its secondary.  Every node preloads
nbdplugin/nbdkit-guard.c against that.  Without the guard this test's node died in its first
rounds.
"""

from __future__ import annotations

import nbd

from repdisk.cli import nodeproc
from tests.helpers.cli import Pair, checkpoint, replicating_pair
from tests.helpers.nodes import REQUEST, REQUEST_MAGIC, MiB, raw_session, read_file

CHUNK = 64 << 10
ROUNDS = 20          # of writes: 5 chunks each, in an 8 MiB disk


def reads(count: int) -> bytes:
    return b"".join(REQUEST.pack(REQUEST_MAGIC, 0, 0, i, i * CHUNK % MiB, CHUNK)
                    for i in range(count))


def writes(first: int, count: int, fill: int) -> bytes:
    """``count`` 64 KiB writes of ``fill`` bytes from chunk ``first`` on, the last cut short."""
    whole = b"".join(REQUEST.pack(REQUEST_MAGIC, 0, 1, i, i * CHUNK, CHUNK) + bytes([fill]) * CHUNK
                     for i in range(first, first + count))
    return whole[:-CHUNK // 2]


def hang_up_after(pair: Pair, role: str, export: str, requests: bytes) -> None:
    """Connect to ``export`` of the node ``role`` (pri, sec), queue ``requests``, hang up."""
    try:
        s = raw_session(pair.path(f"{role}.sock"), export)
        s.sendall(requests)
    except (OSError, AssertionError) as err:
        log = read_file(pair.path(f"{role}.log")).decode().splitlines()[-2:]
        raise AssertionError(f"{role} node gone ({err!r}); its log ends: {log}") from None
    s.close()


def test_clients_that_hang_up_during_io_leave_both_nodes_up(cli_pair: Pair) -> None:
    assert read_file(nodeproc.NBDKIT_GUARD)      # built by make setup, preloaded by every node
    pri, sec, guest = replicating_pair(cli_pair)
    for _ in range(2 * ROUNDS):
        hang_up_after(cli_pair, "pri", "", reads(64))          # a guest killed while reading
        hang_up_after(cli_pair, "sec", "replica", reads(64))   # a reader of the replica
    for r in range(ROUNDS):                                    # ... and while writing
        hang_up_after(cli_pair, "pri", "", writes(5 * r, 5, r + 1))
    status = cli_pair.repdisk("status", pri, sec).stdout
    assert [line.split()[:3] for line in status.splitlines()] == [
        ["primary", "disk0", "running"], ["secondary", "disk0", "running"]], status
    for role in ("pri", "sec"):
        assert "Assertion" not in read_file(cli_pair.path(f"{role}.log")).decode()
    # Every whole write of a hang-up landed and was replicated, the cut-short ones did not,
    # and a guest's next write goes through as ever.
    h = nbd.NBD()
    h.connect_uri(guest)
    h.pwrite(b"\x5a" * 4096, 5 * ROUNDS * CHUNK)
    h.shutdown()
    checkpoint(cli_pair, pri, sec)
    expected = b"".join(bytes([r + 1]) * 4 * CHUNK + bytes(CHUNK) for r in range(ROUNDS))
    expected += b"\x5a" * 4096
    image = read_file(cli_pair.path("pri.img"))
    assert image[:len(expected)] == expected and not any(image[len(expected):])
    assert read_file(cli_pair.path("sec.img")) == image


def test_a_node_started_without_the_guard_says_what_that_risks(tmp_path, monkeypatch,
                                                             capsys) -> None:
    listen = nodeproc.Listen(socket=str(tmp_path / "n.sock"))
    cmd = nodeproc.nbdkit_command("p.py", [("role", "secondary")], listen)
    assert cmd[:3] == ["env", f"LD_PRELOAD={nodeproc.NBDKIT_GUARD}", "nbdkit"]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(nodeproc, "NBDKIT_GUARD", str(tmp_path / "none.so"))
    assert nodeproc.nbdkit_command("p.py", [("role", "secondary")], listen)[:2] == ["nbdkit", "-f"]
    assert capsys.readouterr().err == (
        f"repdisk: warning: {tmp_path}/none.so is missing (run make setup): without it a client "
        "that hangs up during I/O can abort the node (nbdkit 1.32, docs/failure-matrix.md)\n")
