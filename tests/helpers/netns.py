"""Several hosts on one machine, for tests: network namespaces joined by veth pairs.

    with Net() as net:
        pri, sec = net.host("pri"), net.host("sec")
        link = net.link(pri, sec)          # pri 10.213.1.1/24 <-> sec 10.213.1.2/24
        proc = subprocess.Popen(sec.cmd(["nbdkit", ...]))   # runs inside sec
        value = pri.call(fn, arg)          # fn runs on a thread inside pri's namespace
        link.cut(); link.heal()

Every namespace is named ``repdisk-test-<random>-<host>``, has its loopback up and no
route but its links' own /24 (no default route), so nothing a test sends can leave the
namespaces it made.  Addresses are 10.213.<link>.1 and .2: they exist only inside these
namespaces.  :meth:`Net.close` deletes every namespace (their veths go with them), also
when a test fails; processes started inside should be killed by the test's own fixtures
first (a namespace lingers, unnamed, while a process still runs in it).

``call`` enters a namespace on a fresh thread with setns(2), which switches only that
thread's network namespace: sockets it creates (libnbd handles, probes) belong to that
namespace for good and may then be used from any thread.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLONE_NEWNET = 0x40000000
SUBNET = "10.213"


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    probe = f"repdisk-test-{secrets.token_hex(3)}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One namespace: a "host" with its own network stack."""
    ns: str
    name: str
    addresses: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.addresses[0]

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this namespace (ip netns exec execs it: the pid is argv's)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on a new thread inside this namespace; return its result or raise."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                _enter(self.ns)
                result["value"] = fn(*args, **kwargs)
            except BaseException as err:  # handed to the caller below
                result["error"] = err

        t = threading.Thread(target=run, name=f"netns-{self.name}")
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result.get("value")


def _enter(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Link:
    """A veth pair between two hosts; ``cut`` takes both ends down, ``heal`` brings them up."""
    a: Host
    b: Host
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str

    def cut(self) -> None:
        _ip("-n", self.a.ns, "link", "set", self.dev_a, "down")
        _ip("-n", self.b.ns, "link", "set", self.dev_b, "down")

    def heal(self) -> None:
        _ip("-n", self.a.ns, "link", "set", self.dev_a, "up")
        _ip("-n", self.b.ns, "link", "set", self.dev_b, "up")


class Net:
    """The namespaces and links of one test; ``close`` removes them all."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.hosts: list[Host] = []
        self.links: list[Link] = []

    def host(self, name: str) -> Host:
        ns = f"repdisk-test-{self.tag}-{name}"
        _ip("netns", "add", ns)
        host = Host(ns, name)
        self.hosts.append(host)
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def link(self, a: Host, b: Host) -> Link:
        n = len(self.links) + 1
        dev_a, dev_b = f"rd{self.tag}{n}a", f"rd{self.tag}{n}b"   # at most 15 characters
        addr_a, addr_b = f"{SUBNET}.{n}.1", f"{SUBNET}.{n}.2"
        # Created inside a's namespace, so the pair never appears in the caller's one.
        _ip("-n", a.ns, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
            "netns", b.ns)
        for host, dev, addr in ((a, dev_a, addr_a), (b, dev_b, addr_b)):
            _ip("-n", host.ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", host.ns, "link", "set", dev, "up")
            host.addresses.append(addr)
        link = Link(a, b, dev_a, dev_b, addr_a, addr_b)
        self.links.append(link)
        return link

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        self.hosts.clear()

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a switch: every host on one /24 --------------------------------------------------------

@dataclass
class Port:
    """A host's cable to the switch; ``cut`` pulls it (the switch end goes down), ``heal``
    plugs it back."""
    net: Net
    switch_ns: str
    dev: str
    host: Host

    def cut(self) -> None:
        _ip("-n", self.switch_ns, "link", "set", self.dev, "down")

    def heal(self) -> None:
        _ip("-n", self.switch_ns, "link", "set", self.dev, "up")


def switch(net: Net, hosts: list[Host], subnet: int = 100) -> dict[str, Port]:
    """Join ``hosts`` through a bridge in a namespace of its own: host i (from 1) gets
    10.213.<subnet>.<i>/24 (the reach corosync's knet needs: every node sees every other
    on one address).  Returns each host's port by host name."""
    sw = net.host(f"sw{subnet}")
    _ip("-n", sw.ns, "link", "add", "br0", "type", "bridge")
    _ip("-n", sw.ns, "link", "set", "br0", "up")
    ports = {}
    for i, host in enumerate(hosts, 1):
        dev, peer = f"rd{net.tag}s{i}", f"rd{net.tag}h{i}"
        _ip("-n", sw.ns, "link", "add", dev, "type", "veth", "peer", "name", peer,
            "netns", host.ns)
        _ip("-n", sw.ns, "link", "set", dev, "master", "br0")
        _ip("-n", sw.ns, "link", "set", dev, "up")
        addr = f"{SUBNET}.{subnet}.{i}"
        _ip("-n", host.ns, "addr", "add", f"{addr}/24", "dev", peer)
        _ip("-n", host.ns, "link", "set", peer, "up")
        host.addresses.append(addr)
        ports[host.name] = Port(net, sw.ns, dev, host)
    return ports
