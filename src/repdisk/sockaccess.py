"""Who may connect to a node's Unix sockets: owner, group and mode, as users need them.

A node has two Unix sockets.  nbdkit creates the **NBD socket** (``--nbd-socket``, nbdkit's
``-U``) with its own owner and the umask's mode (0755 under umask 022, so only root can
connect: a Unix socket needs write permission).  Where QEMU runs as another user (libvirt's
``libvirt-qemu`` on Debian) it cannot open it, and libvirt does not relabel NBD sockets:
the keys ``socket-owner``, ``socket-group`` and ``socket-mode`` give it to that user.  The
node (this process, inside nbdkit) applies them in ``after_fork``, after nbdkit has bound
the socket and before the node serves its control socket, so a node that answers on its
control socket already has an NBD socket with the asked-for access.  The plugin does not
get the socket's path from nbdkit: it is the one Unix socket this process listens on
(:func:`listening_unix_sockets`), found in ``/proc``.

The **control socket** is the node's own (mode 0600 by default: whoever can connect can fail
over or fence the pair).  ``control-group`` and ``control-mode`` open it to a group of
operators; a mode that lets every local user in is refused.

Every mistake (a user or group this host does not know, a mode that is not octal) is a
:class:`ConfigError` naming the key, at start-up before anything is opened.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from repdisk.errors import ConfigError

#: /proc/net/unix's flag of a listening socket (__SO_ACCEPTCON).
_ACCEPTCON = 0x10000


@dataclass(frozen=True)
class SocketAccess:
    """Owner, group and permission bits to give a socket; None leaves that one alone."""

    uid: int | None = None
    gid: int | None = None
    mode: int | None = None

    def __bool__(self) -> bool:
        return (self.uid, self.gid, self.mode) != (None, None, None)

    def apply(self, path: str) -> None:
        """chown and chmod ``path`` (a socket: its mode is its connect permission)."""
        if self.uid is not None or self.gid is not None:
            os.chown(path, -1 if self.uid is None else self.uid,
                     -1 if self.gid is None else self.gid)
        if self.mode is not None:
            os.chmod(path, self.mode)

    def describe(self) -> str:
        """``owner libvirt-qemu group kvm mode 0660`` (what is set), for logs."""
        parts = []
        if self.uid is not None:
            parts.append(f"owner {pwd.getpwuid(self.uid).pw_name}")
        if self.gid is not None:
            parts.append(f"group {grp.getgrgid(self.gid).gr_name}")
        if self.mode is not None:
            parts.append(f"mode {self.mode:04o}")
        return " ".join(parts)


def parse_user(key: str, text: str) -> int:
    """A user name (or numeric uid) this host knows, as a uid."""
    try:
        return pwd.getpwnam(text).pw_uid if not text.isdigit() else pwd.getpwuid(int(text)).pw_uid
    except KeyError:
        raise ConfigError(key, f"no user {text!r} on this host: give an existing user "
                               "(getent passwd lists them)") from None


def parse_group(key: str, text: str) -> int:
    """A group name (or numeric gid) this host knows, as a gid."""
    try:
        return grp.getgrnam(text).gr_gid if not text.isdigit() else grp.getgrgid(int(text)).gr_gid
    except KeyError:
        raise ConfigError(key, f"no group {text!r} on this host: give an existing group "
                               "(getent group lists them), e.g. libvirt-qemu") from None


def parse_mode(key: str, text: str) -> int:
    """Octal permission bits (``0660``, ``660``), at most 0777."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(key, f"{text!r} is not a file mode: give octal permission bits, "
                               "e.g. 0660")
    return mode


def parse_access(prefix: str, owner: str | None, group: str | None,
                 mode: str | None) -> SocketAccess:
    """The keys ``PREFIX-owner``, ``PREFIX-group``, ``PREFIX-mode`` (each may be absent)."""
    return SocketAccess(parse_user(f"{prefix}-owner", owner) if owner else None,
                        parse_group(f"{prefix}-group", group) if group else None,
                        parse_mode(f"{prefix}-mode", mode) if mode else None)


def check_control_mode(key: str, mode: int) -> None:
    """The control socket fails over and fences the pair: never for every local user."""
    if mode & 0o007:
        raise ConfigError(key, f"{mode:04o} lets every local user control the pair: give the "
                               "operators a group (control-group) and use 0660")
    if not mode & 0o600 == 0o600:
        raise ConfigError(key, f"{mode:04o} locks out the socket's owner: keep rw for it "
                               "(e.g. 0600 or 0660)")


def listening_unix_sockets(pid: str = "self") -> list[str]:
    """The paths of the Unix sockets that process ``pid`` listens on (bound to a file).

    A socket's inode (``/proc/PID/fd/N`` links to ``socket:[INODE]``) is matched against
    ``/proc/net/unix``, which gives each socket's flags and path.
    """
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue    # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    paths = []
    with open("/proc/net/unix") as f:
        next(f)     # Num RefCount Protocol Flags Type St Inode Path
        for line in f:
            fields = line.split(maxsplit=7)
            if (len(fields) == 8 and fields[6] in inodes and not fields[7].startswith("@")
                    and int(fields[3], 16) & _ACCEPTCON):
                paths.append(fields[7].rstrip("\n"))
    return paths


def apply_to_nbd_socket(access: SocketAccess, key: str = "socket-group") -> str | None:
    """Give the one Unix socket this process (nbdkit) listens on ``access``; return its path
    (None if ``access`` asks for nothing).  ConfigError if nbdkit serves no Unix socket."""
    if not access:
        return None
    paths = listening_unix_sockets()
    if len(paths) != 1:
        raise ConfigError(key, "socket-owner, socket-group and socket-mode are for an NBD Unix "
                               "socket (--nbd-socket, nbdkit -U); this node listens on "
                               + (f"{len(paths)} Unix sockets" if paths else "TCP only"))
    access.apply(paths[0])
    return paths[0]
