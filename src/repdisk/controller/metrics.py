"""The controller's numbers in Prometheus' text exposition format (version 0.0.4).

One function renders a controller snapshot (``Controller.query()`` plus the nodes' last
``query-replication`` answers), so ``query-metrics``, ``--metrics-file`` and the tests
read the same text.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from repdisk.durable import replace_file

STATES = ("starting", "running", "degraded", "resyncing", "failed-over", "fenced", "stopped")
STAGES = ("none", "running", "failover", "failover-failed", "done")

_HELP = {
    "repdisk_controller_state": ("gauge", "1 for the controller's current state"),
    "repdisk_epoch": ("gauge", "the pair's epoch (generation); a failover starts a new one"),
    "repdisk_node_up": ("gauge", "1 if the node answered the last heartbeat"),
    "repdisk_node_last_seen_seconds": ("gauge", "seconds since the node last answered"),
    "repdisk_disk_stage": ("gauge", "1 for the disk's current replication stage"),
    "repdisk_dirty_bytes": ("gauge", "primary: bytes not known to be on the secondary"),
    "repdisk_lag_bytes": ("gauge", "primary: acknowledged bytes the secondary has not confirmed"),
    "repdisk_secondary_consistent": ("gauge", "1 if the secondary holds a complete checkpoint"),
    "repdisk_checkpoints_total": ("counter", "pair checkpoints completed"),
    "repdisk_checkpoint_failures_total": ("counter", "pair checkpoints that failed"),
    "repdisk_checkpoint_duration_seconds": ("gauge", "duration of the last pair checkpoint"),
    "repdisk_checkpoint_pause_seconds": ("gauge", "guest-visible pause of the last checkpoint"),
    "repdisk_last_checkpoint_age_seconds": ("gauge", "seconds since the last checkpoint"),
    "repdisk_resync_done_bytes": ("gauge", "bytes done by the running sync or resync phase"),
    "repdisk_resync_total_bytes": ("gauge", "bytes the running sync or resync phase covers"),
    "repdisk_resync_eta_seconds": ("gauge", "estimated seconds left in the running phase"),
    "repdisk_resync_bytes_total": ("counter", "bytes copied to the secondary by resyncs"),
    "repdisk_verify_out_of_sync_bytes": ("gauge", "bytes that differed on the secondary at "
                                                  "the last verify (before any repair)"),
    "repdisk_verify_out_of_sync_ranges": ("gauge", "ranges that differed at the last verify"),
    "repdisk_verify_age_seconds": ("gauge", "seconds since the last verify ended"),
    "repdisk_failovers_total": ("counter", "failovers done by this controller"),
    "repdisk_failover_seconds": ("gauge", "loss-to-serving time of the last failover"),
}


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in labels.items())
    return "{" + body + "}"


def _num(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def render(snapshot: dict[str, Any], nodes: dict[str, dict[str, Any] | None]) -> str:
    """Prometheus text for a controller snapshot and the nodes' last answers."""
    samples: dict[str, list[tuple[dict[str, Any], Any]]] = {name: [] for name in _HELP}

    def add(name: str, value: Any, **labels: Any) -> None:
        if value is not None:
            samples[name].append((labels, value))

    for state in STATES:
        add("repdisk_controller_state", snapshot["state"] == state, state=state)
    add("repdisk_epoch", snapshot["epoch"])
    for role, info in snapshot["nodes"].items():
        add("repdisk_node_up", info["reachable"], node=role)
        add("repdisk_node_last_seen_seconds", info["last_seen"], node=role)
    for role, q in nodes.items():
        for disk in (q or {}).get("disks", []):
            for stage in STAGES:
                add("repdisk_disk_stage", disk.get("stage") == stage, node=role,
                    disk=disk["disk"], stage=stage)
            if q and q.get("role") == "primary":
                add("repdisk_dirty_bytes", disk.get("dirty_bytes", 0), disk=disk["disk"])
                add("repdisk_lag_bytes", disk.get("lag_bytes", 0), disk=disk["disk"])
                verify = disk.get("last_verify")
                if verify:
                    add("repdisk_verify_out_of_sync_bytes", verify["bytes"], disk=disk["disk"])
                    add("repdisk_verify_out_of_sync_ranges", verify["ranges"], disk=disk["disk"])
                    add("repdisk_verify_age_seconds", round(time.time() - verify["time"], 3),
                        disk=disk["disk"])
            elif "consistent" in disk:
                add("repdisk_secondary_consistent", disk["consistent"], disk=disk["disk"])
    counters = snapshot["counters"]
    add("repdisk_checkpoints_total", counters["checkpoints"])
    add("repdisk_checkpoint_failures_total", counters["checkpoint_failures"])
    add("repdisk_resync_bytes_total", counters["resync_bytes"])
    add("repdisk_failovers_total", counters["failovers"])
    last = snapshot["last_checkpoints"][-1] if snapshot["last_checkpoints"] else None
    if last:
        add("repdisk_checkpoint_duration_seconds", last["duration"])
        add("repdisk_checkpoint_pause_seconds", last["pause"])
        add("repdisk_last_checkpoint_age_seconds", last["age"])
    progress = snapshot.get("progress")
    if progress:
        add("repdisk_resync_done_bytes", progress["done"], phase=progress["phase"])
        add("repdisk_resync_total_bytes", progress["total"], phase=progress["phase"])
        add("repdisk_resync_eta_seconds", progress["eta"], phase=progress["phase"])
    failover = snapshot.get("failover")
    if failover:
        add("repdisk_failover_seconds", failover["loss_to_serving"])
    return "".join(_family(name, samples[name]) for name in _HELP if samples[name])


def _family(name: str, samples: Iterable[tuple[dict[str, Any], Any]]) -> str:
    kind, text = _HELP[name]
    lines = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_num(value)}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def write_file(path: str, text: str) -> None:
    """Replace ``path`` atomically (a scraper never reads half a file)."""
    replace_file(path, text)
