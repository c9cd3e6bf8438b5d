"""Real Corosync (knet) + Pacemaker clusters on one machine, for the agent's tests.

Each cluster node is a network namespace (tests/helpers/netns.py, all nodes on one switch) plus a
mount and UTS namespace of its own, held by an ``init`` process (``sleep``) in which:
``/run`` and ``/dev/shm`` are private tmpfs (libqb's IPC), the node's own folders are bound
over ``/etc/corosync``, ``/var/lib/corosync``, ``/var/lib/pacemaker``, ``/var/log/...`` and
``/var/lib/repdisk`` (its disks: the same path on every node, different files), and
overlays add the test fence agent to ``/usr/sbin`` and this clone's agent to
``/usr/lib/ocf/resource.d/repdisk`` (another clone's ``make setup`` may own the host's
link).  corosync and pacemakerd run there with ``nsenter``; every cluster tool too
(:meth:`ClusterNode.run`: libqb's sockets are abstract, so per network namespace).

A power cut SIGKILLs every process of the node's mount namespace (the node's folders stay:
its disk survives, ``/run`` does not); ``boot`` brings it back.  The fence agent
``fence_repdisktest`` does the same to the node it is asked to fence, and writes to the
timeline.  The timeline (``timeline.txt``: fence, promote, first write served, ...) and
every log stay in the cluster's folder, the test's evidence.

Facts this rests on: ../../shared/reference/pacemaker-on-one-host.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from tests.helpers.netns import Host, Net, Port, switch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Binds inside a node: its folder's subfolder -> the path it covers.
BINDS = {"etc-corosync": "/etc/corosync", "var-lib-corosync": "/var/lib/corosync",
         "var-lib-pacemaker": "/var/lib/pacemaker", "log-pacemaker": "/var/log/pacemaker",
         "log-corosync": "/var/log/corosync", "repdisk": "/var/lib/repdisk"}
HACLUSTER = ("var-lib-pacemaker", "log-pacemaker")

SETUP = r"""
set -e
hostname "$1"
mount --make-rprivate /
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mkdir -p /run/crm /run/resource-agents
chown hacluster:haclient /run/crm && chmod 750 /run/crm
shift
while [ "$#" -gt 2 ]; do mkdir -p "$2"; mount --bind "$1" "$2"; shift 2; done
mount -t overlay overlay -o "lowerdir=$1:/usr/sbin" /usr/sbin
mkdir -p /usr/lib/ocf/resource.d
mount -t overlay overlay -o "lowerdir=$2:/usr/lib/ocf/resource.d" /usr/lib/ocf/resource.d
echo ready
exec sleep infinity
"""

FENCE_AGENT = r'''#!/usr/bin/python3
"""fence_repdisktest: "power-cuts" a test cluster node: SIGKILL of every process in its
mount namespace (tests/helpers/cluster.py).  Reads key=value lines on stdin, as fence agents do."""
import os, signal, sys, time
NODES = {nodes!r}           # node name -> file holding its mount namespace (readlink)
TIMELINE = {timeline!r}
args = dict(l.strip().split("=", 1) for l in sys.stdin if "=" in l)
for a in sys.argv[1:]:
    if a.startswith("-o"):
        args["action"] = a[2:] or args.get("action", "")
action = args.get("action", args.get("option", "monitor"))
node = args.get("port") or args.get("plug") or args.get("nodename", "")
if action == "metadata":
    print("""<?xml version="1.0" ?>
<resource-agent name="fence_repdisktest" shortdesc="power-cut a repdisk test node">
<longdesc>SIGKILLs every process of a test cluster node.</longdesc>
<parameters>
<parameter name="action" unique="0" required="1"><getopt mixed="-o"/><content type="string" default="reboot"/><shortdesc lang="en">action</shortdesc></parameter>
<parameter name="port" unique="0" required="0"><getopt mixed="-n"/><content type="string"/><shortdesc lang="en">node</shortdesc></parameter>
<parameter name="plug" unique="0" required="0"><getopt mixed="-n"/><content type="string"/><shortdesc lang="en">node</shortdesc></parameter>
</parameters>
<actions><action name="on"/><action name="off"/><action name="reboot"/><action name="status"/><action name="list"/><action name="monitor"/><action name="metadata"/></actions>
</resource-agent>""")
    sys.exit(0)
if action in ("monitor", "list"):
    print("\n".join(NODES))
    sys.exit(0)
def ns_of(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
def procs(ns):
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{{pid}}/ns/mnt") == ns:
                    out.append(int(pid))
            except OSError:
                pass
    return out
ns = ns_of(NODES.get(node, "/nonexistent"))
if action == "status":
    sys.exit(0 if ns and procs(ns) else 2)
if action in ("off", "reboot"):
    if ns:
        for pid in procs(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    with open(TIMELINE, "a") as f:
        f.write(f"{{time.time():.3f}} fence {{node}} ({{action}}, by {{os.uname().nodename}})\n")
    sys.exit(0)
sys.exit(0)
'''  # noqa: E501 (the agent's metadata XML, one element a line)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@dataclass
class ClusterNode:
    cluster: Cluster
    name: str
    nodeid: int
    host: Host
    port: Port | None = None
    folder: str = ""
    init: subprocess.Popen | None = None
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.host.addresses[0]

    def path(self, inside: str) -> str:
        """The host's path of a file the node sees at ``inside`` (under a bound folder)."""
        for sub, where in BINDS.items():
            if inside == where or inside.startswith(where + "/"):
                return os.path.join(self.folder, sub) + inside[len(where):]
        raise ValueError(f"{inside} is not under a node folder")

    @property
    def mnt_ns(self) -> str:
        assert self.init is not None
        return os.readlink(f"/proc/{self.init.pid}/ns/mnt")

    def enter(self, argv: list[str]) -> list[str]:
        assert self.init is not None and self.init.poll() is None, f"{self.name} is down"
        return ["nsenter", "-t", str(self.init.pid), "-m", "-n", "-u", "--", *argv]

    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = _run(self.enter(argv), timeout=timeout, env=env)
        if check and done.returncode:
            raise RuntimeError(f"{self.name}: {' '.join(argv)} -> {done.returncode}: "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done

    def boot(self) -> None:
        """Mount namespace, corosync, pacemakerd (the node's folders as they are)."""
        binds = []
        for sub, where in BINDS.items():
            binds += [os.path.join(self.folder, sub), where]
        self.init = subprocess.Popen(
            self.host.cmd(["unshare", "--mount", "--uts", "--propagation", "private", "--",
                           "sh", "-c", SETUP, "sh", self.name, *binds,
                           self.cluster.fence_dir, self.cluster.ocf_dir]),
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(self.folder, "init.log"), "ab"),  # noqa: SIM115 (the child's)
            text=True)
        assert self.init.stdout is not None
        line = self.init.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{self.name}: namespace set-up failed, see "
                               f"{self.folder}/init.log")
        with open(self.cluster.ns_file(self.name), "w") as f:
            f.write(self.mnt_ns)
        env = {**os.environ, "PCMK_logfile": "/var/log/pacemaker/pacemaker.log"}
        log = open(os.path.join(self.folder, "daemons.log"), "ab")  # noqa: SIM115 (the daemons')
        self.daemons = [subprocess.Popen(self.enter(["corosync", "-f"]), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=env)]
        self._wait(lambda: self.run(["corosync-cfgtool", "-s"], check=False).returncode == 0,
                   20, "corosync")
        self.daemons.append(subprocess.Popen(self.enter(["pacemakerd"]), stdout=log,
                                             stderr=log, stdin=subprocess.DEVNULL, env=env))
        self.cluster.note(f"boot {self.name}")

    def _wait(self, ok: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {what} did not come up within {timeout}s")

    def processes(self) -> list[psutil.Process]:
        ns = self.mnt_ns
        out = []
        for p in psutil.process_iter():
            try:
                if os.readlink(f"/proc/{p.pid}/ns/mnt") == ns:
                    out.append(p)
            except OSError:
                pass
        return out

    def power_cut(self) -> None:
        """SIGKILL every process of the node at once (its disk stays as it was); returns
        once they are gone, as after a real power cut (a killed process takes a moment)."""
        if self.init is None or self.init.poll() is not None:
            return
        killed = self.processes()
        for p in killed:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(killed, timeout=10)
        self.reap()
        self.cluster.note(f"power cut {self.name}")

    def reap(self) -> None:
        for proc in [self.init, *self.daemons]:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    @property
    def up(self) -> bool:
        return self.init is not None and self.init.poll() is None

    def freeze(self, names: tuple[str, ...]) -> None:
        """SIGSTOP the node's processes whose name starts with one of ``names``."""
        for p in self.processes():
            try:
                if p.name().startswith(names):
                    p.send_signal(signal.SIGSTOP)
            except psutil.Error:
                pass
        self.cluster.note(f"freeze {self.name} ({', '.join(names)})")


class Cluster:
    """``n`` nodes n1..nN on one switch, seeded with ``options`` (cluster properties)."""

    def __init__(self, net: Net, folder: str, n: int, token_ms: int | None = None,
                 options: dict[str, str] | None = None) -> None:
        self.net = net
        self.folder = folder
        self.t0 = time.time()
        self.timeline = os.path.join(folder, "timeline.txt")
        self.fence_dir = os.path.join(folder, "fence")
        self.ocf_dir = os.path.join(folder, "ocf")
        hosts = [net.host(f"n{i}") for i in range(1, n + 1)]
        ports = switch(net, hosts)
        self.nodes = [ClusterNode(self, h.name, i, h, ports[h.name],
                                  os.path.join(folder, h.name))
                      for i, h in enumerate(hosts, 1)]
        self.token_ms = token_ms
        self.options = {"dc-deadtime": "2s", "stonith-enabled": "true",
                        "no-quorum-policy": "stop", **(options or {})}
        self._prepare()

    def ns_file(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.mntns")

    def note(self, what: str) -> None:
        with open(self.timeline, "a") as f:
            f.write(f"{time.time():.3f} {what}\n")

    def timeline_text(self) -> str:
        try:
            with open(self.timeline) as f:
                lines = f.read().splitlines()
        except OSError:
            return "(no timeline)"
        rows = sorted((float(ln.split(" ", 1)[0]), ln.split(" ", 1)[1]) for ln in lines if ln)
        return "\n".join(f"{t - self.t0:8.3f}s  {what}" for t, what in rows)

    def _prepare(self) -> None:
        os.makedirs(self.fence_dir)
        agent = os.path.join(self.fence_dir, "fence_repdisktest")
        with open(agent, "w") as f:
            f.write(FENCE_AGENT.format(nodes={n.name: self.ns_file(n.name) for n in self.nodes},
                                       timeline=self.timeline))
        os.chmod(agent, 0o755)
        os.makedirs(os.path.join(self.ocf_dir, "repdisk"))
        # Written as make setup writes it: it runs this clone's ocf/repdisk and venv.
        subprocess.run([os.path.join(REPO, "ocf", "install"),
                        os.path.join(self.ocf_dir, "repdisk")], check=True)
        for node in self.nodes:
            for sub in BINDS:
                os.makedirs(os.path.join(node.folder, sub))
            for sub in ("cib", "pengine", "blackbox", "cores"):
                os.makedirs(os.path.join(node.folder, "var-lib-pacemaker", sub))
            with open(os.path.join(node.folder, "etc-corosync", "corosync.conf"), "w") as f:
                f.write(self._corosync_conf())
            cib = os.path.join(node.folder, "var-lib-pacemaker", "cib", "cib.xml")
            with open(cib, "w") as f:
                f.write(self._cib())
            for sub in HACLUSTER:
                _run(["chown", "-R", "hacluster:haclient", os.path.join(node.folder, sub)])
                _run(["chmod", "-R", "u+rwX,g+rX,o-rwx", os.path.join(node.folder, sub)])

    def _corosync_conf(self) -> str:
        nodes = "".join(f"  node {{\n    name: {n.name}\n    nodeid: {n.nodeid}\n"
                        f"    ring0_addr: {n.address}\n  }}\n" for n in self.nodes)
        token = f"  token: {self.token_ms}\n" if self.token_ms else ""
        two = "  two_node: 1\n" if len(self.nodes) == 2 else ""
        return (f"totem {{\n  version: 2\n  cluster_name: rdtest\n  transport: knet\n"
                f"  crypto_cipher: none\n  crypto_hash: none\n{token}}}\n"
                f"quorum {{\n  provider: corosync_votequorum\n{two}}}\n"
                f"nodelist {{\n{nodes}}}\n"
                "logging {\n  to_logfile: yes\n  logfile: /var/log/corosync/corosync.log\n"
                "  to_syslog: no\n  to_stderr: no\n  timestamp: on\n}\n")

    def _cib(self) -> str:
        opts = "".join(f'<nvpair id="opt-{k}" name="{k}" value="{v}"/>'
                       for k, v in self.options.items())
        return ('<cib validate-with="pacemaker-3.9" epoch="1" '
                'num_updates="0" admin_epoch="0"><configuration><crm_config>'
                f'<cluster_property_set id="cib-bootstrap-options">{opts}'
                '</cluster_property_set></crm_config><nodes/><resources/><constraints/>'
                '</configuration><status/></cib>\n')

    def boot(self) -> None:
        for node in self.nodes:
            node.boot()
        self.wait(lambda: self.online() == {n.name for n in self.nodes}, 60,
                  "every node online with a DC")
        self.note("cluster formed")

    def online(self, via: ClusterNode | None = None) -> set[str]:
        node = via or next(n for n in self.nodes if n.up)
        out = node.run(["crm_mon", "-1", "--output-as=xml"], check=False).stdout
        import xml.etree.ElementTree as ET
        try:
            root = ET.fromstring(out)
        except ET.ParseError:
            return set()
        if root.find(".//current_dc[@present='true']") is None:
            return set()
        return {n.get("name", "") for n in root.iter("node") if n.get("online") == "true"}

    def wait(self, ok: Callable[[], bool], timeout: float, what: str) -> float:
        """Wait until ``ok()``; the time it took.  Raises with the timeline on timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if ok():
                    return time.monotonic() - t0
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)
        raise AssertionError(f"not within {timeout}s: {what}\ntimeline:\n{self.timeline_text()}")

    def close(self) -> None:
        for node in self.nodes:
            if node.up:
                for p in node.processes():
                    try:
                        p.send_signal(signal.SIGCONT)
                        p.kill()
                    except psutil.Error:
                        pass
                node.reap()
