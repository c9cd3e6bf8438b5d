"""A node's persisted state: its epoch (generation), whether it won a failover, fencing.

The epoch is what keeps two nodes from writing in the same generation: every
failover starts a new epoch, a node refuses to start in an epoch older than the
one it has recorded, and a node that won a failover (it holds the newest data)
refuses to become a secondary again in that same epoch, as does a primary that may hold
writes its secondary lacks (a saved dirty map with data, or an unclean stop: the other
node's resync would overwrite them).  A node last a secondary that won no failover
refuses to become the primary of that same epoch (another node may have been the primary
since, with writes this disk lacks) unless it was that epoch's primary itself
(``primary_of``).  A primary fenced by the
controller (it lost a failover), or by itself when it starts and finds its secondary
in a newer epoch, records why, refuses guest writes and refuses to
start as a primary again: it may only come back as a secondary in a newer epoch,
whose resync from the winner replaces its data.  A secondary records that its failover
commit is under way (``failover_commit``, the epoch it fails over from) before the
commit overwrites its disk, and clears it together with the epoch bump: a node that
finds it set at start-up finishes that commit before serving anything, and refuses
every start until it has.  A secondary whose primary was demoted cleanly (its final
barrier, then a write to the seal export, see node.py) records ``sealed`` (disk -> the
primary's epoch): its disk then holds every write that primary acknowledged, so it may be
promoted without a rollback (:meth:`NodeState.switch`); any newer writer session or start
clears it.  A primary records ``unclean`` once it begins to serve, before any write, and
clears it only at a clean stop, after saving its dirty maps: a primary that finds it set
at start-up did not stop cleanly (its maps are gone or stale) and compares its disks with
its secondary's before its first checkpoint (primaryrole.py).  A secondary records, per
disk, which file a checkpoint last made a consistent copy (``synced``) and of which
primary disk (``synced_by``); one started on any other file (replaced, swapped with
another disk, or its state lost), or written by another primary, tells its primary that
its contents are unknown, and the primary compares before it copies (secondaryrole.py);
serving as a primary clears the record.  Written with
:func:`~repdisk.durable.replace_file` (temporary file, fsync, rename, fsync of the
directory) so a crash leaves the old or the new state, never a torn one; a file that cannot
be parsed is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from repdisk.durable import replace_file
from repdisk.errors import ConfigError

FORMAT = 1
#: The largest epoch (JSON's exact integers; a pair fails over far fewer times).
MAX_EPOCH = 2**53 - 1


@dataclass
class NodeState:
    epoch: int = 0
    role: str = ""
    failed_over: bool = False  # this node's disk became the pair's newest in `epoch`
    fenced: str = ""           # why this node may no longer accept guest writes ("" = not)
    failover_commit: int | None = None  # epoch whose failover commit is under way
    sealed: dict[str, int] = field(default_factory=dict)  # disk -> epoch of a clean demote
    unclean: bool = False      # a primary served since its dirty maps were last saved
    #: disk -> name (RawImage.identity) of the file a checkpoint last made a consistent
    #: secondary copy; a disk whose file is not the one recorded is new to its primary
    synced: dict[str, str] = field(default_factory=dict)
    #: disk -> the primary disk (sessions.writer_id) whose copy that checkpoint made it;
    #: a session of another primary finds the disk new to it
    synced_by: dict[str, str] = field(default_factory=dict)
    #: The epoch this node was last a primary in, while it is a secondary of that epoch:
    #: no other node can have been its primary since (a start as one is refused), so it
    #: may be that epoch's primary again.
    primary_of: int | None = None
    #: A primary: disk -> the secondary disk (its replica export's DISK_ID) its dirty map
    #: says what lacks, once a start or resync copied to it; another one is compared first.
    replicated_to: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> NodeState:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as err:
            raise ConfigError("state", f"{path} cannot be read ({err}); it is never trusted "
                                       "blindly: check it, or move it away to start "
                                       "afresh") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ConfigError("state", f"{path} is not a repdisk state file of format {FORMAT}")
        try:
            return cls(epoch=int(raw["epoch"]), role=str(raw["role"]),
                       failed_over=bool(raw["failed_over"]),
                       fenced=str(raw.get("fenced", "")),
                       failover_commit=_optional_int(raw.get("failover_commit")),
                       sealed=_sealed(raw.get("sealed", {})),
                       unclean=bool(raw.get("unclean", False)),
                       synced=_synced("synced", raw.get("synced", {})),
                       synced_by=_synced("synced_by", raw.get("synced_by", {})),
                       primary_of=_optional_int(raw.get("primary_of")),
                       replicated_to=_synced("replicated_to", raw.get("replicated_to", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError("state", f"{path} lacks a valid field: {err}") from err

    def save(self, path: str) -> None:
        replace_file(path, json.dumps({"format": FORMAT, **asdict(self)}))

    def check_start(self, role: str, epoch: int | None, unsent: str = "") -> None:
        """Refuse a start that would let a stale node write, or overwrite what only this
        node holds; raise with the reason.  ``unsent`` says what a node that last ran as a
        primary may hold that its secondary lacks ("" nothing): it may not become a
        secondary (whose disk the other node overwrites) in the same epoch."""
        if epoch is not None and not 0 <= epoch <= MAX_EPOCH:
            raise ConfigError("epoch", f"start in epoch {epoch} refused: an epoch is 0 to "
                                       f"{MAX_EPOCH} (this node is in epoch {self.epoch}; a new "
                                       f"generation is usually {self.epoch + 1})")
        if self.failover_commit is not None:
            raise ConfigError("epoch", f"start refused: the failover commit of epoch "
                                       f"{self.failover_commit} was interrupted and is not "
                                       "finished (the disk is half committed); restart the "
                                       "node to finish it, see its log if that fails")
        if epoch is not None and epoch < self.epoch:
            raise ConfigError("epoch", f"start in epoch {epoch} refused: this node is already "
                                       f"in epoch {self.epoch} (a stale controller or node?)")
        if role == "primary" and self.fenced:
            raise ConfigError("epoch", f"this node was fenced ({self.fenced}): it may not "
                                       "be a primary again; start it as the winner's "
                                       "secondary in a newer epoch (its data is resynced)")
        same_epoch = epoch is None or epoch <= self.epoch
        if role == "primary" and same_epoch and self.role == "secondary" \
                and not self.failed_over and self.primary_of != self.epoch:
            raise ConfigError("epoch", f"this node was last a secondary (epoch {self.epoch}) "
                                       "and won no failover: a node that was the primary "
                                       "since may hold writes this disk lacks, and this "
                                       "primary would copy over them; start that node as "
                                       "the primary (the one last a primary, in the highest "
                                       "epoch: repdisk status of each), or, if this disk "
                                       "holds the newest data, start this one with "
                                       f"epoch={self.epoch + 1}")
        if role != "secondary" or not same_epoch or self.fenced:
            return  # a fenced node lost a failover: what only it holds is superseded
        if self.role == "primary" and unsent:
            raise ConfigError("epoch", f"this node was the primary of epoch {self.epoch} and "
                                       f"{unsent}: if its peer did not fail over since, start "
                                       "it as the primary again (it sends them to its "
                                       "secondary); if it did, start it as the winner's "
                                       f"secondary with epoch={self.epoch + 1} or the winner's "
                                       "epoch (those writes are dropped: its primary compares "
                                       "the disks and copies over them)")
        if self.role == "secondary" and self.failed_over:
            raise ConfigError("epoch", f"this node won the failover into epoch {self.epoch} and "
                                       "holds the newest data: promote it, or start it as a "
                                       f"secondary with an epoch above {self.epoch} once its "
                                       "data has been saved or is no longer wanted")

    def begin_failover(self) -> None:
        """The overlays are durable and the commit is about to overwrite the disk."""
        self.failover_commit = self.epoch

    def end_failover(self) -> None:
        """The commit is complete: this node won the failover and starts the next epoch."""
        self.epoch, self.failed_over, self.failover_commit = self.epoch + 1, True, None
        self.forget_synced()  # the disk holds the secondary VM's writes now

    def enter(self, role: str, epoch: int | None) -> None:
        """Record a start (already checked): a newer epoch clears what the old one said; a
        start as a secondary clears ``failed_over`` (check_start let it through, so its
        disk holds nothing its primary lacks: a promoted winner whose secondary had it
        all); any start clears the seals (the disk is about to change again)."""
        if role == "secondary" and self.role == "primary":
            self.primary_of = self.epoch
        if epoch is not None and epoch > self.epoch:
            self.epoch, self.failed_over, self.fenced = epoch, False, ""
        if role == "secondary":
            self.failed_over = False
        self.role = role
        self.sealed = {}

    def join(self, epoch: int) -> tuple[int, bool, str]:
        """A secondary admitted a writer of the newer ``epoch`` (the pair moved on: a
        promoted winner writes to it): it is in that epoch now, holds no failover's newest
        data, and a failover of it starts the epoch after, above its writer's.  Returns
        what it replaced, for ``leave``."""
        replaced = (self.epoch, self.failed_over, self.fenced)
        self.epoch, self.failed_over, self.fenced = epoch, False, ""
        return replaced

    def leave(self, replaced: tuple[int, bool, str]) -> None:
        """Undo a ``join`` whose start failed before any disk took a write."""
        self.epoch, self.failed_over, self.fenced = replaced

    def sealed_all(self, disks: list[str]) -> bool:
        """Every one of ``disks`` was sealed by a primary of this node's epoch or newer."""
        return all(self.sealed.get(d, -1) >= self.epoch for d in disks)

    def switch(self) -> None:
        """A role switch after a clean demote: this node's disk is the newest and starts
        the next epoch, as a won failover does (nothing was rolled back)."""
        self.epoch, self.failed_over, self.sealed = self.epoch + 1, True, {}
        self.forget_synced()

    def forget_synced(self) -> None:
        """The disks are no longer any primary's checkpointed copy (they changed as no
        secondary's does): a later secondary start finds them new."""
        self.synced, self.synced_by = {}, {}


def dirty_map_path(state_path: str, disk: str) -> str:
    """Where a primary saves ``disk``'s dirty map at a clean stop (primaryrole.py)."""
    return f"{state_path}.{disk}.dirtymap"


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"failover_commit is {value!r}, expected an epoch or null")
    return value


def _synced(key: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{key} is {value!r}, expected an object of disk: name")
    return dict(value)


def _sealed(value: object) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in value.items()):
        raise ValueError(f"sealed is {value!r}, expected an object of disk: epoch")
    return dict(value)
