"""repdisk: nbdkit Python plugin for a replicated disk (primary or secondary node).

    nbdkit python nbdplugin/repdisk.py role=secondary disk=SEC.img control=sec.qmp
    nbdkit python nbdplugin/repdisk.py role=primary disk=PRI.img control=pri.qmp \\
        secondary='nbd+unix:///replica?socket=/run/sec.sock'

A thin adapter: it parses keys, builds a repdisk Node and maps nbdkit's
callbacks onto the node's block devices.  Every replication rule lives in the
repdisk package (src/repdisk/).  nbdkit 1.32 cannot print a Python script's own
--help; `nbdkit python nbdplugin/repdisk.py --dump-plugin` and
`repdisk primary|secondary --help` print the keys below, from the same table.

Keys (generated from repdisk.node.config.KEYS; tests keep this text equal to it):

role=primary|secondary  (required)
    which side of the pair this node is
disk=[NAME:]PATH  (required, repeatable)
    a disk of the node (a raw file or block device); repeat the key for a consistency group of several disks. NAME (letters, digits, '-', '_'; default disk0, disk1, ...) names its exports and must match on both nodes
control=SOCKET  (required)
    the node's control socket (QMP protocol; mode 0600 unless control-mode)
control-tcp=HOST:PORT  (default None)
    also serve the control protocol on TCP, for a controller on another host; TLS with client certificates (control-tls) is required, loopback included, unless insecure=yes
control-tls=x509:DIR|off  (default off)
    certificates for control-tcp (repdisk tls ca DIR): the node shows server-cert.pem and accepts only clients with a certificate signed by ca-cert.pem
control-group=GROUP  (default None)
    give the control socket to this group (for operators; with control-mode 0660)
control-mode=MODE  (default 0600)
    the control socket's permission bits, octal; never for every local user
socket-owner=USER  (default None)
    give the NBD Unix socket (--nbd-socket) to this user, e.g. the user QEMU runs as
socket-group=GROUP  (default None)
    give the NBD Unix socket to this group, e.g. libvirt-qemu (libvirt's QEMU user on Debian); with socket-mode 0660 QEMU running as that group can connect
socket-mode=MODE  (default nbdkit's: 0777 minus the umask)
    the NBD Unix socket's permission bits, octal (connecting needs w), e.g. 0660
state=PATH  (default first disk + '.state')
    the node's state file (epoch, consistency)
secondary=NBD-URI  (required) [primary only]
    the secondary's replica export, e.g. nbd+unix:///replica?socket=/run/sec.sock or nbd://host:10809/replica; with several disks each disk NAME uses replica/NAME
secondary-tls=psk:FILE[:USER]|x509:DIR|off  (default off) [primary only]
    credentials for the link to the secondary (the secondary's nbdkit must require the same: repdisk secondary --tls ...); USER defaults to repdisk. Needed for a TCP secondary on another host unless insecure=yes
insecure=yes|no  (default no)
    allow plain, unencrypted TCP: the primary's link to a secondary that is not on loopback, and control-tcp without control-tls
write-mode=sync|async  (default sync) [primary only]
    sync: a guest write is acknowledged once local and on the secondary; async: once local, then written back to the secondary from a dirty map (at most max-lag behind)
timeout=DURATION  (default 5s) [primary only]
    how long the secondary may take to answer before the primary degrades (e.g. 5s, 500ms)
window=N  (default 64) [primary only]
    most requests in flight to the secondary
max-lag=SIZE  (default 256M) [primary only]
    async mode: most bytes acknowledged to the guest but not yet sent to the secondary; guest writes wait beyond it (a checkpoint sends what is unsent, so this also bounds its work)
resync-rate=auto|max|SIZE  (default auto) [primary only]
    how fast a resync (and an initial sync) copies: auto backs off to small pieces at 16M per second while the guest writes and runs at full speed while it does not; SIZE is a fixed cap in bytes per second (e.g. 100M); max is no limit
on-isolation=suspend|continue  (default suspend) [primary only]
    what guest writes do once the primary has heard from neither the secondary nor the controller for isolation-timeout: suspend holds them until one answers (a controller that failed over meanwhile fences this node: writes then fail); continue is the explicit opt-in to risk a split brain
isolation-timeout=DURATION  (default 3s) [primary only]
    how long without contact makes the primary isolated; keep it below the controller's heartbeat-timeout, so an isolated primary stops writing before a failover
active=PATH  (default disk + '.active') [secondary only]
    the active overlay (one disk only)
hidden=PATH  (default disk + '.hidden') [secondary only]
    the hidden overlay (one disk only)
cluster-size=SIZE  (default 64K) [secondary only]
    overlay cluster size, a power of two from 512 to 2M (e.g. 64K)
"""  # noqa: E501 (the key table is config.help_text() verbatim: test_plugin keeps them equal)

import errno
import logging
import os
import site
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import nbdkit


def _find_package() -> None:
    """Make the checkout's src/ and its venv importable, with no environment variables."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    venv = os.path.join(root, ".venv", "lib",
                        f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    if os.path.isdir(venv):
        site.addsitedir(venv)
    src = os.path.join(root, "src")
    if src not in sys.path:
        sys.path.insert(0, src)


_find_package()

from repdisk import sockaccess
from repdisk.block.device import EXTENT_HOLE, EXTENT_ZERO, BlockDevice, Extent
from repdisk.errors import BlockIOError, ConfigError, RepdiskError
from repdisk.node import config as _config
from repdisk.node import control, threadstate
from repdisk.node.node import Node
from repdisk.qmp.server import remove_stale_socket

API_VERSION = 2

#: A node's log: nbdkit's stderr, warnings and errors only, each line with its time (a
#: log file is appended to by every run of the node).
LOG_FORMAT = "%(asctime)s %(message)s"
_log = logging.getLogger("repdisk.node")
_keys: list[tuple[str, str]] = []
_node: Node | None = None
T = TypeVar("T")
_PARALLEL: int = nbdkit.THREAD_MODEL_PARALLEL
_FUA_NATIVE: int = nbdkit.FUA_NATIVE
_this_thread = threadstate.this_thread


def _fail_startup(err: Exception) -> NoReturn:
    """One clear line and a non-zero exit instead of nbdkit's Python traceback."""
    sys.stderr.write(f"nbdkit: repdisk: error: {err}\n")
    sys.stderr.flush()
    os._exit(1)


_format_exception = traceback.format_exception


def _format_refusal(exc: Any, *args: Any, **kwargs: Any) -> list[str]:
    """A request refused on purpose is one line in the node's log, not a traceback.

    nbdkit 1.32 can fail a request only when the callback raises (a return value is
    ignored), and it logs the exception with ``traceback.format_exception`` (its
    plugins/python/errors.c looks the function up at every failure).  For a BlockIOError,
    which the node raises to refuse a request with an errno (a fenced primary, a stale
    writer, a request past the end), that is the message alone; anything else keeps its
    full traceback: it is a bug.
    """
    value = args[0] if args else kwargs.get("value", exc)
    if isinstance(value, BlockIOError):
        return [str(value)]
    return _format_exception(exc, *args, **kwargs)


traceback.format_exception = _format_refusal


def thread_model() -> int:
    return _PARALLEL


def dump_plugin() -> None:
    print("repdisk_keys=" + " ".join(k.name for k in _config.KEYS))
    print(_config.help_text())


def config(key: str, value: str) -> None:
    if key not in _config.KEY_BY_NAME:
        known = ", ".join(_config.KEY_BY_NAME)
        _fail_startup(ConfigError(key, f"unknown key; known keys: {known}"))
    _keys.append((key, value))


def config_complete() -> None:
    """Check every key, and that no node serves the control socket, before any file of the
    node is opened: a refused start touches nothing of a node already running."""
    global _node
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING)
    try:
        cfg = _config.NodeConfig.from_keys(_keys)
        remove_stale_socket(cfg.control)
        _node = Node(cfg)
    except RepdiskError as err:
        _fail_startup(err)


def _the_node() -> Node:
    """The node config_complete built (every later callback comes after it)."""
    assert _node is not None
    return _node


def get_ready() -> None:
    try:
        _the_node().probe_secondary()
    except ConfigError as err:
        _fail_startup(err)


def after_fork() -> None:
    """nbdkit has bound its NBD socket: give it its owner/group/mode, then serve control
    (so a node whose control socket answers has an NBD socket QEMU may open)."""
    try:
        node = _the_node()
        sockaccess.apply_to_nbd_socket(node.cfg.nbd_socket_access)
        control.serve(node)
    except RepdiskError as err:
        _fail_startup(err)
    _log.warning("serving: %s node, pid %d, control %s", node.role, os.getpid(),
                 node.cfg.control)


def cleanup() -> None:
    if _node is not None:
        _node.close()


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    return _the_node().list_exports()


def default_export(readonly: bool, is_tls: bool) -> str:
    return _the_node().default_export


def open(readonly: bool) -> BlockDevice:
    threadstate.reap()  # states pinned by the threads of closed connections
    return _call(_the_node().export, nbdkit.export_name())


def close(h: BlockDevice) -> None:
    _the_node().closed(h)
    threadstate.reap()


def get_size(h: BlockDevice) -> int:
    return h.size


def block_size(h: BlockDevice) -> tuple[int, int, int]:
    return (1, 4096, 0xFFFFFFFF)


def can_write(h: BlockDevice) -> bool:
    return True


def can_flush(h: BlockDevice) -> bool:
    return True


def can_fua(h: BlockDevice) -> int:
    return _FUA_NATIVE


def can_trim(h: BlockDevice) -> bool:
    return True


def can_zero(h: BlockDevice) -> bool:
    return True


def can_fast_zero(h: BlockDevice) -> bool:
    # Zeroing punches holes (or allocates zeroed clusters): never slower than a write.
    return True


def can_extents(h: BlockDevice) -> bool:
    return True


def can_multi_conn(h: BlockDevice) -> bool:
    # Every connection of an export shares one device object (one file, one forwarder),
    # so a flush on one connection covers the writes of all of them.
    return True


def pread(h: BlockDevice, buf: memoryview, offset: int, flags: int) -> None:
    _call(h.pread_into, buf, offset)


def pwrite(h: BlockDevice, buf: memoryview, offset: int, flags: int) -> None:
    _call(h.pwrite, buf, offset, bool(flags & nbdkit.FLAG_FUA))


def flush(h: BlockDevice, flags: int) -> None:
    _call(h.flush)


def trim(h: BlockDevice, count: int, offset: int, flags: int) -> None:
    _call(h.trim, offset, count, bool(flags & nbdkit.FLAG_FUA))


def zero(h: BlockDevice, count: int, offset: int, flags: int) -> None:
    _call(h.zero, offset, count, bool(flags & nbdkit.FLAG_FUA))


def extents(h: BlockDevice, count: int, offset: int, flags: int) -> list[Extent]:
    return _call(h.extents, offset, count)


def _call(fn: Callable[..., T], *args: Any) -> T:
    """Run one request; a BlockIOError reaches the client as its own errno.

    ``pin``: keep the thread's Python state between requests (threadstate.py: nbdkit
    would create and destroy one per request); only a thread's first request calls it."""
    if not _this_thread.pinned:
        threadstate.pin()
    try:
        return fn(*args)
    except BlockIOError as err:
        nbdkit.set_error(err.errno or errno.EIO)
        raise


assert (EXTENT_HOLE, EXTENT_ZERO) == (nbdkit.EXTENT_HOLE, nbdkit.EXTENT_ZERO)
