"""Two hosts on one machine: a primary and a secondary in their own network namespaces,
replicating over TCP with TLS (PSK) across a veth pair, and what a cut of that link does.

Every address used (10.213.1.1, 10.213.1.2) exists only inside the namespaces the test
made; the guest and the control sockets are Unix sockets (a filesystem path reaches into
a namespace; no network traffic is involved).  The controller in its own namespace
(isolating the primary from both others, fencing) is in test_netns_controller.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import nbd
import pytest

from repdisk import tls
from repdisk.cli import nodeproc
from repdisk.tls import TLSSpec
from tests.helpers.netns import Net
from tests.helpers.nodes import (
    MiB,
    Nodes,
    checkpoint,
    make_disk,
    random_bytes,
    read_all,
    read_file,
    start_node,
)

pytestmark = pytest.mark.netns

SIZE = 4 * MiB
PORT = 10809
TIMEOUT = 1.0   # the primary's timeout: how long the secondary may take before it degrades


@pytest.fixture
def pair(net: Net, nodes: Nodes) -> Iterator[dict[str, Any]]:
    """Secondary in "sec" listening on 10.213.1.2 with TLS (PSK), primary in "pri"."""
    pri_host, sec_host = net.host("pri"), net.host("sec")
    link = net.link(pri_host, sec_host)
    psk = os.path.join(nodes.folder, "pair.psk")
    tls.make_psk(psk)
    sec_disk = make_disk(os.path.join(nodes.folder, "sec.img"), SIZE)
    pri_disk = make_disk(os.path.join(nodes.folder, "pri.img"), SIZE)
    listen = nodeproc.Listen(port=PORT, address=link.addr_b, tls=TLSSpec("psk", psk))
    sec = start_node(nodes, "secondary", "sec", [("disk", sec_disk)], listen, sec_host)
    sec.ctl("replication-start", mode="secondary")
    pri = start_node(nodes, "primary", "pri",
                     [("disk", pri_disk), ("secondary", listen.uri("replica")),
                      ("secondary-tls", f"psk:{psk}"), ("timeout", f"{TIMEOUT}s")],
                     nodeproc.Listen(socket=os.path.join(nodes.folder, "pri.sock")), pri_host)
    pri.ctl("replication-start", mode="primary")
    try:
        yield {"pri": pri, "sec": sec, "link": link, "listen": listen, "psk": psk,
               "sec_host": sec_host, "pri_host": pri_host}
    finally:
        nodes.close()          # every process out of the namespaces before they are deleted


def write_all(h: nbd.NBD, data: bytes, base: int = 0, step: int = 256 * 1024) -> None:
    for off in range(0, len(data), step):
        h.pwrite(data[off:off + step], base + off)


def test_addresses_exist_only_inside_the_namespaces(pair: dict[str, Any]) -> None:
    here = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert "10.213." not in here
    inside = subprocess.run(pair["sec_host"].cmd(["ip", "-o", "route"]), capture_output=True,
                            text=True).stdout
    assert "default" not in inside and "10.213.1.0/24" in inside


def test_pair_across_namespaces_replicates_checkpoints_and_fails_over(
        pair: dict[str, Any]) -> None:
    pri, sec = pair["pri"], pair["sec"]
    h = pri.client()
    at_checkpoint = random_bytes(1, SIZE)
    write_all(h, at_checkpoint)
    h.flush()
    assert read_file(sec.disks[0]) == at_checkpoint          # every byte, through TLS
    checkpoint(pri, sec)
    h.pwrite(b"\xee" * 65536, 3 * 65536)                      # after the checkpoint
    h.flush()
    h.shutdown()
    assert read_file(sec.disks[0]) == read_file(pri.disks[0])
    sec.ctl("replication-stop", failover=True)               # the primary is "lost"
    uri = TLSSpec("psk", pair["psk"]).client_uri("t", pair["listen"].uri("active"))
    # The secondary's export is reachable only inside its namespace (and only with the key).
    active = pair["sec_host"].call(_read_uri, uri)
    assert active == at_checkpoint


def _read_uri(uri: str) -> bytes:
    h = nbd.NBD()
    tls.prepare_client(h, uri)
    h.connect_uri(uri)
    try:
        return read_all(h)
    finally:
        h.shutdown()


def test_cut_link_degrades_within_timeout_without_failing_writes_and_resync_heals(
        pair: dict[str, Any]) -> None:
    pri, sec, link = pair["pri"], pair["sec"], pair["link"]
    h = pri.client()
    write_all(h, random_bytes(2, SIZE))
    checkpoint(pri, sec)
    link.cut()
    t0 = time.monotonic()
    h.pwrite(b"\x11" * 4096, 0)                   # waits for the secondary, at most TIMEOUT
    first = time.monotonic() - t0
    for i in range(1, 64):                         # degraded: local only, all succeed
        h.pwrite(bytes([i]) * 8192, i * 40000)
    h.flush()
    q = pri.ctl("query-replication")["disks"][0]
    assert TIMEOUT * 0.5 <= first < TIMEOUT + 1.5, first
    assert q["degraded"] and q["dirty_bytes"] > 0 and q["stage"] == "running"
    assert "did not acknowledge" in q["error"] or "closed" in q["error"], q["error"]
    with pytest.raises(Exception, match="dirty"):
        pri.ctl("replication-do-checkpoint")       # never replace a good checkpoint
    link.heal()
    sent = pri.ctl("replication-resync")["bytes"]
    assert sent >= 63 * 8192
    checkpoint(pri, sec)
    h.pwrite(b"\x22" * 4096, 8192)
    h.flush()
    h.shutdown()
    q = pri.ctl("query-replication")["disks"][0]
    assert not q["degraded"] and q["dirty_bytes"] == 0
    assert read_file(sec.disks[0]) == read_file(pri.disks[0])
