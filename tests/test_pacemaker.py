"""repdisk under a real Corosync (knet) + Pacemaker cluster, with fencing (issue 17).

Two clusters on this machine (tests/helpers/cluster.py): nodes n1, n2 (and n3, quorum only), each
in its own network and mount namespaces, configured with the README's "Running under
Pacemaker" blocks word for word, fenced by a test agent that power-cuts a node.  The
guest is a libnbd client inside the primary's namespace; every scenario compares bytes of
the nodes' disk files, not only states.  A failing scenario's report carries the cluster's
timeline (boot, power cut, fence, promoted, first write served, ...) and its folder.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers.cluster import ClusterNode
from tests.helpers.pacemaker import RUN, SIZE, WRITER_AREA, Pair, Writer, make_pair

pytestmark = pytest.mark.timeout(300)   # a cluster's boot is part of its first test

MiB = 1 << 20
@pytest.fixture(scope="module")
def pair2() -> Iterator[Pair]:
    yield from make_pair(2)


@pytest.fixture
def cluster_pair(request, pair2: Pair) -> Pair:
    """pair2, with its timeline in the report of a test that fails."""
    request.node.repdisk_cluster = pair2.cluster
    return pair2


def promoted_at(node: ClusterNode) -> float:
    """When the agent on ``node`` began its last (successful) promotion: its log,
    RUN/rd.agent.log."""
    def read() -> list[str]:
        with open(node.path(f"{RUN}/rd.agent.log"), errors="replace") as f:
            return f.read().splitlines()
    node.cluster.wait(lambda: any(" promoted (epoch " in line for line in read()), 30,
                      f"{node.name}'s agent logging its promotion")
    lines = read()
    done = [i for i, line in enumerate(lines) if " promoted (epoch " in line]
    began = [line for line in lines[:done[-1]] if line.endswith(" promoting")]
    return float(began[-1].split()[2])


# -- the scenarios --------------------------------------------------------------------------

def test_1_pair_forms_promotes_checkpoints_and_serves_writes(cluster_pair: Pair) -> None:
    pair = cluster_pair
    p, s = pair.wait_healthy()
    pair.note(f"healthy: primary {p.name}")
    data = random.Random(1).randbytes(2 * MiB)
    pair.write(p, data, 0)
    t0 = time.monotonic()
    pair.wait_checkpoints(s, 2)
    took = time.monotonic() - t0
    assert took < 15, f"two checkpoints took {took:.1f}s at a 2s interval"
    assert pair.disk(p)[:2 * MiB] == data
    assert pair.disk(p) == pair.disk(s)
    mon = p.run(["crm_mon", "-1"]).stdout
    assert re.search(rf"Promoted: \[ {p.name} \]", mon), mon
    assert re.search(rf"Unpromoted: \[ {s.name} \]", mon), mon
    print("\n" + mon)
    cluster_cpu, agent_cpu, repdisk_cpu = idle_cpu(pair, 6.0)
    print(f"\nidle CPU per node, % of one CPU: corosync+pacemaker {cluster_cpu:.1f}, "
          f"agent monitors (2 s/3 s) {agent_cpu:.1f}, repdisk node + checkpointer "
          f"(2 s checkpoints) {repdisk_cpu:.1f}")
    assert cluster_cpu + agent_cpu + repdisk_cpu < 50


def idle_cpu(pair: Pair, seconds: float) -> tuple[float, float, float]:
    """CPU over ``seconds`` of an idle guest, per node, in % of one CPU: the cluster stack
    (corosync, pacemaker daemons), the agent's runs (monitors: children reaped by
    pacemaker-execd) and repdisk's long-running processes (node, checkpointer).  Only
    processes alive at both ends count (an agent run is in pacemaker-execd's children)."""
    def sample() -> dict[tuple[int, float], tuple[str, float]]:
        out = {}
        for node in pair.pair:
            for proc in node.processes():
                try:
                    name, t, born = proc.name(), proc.cpu_times(), proc.create_time()
                except psutil.Error:
                    continue
                if name.startswith(("corosync", "pacemaker")):
                    out[(proc.pid, born)] = ("cluster", t.user + t.system)
                    if name == "pacemaker-execd":
                        out[(-proc.pid, born)] = ("agent", t.children_user + t.children_system)
                elif name.startswith("nbdkit") or "controller" in " ".join(proc.cmdline()):
                    out[(proc.pid, born)] = ("repdisk", t.user + t.system)
        return out
    a = sample()
    time.sleep(seconds)
    b = sample()
    total = {"cluster": 0.0, "agent": 0.0, "repdisk": 0.0}
    for key, (kind, used) in b.items():
        if key in a:
            total[kind] += used - a[key][1]
    per = 100 / seconds / len(pair.pair)
    return total["cluster"] * per, total["agent"] * per, total["repdisk"] * per


def test_2_power_cut_primary_is_fenced_survivor_promoted_at_last_checkpoint(
        cluster_pair: Pair) -> None:
    pair = cluster_pair
    p, s = pair.wait_healthy()
    pair.write(p, random.Random(2).randbytes(MiB), 2 * MiB)
    pair.wait_checkpoints(s, 2)
    at_checkpoint = pair.disk(p)
    pair.checkpointer(p).send_signal(signal.SIGSTOP)   # no checkpoint after this one
    pair.write(p, b"\xee" * MiB, 4 * MiB)               # acknowledged, after the checkpoint
    assert pair.disk(p)[4 * MiB:5 * MiB] == b"\xee" * MiB
    p.power_cut()
    took = pair.wait_serving(s, 6 * MiB, b"\x5a" * 4096)
    pair.note(f"power cut -> {s.name} serving writes: {took:.1f}s")
    print(f"\npower cut -> survivor serving writes (default timings): {took:.1f} s")
    fenced = Path(pair.cluster.timeline).read_text()
    assert f"fence {p.name}" in fenced, pair.cluster.timeline_text()
    got = pair.disk(s)
    expected = at_checkpoint[:6 * MiB] + b"\x5a" * 4096 + at_checkpoint[6 * MiB + 4096:]
    assert got == expected, "the survivor's disk is not the last checkpoint"
    assert pair.roles()[s.name] == "primary"
    assert took < 30


def test_3_old_primary_rejoins_unpromoted_and_is_resynced(cluster_pair: Pair) -> None:
    pair = cluster_pair
    down = [n for n in pair.pair if not n.up]
    assert down, "scenario 2 left no node down"
    old = down[0]
    old.boot()
    p, s = pair.wait_healthy(120)
    assert s is old, f"{old.name} came back as {pair.roles()}"
    pair.write(p, b"\x3c" * 65536, 8 * MiB)
    pair.wait_checkpoints(s, 2)
    assert pair.disk(p) == pair.disk(s)
    assert pair.disk(s)[4 * MiB:5 * MiB] != b"\xee" * MiB   # the rolled-back write is gone


def test_4_planned_move_loses_nothing_and_copies_nothing(cluster_pair: Pair) -> None:
    pair = cluster_pair
    p, s = pair.wait_healthy()
    before = pair.disk(p)
    writer = Writer(pair, p, seed=4).start()
    time.sleep(1.0)
    pair.note(f"move to {s.name}")
    p.run(["crm_resource", "--move", "--resource", "rd-clone", "--promoted", "--node", s.name])
    try:
        pair.cluster.wait(lambda: any(a[1] == s.name for a in writer.acked), 60,
                          f"the writer served by {s.name}")
        time.sleep(0.5)
    finally:
        writer.stop()
        p.run(["crm_resource", "--clear", "--resource", "rd-clone"])
    on_old = [a for a in writer.acked if a[1] == p.name]
    on_new = [a for a in writer.acked if a[1] == s.name]
    assert on_old and on_new
    pause = on_new[0][0] - on_old[-1][0]
    pair.note(f"planned move: guest-visible pause {pause:.2f}s")
    print(f"\nplanned move: guest-visible pause {pause:.2f} s "
          f"({len(on_old)} writes before, {len(on_new)} after)")
    new_p, new_s = pair.wait_healthy()
    assert new_p is s and new_s is p
    pair.wait_checkpoints(new_s, 1)
    got = pair.disk(s)
    for _, _, offset, data in writer.acked:      # every acknowledged write, both sides of it
        assert got[offset:offset + 4096] == data, f"acknowledged write at {offset} lost"
    assert got[:WRITER_AREA] == before[:WRITER_AREA]
    assert pair.disk(p) == got
    # Nothing copied but what changed: the old primary, now the secondary, received the new
    # primary's guest writes only (forwarded, or, for those made before its replication
    # started, copied from its dirty map in 64 KiB granules), not the disk.
    q = pair.query(p)
    assert q is not None
    granules = {a[2] // 65536 for a in on_new}
    received = q["disks"][0]["counters"]["replica_bytes"]
    assert 4096 * len(on_new) <= received <= 4096 * len(on_new) + 65536 * len(granules)
    print(f"planned move: the new secondary received {received} bytes for "
          f"{len(on_new)} new 4 KiB writes (disk {SIZE})")


def test_6_frozen_primary_is_fenced_not_waited_for(cluster_pair: Pair) -> None:
    pair = cluster_pair
    p, s = pair.wait_healthy()
    pair.write(p, b"\x61" * 65536, 10 * MiB)
    pair.wait_checkpoints(s, 2)
    p.freeze(("corosync", "nbdkit"))
    took = pair.wait_serving(s, 11 * MiB, b"\x62" * 4096)
    print(f"\nfrozen primary -> survivor serving writes: {took:.1f} s")
    assert f"fence {p.name}" in Path(pair.cluster.timeline).read_text()
    assert not p.up or not any(pr.status() != psutil.STATUS_ZOMBIE for pr in p.processes())
    assert pair.disk(s)[10 * MiB:10 * MiB + 65536] == b"\x61" * 65536
    assert took < 30
    p.reap()
    p.boot()
    pair.wait_healthy(120)


def test_7_a_second_promotion_of_a_healthy_pair_is_refused(cluster_pair: Pair) -> None:
    """An operator's --force-promote of the secondary (as promoted-max=2 would do) while the
    primary serves: the agent refuses, so there is never a second writer, and the primary
    goes on acknowledging writes that the secondary receives."""
    pair = cluster_pair
    p, s = pair.wait_healthy()
    done = s.run(["crm_resource", "--force-promote", "--resource", "rd"], check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert f"promotion refused: the peer {p.name} answers as a running primary" in out, out
    q = pair.query(s)
    assert q is not None and q["role"] == "secondary", q
    pair.write(p, b"\x71" * 65536, 12 * MiB)
    pair.wait_checkpoints(s, 1)
    assert pair.disk(s)[12 * MiB:12 * MiB + 65536] == b"\x71" * 65536
    assert pair.wait_healthy() == (p, s)


# -- three nodes: a partition ----------------------------------------------------------------

TUNED_TOKEN_MS = 1000


@pytest.fixture(scope="module")
def pair3() -> Iterator[Pair]:
    """n1, n2 (the pair) and n3 (quorum only), corosync's token tuned to 1 s."""
    yield from make_pair(3, token_ms=TUNED_TOKEN_MS)


@pytest.fixture
def cluster_trio(request, pair3: Pair) -> Pair:
    request.node.repdisk_cluster = pair3.cluster
    return pair3


def writer_blocks_untouched(image: bytes, writer: Writer) -> bool:
    """None of the writer's blocks holds what it wrote (they were zeros before)."""
    return all(image[offset:offset + 4096] != data for _, _, offset, data in writer.acked)


def test_5_isolated_primary_loses_quorum_is_fenced_and_rejoins(cluster_trio: Pair) -> None:
    pair = cluster_trio
    p, s = pair.wait_healthy(120)
    pair.write(p, random.Random(5).randbytes(MiB), 12 * MiB)
    pair.wait_checkpoints(s, 2)
    pair.checkpointer(p).send_signal(signal.SIGSTOP)   # no checkpoint from here on
    at_checkpoint = pair.disk(p)
    writer = Writer(pair, p, seed=55, follow=False).start()
    pair.cluster.wait(lambda: len(writer.acked) >= 3, 30, "writes served before the cut")
    assert port_of(pair, p) is not None
    pair.note(f"cut {p.name} off from both others")
    port_of(pair, p).cut()
    took = pair.wait_serving(s, 13 * MiB, b"\x5c" * 4096)
    print(f"\nisolated primary -> majority serving writes (token {TUNED_TOKEN_MS} ms): "
          f"{took:.1f} s")
    writer.stop()
    promoted = promoted_at(s)
    pair.note(f"{s.name} promoted (its log)")
    timeline = Path(pair.cluster.timeline).read_text()
    assert f"fence {p.name}" in timeline, pair.cluster.timeline_text()
    fenced_at = float(next(line for line in timeline.splitlines()
                           if f"fence {p.name}" in line).split()[0])
    assert fenced_at <= promoted + 0.01, "promoted before the old primary was fenced"
    late = [a for a in writer.acked if a[0] > promoted]
    assert not late, f"{len(late)} writes acknowledged by {p.name} after the promotion"
    assert writer.acked, "the writer wrote nothing before the cut"
    got = pair.disk(s)
    assert got[:13 * MiB] == at_checkpoint[:13 * MiB]
    assert got[13 * MiB + 4096:] == at_checkpoint[13 * MiB + 4096:]
    assert writer_blocks_untouched(got, writer)
    # The link returns; the old primary (power-cut by the fence) boots and rejoins.
    port_of(pair, p).heal()
    pair.note("link back")
    assert not p.up or not p.processes()
    p.reap()
    p.boot()
    new_p, new_s = pair.wait_healthy(120)
    assert (new_p, new_s) == (s, p)
    pair.wait_checkpoints(p, 2)
    final = pair.disk(p)
    assert final == pair.disk(s)
    assert writer_blocks_untouched(final, writer)   # survives nowhere


def test_power_cut_with_tuned_timings(cluster_trio: Pair) -> None:
    pair = cluster_trio
    p, s = pair.wait_healthy(120)
    pair.wait_checkpoints(s, 1)
    p.power_cut()
    took = pair.wait_serving(s, 14 * MiB, b"\x7e" * 4096)
    print(f"\npower cut -> survivor serving writes (token {TUNED_TOKEN_MS} ms, 3 nodes): "
          f"{took:.1f} s")
    assert f"fence {p.name}" in Path(pair.cluster.timeline).read_text()
    assert took < 15


def port_of(pair: Pair, node: ClusterNode):
    return node.port
