"""``ocf:repdisk:repdisk``: a promotable OCF 1.1 resource agent, so Pacemaker runs the pair.

    /usr/lib/ocf/resource.d/repdisk/repdisk ACTION   (ocf/repdisk: ``python -m repdisk.cli.ocf``)

Pacemaker decides who is primary; this agent only carries its decisions out on one node
and tells it, through promotion scores, where the newest data is.

* ``start``: the node comes up *unpromoted*: nbdkit with ``role=secondary`` serving NBD on
  this node's address (``nodes``) and control on a TCP port next to it, in stage none.
  The promoted peer's checkpointer starts it as its secondary (in the pair's epoch) and
  resyncs it (dirty regions, or by checksum after a restart).
* ``promote``: a role switch when the primary was demoted cleanly (the node holds a seal:
  nothing rolled back, nothing copied); a failover (commit to the last checkpoint, epoch
  + 1) when the primary is gone; a restarted last primary or a first start takes its disk
  as it is.  Then the node serves the guest and the agent starts its *checkpointer*: the
  repdisk controller in checkpoint-only mode (``--checkpoint-only``: it never fails over;
  Pacemaker does), talking to this node's control socket and the peer's control port.
  Refused for a node that is fenced, inconsistent, or of an older epoch than the cluster's.
* ``demote``: checkpointer stopped, ``replication-demote`` (refuse guest writes, final
  barrier, seal: the peer then holds every acknowledged write).  If the node cannot demote
  cleanly (its secondary is gone) it is restarted unpromoted: its disk keeps everything.
* ``stop``: checkpointer, then the node (SIGTERM).  ``monitor``: 0 unpromoted, 8 promoted,
  7 stopped, 9 failed while promoted (the node died or was fenced while promoted); every
  monitor refreshes the promotion score (:func:`score`).  ``notify``: after a promotion the
  new primary makes sure its checkpointer runs (it starts and resyncs the peer).
  No reload: every parameter but the interval shapes the node process itself.

The pair's epoch is kept in the CIB too (cluster property ``repdisk-RSC-epoch``, set by
each promotion), so a node that slept through a failover knows its data is older even
when its peer is down.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any

from repdisk import detach, units
from repdisk.cli import nodeproc
from repdisk.errors import ConfigError, RepdiskError
from repdisk.node import config
from repdisk.qmp.client import QMPClient
from repdisk.qmp.client import connect as connect_control
from repdisk.tls import TLSSpec

# OCF return codes.
SUCCESS, ERR_GENERIC, ERR_ARGS, ERR_UNIMPLEMENTED, ERR_PERM, ERR_INSTALLED, ERR_CONFIGURED, \
    NOT_RUNNING, RUNNING_PROMOTED, FAILED_PROMOTED = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9

#: Promotion scores (DRBD's tiers): where the newest data is.
SCORE_NEWEST = 10000      # the primary; a sealed, failed-over or current consistent secondary
SCORE_LAST_PRIMARY = 5000 # the pair's last primary, restarted: newest data, peer unknown
SCORE_PEER_UNKNOWN = 1000 # consistent at the pair's epoch, no recent checkpoint from a peer
SCORE_FIRST = 1           # a fresh node of a cluster that never had a primary
#: A secondary's last checkpoint younger than this (plus 3 intervals) means a live primary.
PEER_RECENT = 5.0
UNIX_PATH_MAX = 107


class AgentError(Exception):
    """An action fails with this OCF code and message (logged on stderr)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Param:
    name: str
    short: str
    long: str
    default: str = ""
    required: bool = False
    unique: bool = False
    kind: str = "string"


PARAMS: tuple[Param, ...] = (
    Param("disks", "disks of the consistency group",
          "Space-separated [NAME:]PATH of the node's disks (raw files or block devices), the "
          "same on every node; several disks fail over together.", required=True, unique=True),
    Param("nodes", "cluster node name = address, for each node of the pair",
          "Space-separated NODE=ADDRESS for both nodes of the pair (Pacemaker's node names). "
          "A node serves NBD on ADDRESS:nbd_port (the peer's replica URI is "
          "nbd://ADDRESS:nbd_port/replica, nbds with tls) and control on "
          "ADDRESS:control_port.", required=True),
    Param("nbd_port", "NBD port", "TCP port of each node's NBD server (guest and replica "
          "exports).", "10809", kind="integer"),
    Param("control_port", "control port", "TCP port of each node's control protocol (the "
          "peer's checkpointer uses it).", "10810", kind="integer"),
    Param("control", "control socket", "The node's local control socket (QMP protocol).",
          "/run/repdisk/repdisk.qmp"),
    Param("run_dir", "run directory", "Where the agent keeps the node's pid file, logs and "
          "the checkpointer.", "/run/repdisk"),
    Param("tls", "TLS credentials", "x509:DIR (repdisk tls ca DIR) for the NBD link and the "
          "control port, or off (then insecure=yes is required for addresses off loopback).",
          "off"),
    Param("insecure", "allow plain TCP", "yes: plain, unencrypted NBD and control on the "
          "cluster network (a closed test network only).", "no", kind="boolean"),
    Param("write_mode", "sync or async", "sync: a guest write is acknowledged once on both "
          "nodes; async: once local, then written back (at most max_lag behind).", "sync"),
    Param("max_lag", "async lag bound", "async: most bytes the primary may have acknowledged "
          "but not yet sent to its secondary before guest writes wait (at least 1M).",
          config.default("max-lag")),
    Param("checkpoint_interval", "checkpoint interval", "Seconds between checkpoints (e.g. "
          "5s, 500ms); a failover rolls back to the last one.", "5s"),
    Param("timeout", "node timeout", "How long the secondary may take to answer before the "
          "primary degrades (e.g. 5s).", "5s"),
    Param("isolation_timeout", "isolation timeout", "How long a primary without contact "
          "waits before holding guest writes.", "3s"),
    Param("guest_qmp", "guest QMP socket", "The guest's QMP socket on the promoted node: "
          "stopped and continued around each checkpoint (empty: no pause).", ""),
    Param("freeze", "fsfreeze instead of stop", "yes: freeze the guest's filesystems through "
          "its agent (guest_qmp + .qga) instead of stopping it.", "no", kind="boolean"),
    Param("vm_state", "guest state folder", "Save the stopped guest's state here at each "
          "checkpoint (needs guest_qmp or libvirt_domain).", ""),
    Param("libvirt_domain", "guest libvirt domain", "Instead of guest_qmp: the guest is this "
          "libvirt domain on the promoted node (e.g. an ocf:heartbeat:VirtualDomain), stopped "
          "and continued around each checkpoint through libvirt (empty: no pause).", ""),
    Param("libvirt_uri", "libvirt connection", "The libvirt connection of libvirt_domain.",
          "qemu:///system"),
)
PARAM_BY_NAME = {p.name: p for p in PARAMS}

ACTIONS = (("start", "60s", ""), ("stop", "60s", ""), ("promote", "120s", ""),
           ("demote", "60s", ""), ("notify", "60s", ""),
           ("monitor", "30s", 'interval="10s" role="Promoted"'),
           ("monitor", "30s", 'interval="11s" role="Unpromoted"'),
           ("meta-data", "5s", ""), ("validate-all", "30s", ""))


def meta_data() -> str:
    params = "".join(
        f'  <parameter name="{p.name}" unique="{int(p.unique)}" required="{int(p.required)}">\n'
        f'   <longdesc lang="en">{escape(p.long)}</longdesc>\n'
        f'   <shortdesc lang="en">{escape(p.short)}</shortdesc>\n'
        f'   <content type="{p.kind}" default="{escape(p.default)}"/>\n  </parameter>\n'
        for p in PARAMS)
    actions = "".join(f'  <action name="{name}" timeout="{timeout}"'
                      f'{" " + extra if extra else ""}/>\n' for name, timeout, extra in ACTIONS)
    return f"""<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="repdisk" version="1.0">
 <version>1.1</version>
 <longdesc lang="en">A repdisk pair (a replicated block device for QEMU guests) as a promotable
clone: the promoted instance is the primary that serves the guest, the unpromoted one its
secondary. Promotion is a role switch after a clean demote (nothing lost, nothing copied),
or a failover to the last checkpoint when the primary is gone (fence it first: STONITH).
Promotion scores follow the data: none for an inconsistent, fenced or older-epoch node.
Needs notify=true, promoted-max=1, clone-max=2.</longdesc>
 <shortdesc lang="en">Replicated disk for QEMU guests (repdisk)</shortdesc>
 <parameters>
{params} </parameters>
 <actions>
{actions} </actions>
</resource-agent>
"""


# -- configuration ----------------------------------------------------------------------------

@dataclass
class AgentConfig:
    resource: str
    node: str
    disks: list[config.DiskSpec]
    nodes: dict[str, str]
    nbd_port: int
    control_port: int
    control: str
    run_dir: str
    tls: TLSSpec | None
    insecure: bool
    write_mode: str
    max_lag: int
    interval: str
    timeout: str
    isolation_timeout: str
    guest_qmp: str
    freeze: bool
    vm_state: str
    libvirt_domain: str = ""
    libvirt_uri: str = "qemu:///system"

    @classmethod
    def from_env(cls, env: dict[str, str], local: bool = True) -> AgentConfig:
        """Check every parameter; raise AgentError naming the first wrong one.

        ERR_CONFIGURED for a mistake anywhere (an unknown write mode, a socket path too
        long to exist); ERR_ARGS, with ``local``, for what is wrong on this node only
        (a missing disk, a directory that cannot be made)."""
        def get(name: str) -> str:
            return env.get(f"OCF_RESKEY_{name}", PARAM_BY_NAME[name].default).strip()

        def bad(name: str, why: str, code: int = ERR_CONFIGURED) -> AgentError:
            return AgentError(code, f"parameter {name}: {why}")

        for p in PARAMS:
            if p.required and not get(p.name):
                raise bad(p.name, "is required")
        nodes: dict[str, str] = {}
        for item in get("nodes").split():
            name, sep, addr = item.partition("=")
            if not sep or not name or not addr:
                raise bad("nodes", f"{item!r} is not NODE=ADDRESS")
            nodes[name] = addr
        if len(nodes) != 2:
            raise bad("nodes", f"names {len(nodes)} node{'s' if len(nodes) != 1 else ''}; a "
                               "pair has exactly 2, separated by a space: "
                               "\"n1=ADDRESS n2=ADDRESS\"")
        ports = {}
        for name in ("nbd_port", "control_port"):
            try:
                ports[name] = config.parse_uint(name, get(name))
            except ConfigError as err:
                raise bad(name, _reason(err)) from None
        write_mode = get("write_mode")
        if write_mode not in ("sync", "async"):
            raise bad("write_mode", f"unknown mode {write_mode!r}: use sync or async")
        try:
            max_lag = config.check_max_lag(units.parse_size("max_lag", get("max_lag")))
        except ConfigError as err:
            raise bad("max_lag", _reason(err)) from None
        for name in ("checkpoint_interval", "timeout", "isolation_timeout"):
            try:
                units.parse_duration(name, get(name))
            except ConfigError as err:
                raise bad(name, _reason(err)) from None
        try:
            tls = TLSSpec.parse("tls", get("tls"))
            insecure = config.parse_bool("insecure", get("insecure"))
            freeze = config.parse_bool("freeze", get("freeze"))
        except ConfigError as err:
            raise bad(err.key, _reason(err)) from None
        if tls is not None and tls.kind != "x509":
            raise bad("tls", "use x509:DIR (the control port needs certificates) or off")
        if tls is None and not insecure:
            raise bad("tls", "is off: give tls=x509:DIR, or insecure=yes on a closed network")
        control = get("control")
        if not os.path.isabs(control) or len(control.encode()) > UNIX_PATH_MAX:
            raise bad("control", f"{control!r} cannot be a Unix socket: give an absolute path "
                                 f"of at most {UNIX_PATH_MAX} bytes")
        disks = [config.parse_disk(text, i) for i, text in enumerate(get("disks").split())]
        if get("vm_state") and not (get("guest_qmp") or get("libvirt_domain")):
            raise bad("vm_state", "needs guest_qmp or libvirt_domain (the guest whose state "
                                  "is saved)")
        if get("guest_qmp") and get("libvirt_domain"):
            raise bad("libvirt_domain", "libvirt owns that guest's monitor: give "
                                        "libvirt_domain or guest_qmp, not both")
        cfg = cls(resource=_resource(env), node=_node_name(env), disks=disks, nodes=nodes,
                  nbd_port=ports["nbd_port"], control_port=ports["control_port"],
                  control=control, run_dir=get("run_dir"), tls=tls, insecure=insecure,
                  write_mode=write_mode, max_lag=max_lag, interval=get("checkpoint_interval"),
                  timeout=get("timeout"), isolation_timeout=get("isolation_timeout"),
                  guest_qmp=get("guest_qmp"), freeze=freeze, vm_state=get("vm_state"),
                  libvirt_domain=get("libvirt_domain"), libvirt_uri=get("libvirt_uri"))
        if local:
            cfg.check_local()
        return cfg

    def check_local(self) -> None:
        if self.node not in self.nodes:
            raise AgentError(ERR_ARGS, f"parameter nodes: this node {self.node!r} is not in "
                                       f"it ({', '.join(self.nodes)})")
        for d in self.disks:
            try:
                config.check_disk_file(d.path)
            except ConfigError as err:
                raise AgentError(ERR_ARGS, f"parameter disks: {_reason(err)}") from None
        for name, path in (("control", os.path.dirname(self.control)),
                           ("run_dir", self.run_dir)):
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as err:
                raise AgentError(ERR_ARGS, f"parameter {name}: cannot create {path}: "
                                           f"{err.strerror}") from None
        if self.tls is not None:
            try:
                self.tls.check("tls", "server")
            except ConfigError as err:
                raise AgentError(ERR_ARGS, f"parameter tls: {_reason(err)}") from None

    # -- derived ------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.nodes[self.node]

    @property
    def peer(self) -> str:
        return next(n for n in self.nodes if n != self.node)

    def replica_uri(self, node: str) -> str:
        uri = f"nbd://{self.nodes[node]}:{self.nbd_port}/replica"
        return self.tls.client_uri("tls", uri) if self.tls else uri

    def control_address(self, node: str) -> str:
        return f"{self.nodes[node]}:{self.control_port}"

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, f"{self.resource}.{name}")

    def node_keys(self) -> list[tuple[str, str]]:
        keys = [("role", "secondary")] + [("disk", f"{d.name}:{d.path}") for d in self.disks]
        keys += [("control", self.control), ("control-tcp", self.control_address(self.node))]
        if self.tls is not None:
            keys.append(("control-tls", f"x509:{self.tls.path}"))
        if self.insecure:
            keys.append(("insecure", "yes"))
        return keys

    def listen(self) -> nodeproc.Listen:
        return nodeproc.Listen(port=self.nbd_port, address=self.address, tls=self.tls,
                               insecure=self.insecure)


def _resource(env: dict[str, str]) -> str:
    """The clone's resource name without its instance number (rsc:0 -> rsc)."""
    name = env.get("OCF_RESOURCE_INSTANCE", "repdisk")
    return name.split(":", 1)[0]


def _node_name(env: dict[str, str]) -> str:
    if env.get("OCF_RESKEY_CRM_meta_on_node"):
        return env["OCF_RESKEY_CRM_meta_on_node"]
    try:
        done = subprocess.run(["crm_node", "-n"], capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return socket.gethostname()


# -- the cluster's side: scores and the pair's epoch -------------------------------------------

class Cluster:
    """crm_attribute calls; ``run`` is replaceable for tests of the decisions alone."""

    def __init__(self, resource: str, run: Callable[[list[str]], str] | None = None) -> None:
        self.resource = resource
        self._run = run or _crm

    def epoch(self) -> int | None:
        out = self._run(["crm_attribute", "--type", "crm_config", "--name", self._epoch_name,
                         "--query", "--quiet"])
        return int(out) if out.strip().isdigit() else None

    def set_epoch(self, epoch: int) -> None:
        self._run(["crm_attribute", "--type", "crm_config", "--name", self._epoch_name,
                   "--update", str(epoch)])

    def set_score(self, score: int | None) -> None:
        if score is None:
            self._run(["crm_attribute", "--promotion", "--delete"])
        else:
            self._run(["crm_attribute", "--promotion", "--update", str(score)])

    @property
    def _epoch_name(self) -> str:
        return f"repdisk-{self.resource}-epoch"


def _crm(argv: list[str]) -> str:
    """Run a cluster tool; its output, or '' when the attribute does not exist."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode not in (0, 105):   # 105: no such attribute
        raise AgentError(ERR_GENERIC, f"{shlex.join(argv)}: {done.stderr.strip()}")
    return done.stdout.strip() if done.returncode == 0 else ""


def score(q: dict[str, Any], cluster_epoch: int | None, interval: float) -> int | None:
    """The promotion score of a node from its ``query-replication`` answer: where the
    newest data is.  None (no score: never promote) for a fenced node, one of an older
    epoch than the cluster's, an inconsistent one, or one whose data no rule vouches for.
    """
    if q.get("fenced"):
        return None
    epoch = q["epoch"]
    if cluster_epoch is not None and epoch < cluster_epoch:
        return None
    disks = q["disks"]
    stages = {d["stage"] for d in disks}
    if q["role"] == "primary":
        return SCORE_NEWEST
    if stages == {"running"}:
        if all(d["disk"] in q.get("sealed", {}) for d in disks):
            return SCORE_NEWEST
        if not all(d.get("consistent") for d in disks):
            return None
        ages = [time.time() - d["last_checkpoint"]["time"] for d in disks
                if d.get("last_checkpoint")]
        recent = ages and max(ages) < 3 * interval + PEER_RECENT
        return SCORE_NEWEST if recent else SCORE_PEER_UNKNOWN
    if stages == {"done"} and q.get("failed-over"):
        return SCORE_NEWEST
    if stages == {"none"}:
        if q.get("failed-over") or q.get("state-role") == "primary":
            return SCORE_LAST_PRIMARY
        if cluster_epoch is None and q.get("state-role") in ("", None) and epoch == 0:
            return SCORE_FIRST
    return None


# -- the node -------------------------------------------------------------------------------

class Agent:
    def __init__(self, cfg: AgentConfig, cluster: Cluster | None = None) -> None:
        self.cfg = cfg
        self.cluster = cluster or Cluster(cfg.resource)

    # -- helpers

    def call(self, command: str, timeout: float = 60.0, **args: Any) -> Any:
        client = QMPClient(timeout=timeout).connect(self.cfg.control)
        try:
            return client.execute(command, args)
        finally:
            client.close()

    def query(self) -> dict[str, Any] | None:
        """The node's query-replication with its state file's role, or None if it is down."""
        if not detach.pidfile_alive(self.cfg.path("pid")):
            return None
        try:
            q = self.call("query-replication", timeout=10)
        except (OSError, RepdiskError):
            return None
        assert isinstance(q, dict)
        q["state-role"] = _state_role(self._state_file())
        return q

    def _state_file(self) -> str:
        return self.cfg.disks[0].path + ".state"

    def promoted_marker(self) -> str:
        """Says "promoted" until demote or stop; in HA_RSCTMP (/run/resource-agents), which a
        reboot empties: a node that died while promoted is "failed promoted" (9) until
        Pacemaker recovers it, one that rebooted is simply stopped."""
        tmp = os.environ.get("HA_RSCTMP", "/run/resource-agents")
        os.makedirs(tmp, exist_ok=True)
        return os.path.join(tmp, f"repdisk-{self.cfg.resource}.promoted")

    def log(self, message: str) -> None:
        """To stderr (Pacemaker's log) and, with the time, to RUN_DIR/RSC.agent.log."""
        print(f"repdisk-ocf {self.cfg.resource} {self.cfg.node}: {message}", file=sys.stderr)
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{now % 1:.3f}"[2:]
        with open(self.cfg.path("agent.log"), "a") as f:
            f.write(f"{stamp} {now:.3f} {message}\n")

    def interval(self) -> float:
        return units.parse_duration("checkpoint_interval", self.cfg.interval)

    def refresh_score(self, q: dict[str, Any] | None) -> int | None:
        """Set this node's promotion score from ``q``; a cluster tool that fails (a busy
        CIB) is logged and retried at the next monitor, never fails the action: the
        score only steers the next promotion, and ``promote`` checks again itself."""
        try:
            return self._refresh_score(q)
        except (AgentError, OSError, subprocess.TimeoutExpired) as err:
            self.log(f"the promotion score was not updated: {err}")
            return None

    def _refresh_score(self, q: dict[str, Any] | None) -> int | None:
        # A primary's and a replicating secondary's score do not depend on the cluster's
        # epoch (the primary started the secondary in it): no CIB query every monitor.
        steady = q is not None and (q["role"] == "primary" or
                                    {d["stage"] for d in q["disks"]} == {"running"})
        epoch = q["epoch"] if steady and q is not None else self.cluster.epoch()
        s = None if q is None else score(q, epoch, self.interval())
        cache = self.cfg.path("score")
        text = "none" if s is None else str(s)
        try:
            with open(cache) as f:
                same = f.read() == text
        except OSError:
            same = False
        if not same:
            self.cluster.set_score(s)
            with open(cache, "w") as f:
                f.write(text)
        return s

    # -- actions

    def start(self) -> int:
        q = self.query()
        if q is None:
            cmd = nodeproc.nbdkit_command(
                nodeproc.PLUGIN, self.cfg.node_keys(), self.cfg.listen(),
                threads=nodeproc.default_threads([("role", "primary"),
                                                  ("write-mode", self.cfg.write_mode)]))
            try:
                nodeproc.start_background(cmd, self.cfg.path("pid"), self.cfg.path("log"),
                                          self.cfg.control, self.cfg.listen())
            except RepdiskError as err:
                self.log(f"start: the node did not start: {err}")
                raise AgentError(ERR_GENERIC, f"the node did not start: {err}") from None
            self.log("started (unpromoted)")
            q = self.query()
        self.refresh_score(q)
        return self.monitor()

    def stop(self) -> int:
        self.stop_checkpointer()
        nodeproc.stop_pidfile(self.cfg.path("pid"))
        _unlink(self.promoted_marker())
        self.refresh_score(None)
        return SUCCESS

    def monitor(self) -> int:
        q = self.query()
        promoted = os.path.exists(self.promoted_marker())
        if q is None:
            return FAILED_PROMOTED if promoted else NOT_RUNNING
        self.refresh_score(q)
        if q["role"] == "primary":
            if q.get("fenced"):
                self.log(f"the node is fenced: {q['fenced']}")
                return FAILED_PROMOTED
            if not self.checkpointer_alive():
                self.log("the checkpointer is not running: starting it")
                self.start_checkpointer("checksum")
            return RUNNING_PROMOTED
        return FAILED_PROMOTED if promoted else SUCCESS

    def promote(self) -> int:
        self.log("promoting")
        q = self.query()
        if q is None:
            raise AgentError(NOT_RUNNING, "cannot promote: the node is not running")
        if q["role"] != "primary":
            cluster_epoch = self.cluster.epoch()
            if score(q, cluster_epoch, self.interval()) is None:
                raise AgentError(ERR_GENERIC, f"promotion refused: this node's data is not "
                                              f"the newest ({_describe(q, cluster_epoch)})")
            sync = self._take_over(q)
        else:
            sync = "checksum"
        q = self.query()
        assert q is not None
        self.cluster.set_epoch(q["epoch"])
        with open(self.promoted_marker(), "w") as f:
            f.write(f"{q['epoch']}\n")
        self.start_checkpointer(sync)
        self.refresh_score(q)
        self.log(f"promoted (epoch {q['epoch']})")
        return SUCCESS

    def _take_over(self, q: dict[str, Any]) -> str:
        """Make this secondary the primary; returns the initial sync its peer needs."""
        stages = {d["stage"] for d in q["disks"]}
        names = {d["disk"] for d in q["disks"]}
        args: dict[str, Any] = {"secondary": self.cfg.replica_uri(self.cfg.peer), "write-mode":
                self.cfg.write_mode, "max-lag": self.cfg.max_lag,
                "timeout": units.parse_duration("timeout", self.cfg.timeout),
                "isolation-timeout": units.parse_duration("isolation_timeout",
                                                           self.cfg.isolation_timeout),
                # The peer may be down (fenced): the promotion must not wait for it.
                "probe": False}
        if stages == {"running"} and names <= set(q.get("sealed", {})):
            self.log("promote: role switch (the primary demoted cleanly)")
            self.call("replication-promote", **args)
            return "none"
        if stages == {"running"}:
            serving = self._peer_serving()
            if serving:
                raise AgentError(ERR_GENERIC, f"promotion refused: the peer {self.cfg.peer} "
                                              f"answers as a running primary ({serving}): two "
                                              "primaries would both acknowledge writes; demote "
                                              "it first (and keep promoted-max=1)")
            self.log("promote: failover to the last checkpoint (the primary is gone)")
            self.call("replication-stop", timeout=3600, failover=True)
        elif stages == {"none"}:        # a failover's winner restarts done, not here
            self.log("promote: the disk as it is (the pair's last primary, or a first start)")
            args["force"] = True
        self.call("replication-promote", **args)
        return "checksum"

    def _peer_serving(self) -> str:
        """What the peer says if it answers as a running primary that is not fenced (then a
        failover here makes two writers), else "" (it does not answer within 3 s: gone,
        fenced by the cluster, or cut off)."""
        try:
            client = connect_control(self.cfg.control_address(self.cfg.peer),
                                     self.cfg.tls.path if self.cfg.tls else None,
                                     self.cfg.insecure, timeout=3.0, connect_timeout=3.0)
            try:
                q = client.execute("query-replication")
            finally:
                client.close()
        except (OSError, RepdiskError):
            return ""
        if q.get("role") != "primary" or q.get("fenced") or \
                "running" not in {d.get("stage") for d in q.get("disks", [])}:
            return ""
        return f"epoch {q.get('epoch')}"

    def demote(self) -> int:
        q = self.query()
        self.stop_checkpointer()
        _unlink(self.promoted_marker())
        if q is None or q["role"] != "primary":
            self.refresh_score(q)
            return SUCCESS    # not promoted (a node that died is no longer promoted either)
        try:
            self.call("replication-demote", timeout=120)
        except RepdiskError as err:
            # Cannot hand over cleanly (no secondary): stop serving the guest; the disk
            # keeps every write and the node comes back unpromoted.
            self.log(f"demote: {err}; restarting the node unpromoted (its disk keeps "
                     "every write)")
            if not nodeproc.stop_pidfile(self.cfg.path("pid")):
                self.log("demote: the node's pid file named no running node")
            return self.start() and SUCCESS
        self.refresh_score(self.query())
        return SUCCESS

    def notify(self, env: dict[str, str]) -> int:
        kind = env.get("OCF_RESKEY_CRM_meta_notify_type", "")
        op = env.get("OCF_RESKEY_CRM_meta_notify_operation", "")
        if (kind, op) == ("post", "promote") and os.path.exists(self.promoted_marker()) \
                and not self.checkpointer_alive():
            self.start_checkpointer("checksum")
        self.refresh_score(self.query())
        return SUCCESS

    # -- the checkpointer: the controller in checkpoint-only mode, on the promoted node

    def checkpointer_alive(self) -> bool:
        return bool(detach.pidfile_alive(self.cfg.path("ckpt.pid")))

    def start_checkpointer(self, initial_sync: str) -> None:
        if self.checkpointer_alive():
            return
        ctl = self.cfg.path("ckpt.qmp")
        argv = [sys.executable, "-m", "repdisk.cli.main", "controller", "--checkpoint-only",
                "--primary", self.cfg.control,
                "--secondary", self.cfg.control_address(self.cfg.peer),
                "--control", ctl, "--interval", self.cfg.interval,
                "--initial-sync", initial_sync, "--background",
                "--pidfile", self.cfg.path("ckpt.pid"), "--log", self.cfg.path("ckpt.log")]
        if self.cfg.tls is not None:
            argv += ["--tls", self.cfg.tls.path]
        if self.cfg.insecure:
            argv.append("--insecure")
        if self.cfg.guest_qmp:
            argv += ["--qmp", self.cfg.guest_qmp] + (["--freeze"] if self.cfg.freeze else [])
        if self.cfg.libvirt_domain:
            argv += ["--libvirt-domain", self.cfg.libvirt_domain,
                     "--libvirt-uri", self.cfg.libvirt_uri]
        if self.cfg.vm_state:
            argv += ["--vm-state", self.cfg.vm_state]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise AgentError(ERR_GENERIC, f"the checkpointer did not start: "
                                          f"{(done.stderr or done.stdout).strip()}")

    def stop_checkpointer(self) -> None:
        pidfile = self.cfg.path("ckpt.pid")
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        nodeproc.stop_pid(pid)
        _unlink(pidfile)


def _reason(err: ConfigError) -> str:
    """A ConfigError's message without its key (the agent names the parameter itself)."""
    return str(err).split(": ", 1)[-1]


def _state_role(path: str) -> str:
    try:
        with open(path) as f:
            return str(json.load(f).get("role", ""))
    except (OSError, ValueError):
        return ""


def _describe(q: dict[str, Any], cluster_epoch: int | None) -> str:
    stages = ",".join(sorted({d["stage"] for d in q["disks"]}))
    consistent = all(d.get("consistent") for d in q["disks"])
    return (f"epoch {q['epoch']} (cluster {cluster_epoch}), stages {stages}, "
            f"{'consistent' if consistent else 'inconsistent'}"
            f"{', fenced' if q.get('fenced') else ''}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unknown_params(env: dict[str, str]) -> str:
    """What is wrong with a parameter the agent does not have (a typo: its value would be
    ignored), or "" if there is none; Pacemaker's own (CRM_meta_*, crm_feature_set) are
    not ours to judge."""
    unknown = sorted(name for key in env if key.startswith("OCF_RESKEY_")
                     and not (name := key.removeprefix("OCF_RESKEY_")).lower().startswith("crm_")
                     and name not in PARAM_BY_NAME)
    if not unknown:
        return ""
    near = difflib.get_close_matches(unknown[0], PARAM_BY_NAME, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return (f"unknown parameter {unknown[0]}{hint}: crm_resource --show-metadata "
            "ocf:repdisk:repdisk lists them")


def run(action: str, env: dict[str, str]) -> int:
    if action == "meta-data":
        print(meta_data(), end="")
        return SUCCESS
    known = {"start", "stop", "monitor", "promote", "demote", "notify", "validate-all"}
    if action not in known:
        print(f"repdisk-ocf: unknown action {action!r}; known: meta-data, "
              f"{', '.join(sorted(known))}", file=sys.stderr)
        return ERR_UNIMPLEMENTED
    try:
        # A probe or stop on a node without the disks must still answer (not running).
        local = action not in ("stop", "monitor")
        cfg = AgentConfig.from_env(env, local=local)
        unknown = _unknown_params(env)
        if unknown and action == "validate-all":
            raise AgentError(ERR_CONFIGURED, unknown)
        if unknown:
            print(f"repdisk-ocf: {action}: warning: {unknown}", file=sys.stderr)
        if action == "validate-all":
            return SUCCESS
        if action in ("stop", "monitor") and (cfg.node not in cfg.nodes or not all(
                os.path.exists(d.path) for d in cfg.disks)):
            return NOT_RUNNING if action == "monitor" else SUCCESS
        agent = Agent(cfg)
        if action == "notify":
            return agent.notify(env)
        return int(getattr(agent, action)())
    except AgentError as err:
        print(f"repdisk-ocf: {action}: {err}", file=sys.stderr)
        if action in ("stop", "monitor") and err.code in (ERR_CONFIGURED, ERR_ARGS):
            return NOT_RUNNING if action == "monitor" else SUCCESS
        return err.code
    except (RepdiskError, OSError) as err:
        print(f"repdisk-ocf: {action}: {err}", file=sys.stderr)
        return ERR_GENERIC


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    action = args[0] if args else os.environ.get("__OCF_ACTION", "")
    return run(action, dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
