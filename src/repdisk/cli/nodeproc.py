"""Starting and stopping node processes (nbdkit with the repdisk plugin).

Used by ``repdisk primary|secondary``, ``repdisk lab`` and the tests, so that
every node is started the same way: nbdkit in the foreground (``-f``; in the
background we detach it ourselves, so its log goes to a file and not to
syslog), ready only once both its NBD listener and its control socket answer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbd
import psutil

from repdisk import detach
from repdisk.errors import ConfigError, ControlError, RepdiskError
from repdisk.node.config import check_folder, default
from repdisk.qmp.client import NotAControlSocket, QMPClient
from repdisk.qmp.server import gone, remove_stale_socket
from repdisk.replication import fastpath
from repdisk.tls import TLSSpec, check_plain

#: The plugin every node runs (nbdkit's python plugin script).
PLUGIN = str(Path(__file__).resolve().parents[3] / "nbdplugin" / "repdisk.py")
START_TIMEOUT = 20.0
#: Preloaded into every node's nbdkit: nbdkit 1.32.4-1.33.9 aborts when a client hangs up
#: with replies under way (nbdplugin/nbdkit-guard.c says how; scripts/setup.sh builds it).
NBDKIT_GUARD = os.path.join(sys.prefix, "lib", "repdisk", "nbdkit-guard.so")


@dataclass(frozen=True)
class Listen:
    """Where a node serves NBD, and whether clients must use TLS (nbdkit's flags are
    server-wide, so TLS belongs here and not to the plugin's keys)."""

    socket: str | None = None
    port: int | None = None
    address: str = "127.0.0.1"
    tls: TLSSpec | None = None
    insecure: bool = False   # allow a plain TCP listener on an address other hosts reach

    def check(self) -> None:
        """Refuse a port that is not one, and a plain TCP listener off loopback unless
        insecure; check TLS files."""
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError("port", f"{self.port} is not a TCP port: give 1 to 65535")
        if self.tls is not None:
            self.tls.check("tls", "server")
        elif not self.socket:
            check_plain("tls", "a listener on", self.address, self.insecure)

    def nbdkit_args(self) -> list[str]:
        tls = self.tls.nbdkit_args() if self.tls else []
        if self.socket:
            return ["-U", self.socket, *tls]
        return ["-i", self.address, "-p", str(self.port), *tls]

    def uri(self, export: str = "") -> str:
        if self.socket:
            return f"nbd+unix:///{export}?socket={os.path.abspath(self.socket)}"
        return f"nbd://{self.address}:{self.port}/{export}"

    def answers(self) -> bool:
        """True once an NBD handshake succeeds (a bare connect would make nbdkit log an error).

        A TLS listener is asked without credentials: the handshake stops at option
        negotiation and ends with NBD_OPT_ABORT, which nbdkit allows before TLS.
        """
        h = nbd.NBD()
        try:
            if self.tls is not None:
                h.set_opt_mode(True)
                h.connect_uri(self.uri())
                h.opt_abort()
            else:
                h.connect_uri(self.uri())
                h.shutdown()
            return True
        except nbd.Error:
            return False


# nbdkit worker threads per connection, by role and write mode.  A sync primary's write
# waits for the secondary, so its threads are the guest's queue depth (4 capped a QD16 guest
# at 4 writes in flight); a secondary's copy-before-write reads overlap on 16 instead of
# queueing behind one thread.  An async primary runs 4: every thread more is one more
# taker of the GIL that its forwarder needs to send (16 measured 1.6-1.8x slower for 4 KiB
# writes on a quiet machine), while cold reads still overlap (1 thread: 3.5x slower).
# History and numbers: bench/README.md.
_DEFAULT_THREADS = {("primary", "sync"): 16, ("primary", "async"): 4, ("secondary", ""): 16}


def default_threads(keys: list[tuple[str, str]]) -> int:
    """nbdkit's worker thread count for a node with these plugin keys (see _DEFAULT_THREADS)."""
    given = dict(keys)
    role = given.get("role", "primary")
    mode = given.get("write-mode", default("write-mode")) if role == "primary" else ""
    return _DEFAULT_THREADS.get((role, mode), 8)


def nbdkit_command(plugin: str, keys: list[tuple[str, str]], listen: Listen,
                   threads: int | None = None) -> list[str]:
    """The nbdkit command line of a node; raises ConfigError for an unsafe listener, or for
    socket-owner/group/mode without a Unix socket (checked again by the plugin).

    A Unix socket left behind by a node that was killed is removed here (nbdkit would
    refuse to start on it); one where a server still answers is refused.  ``threads``
    None: the default for the node's role and write mode.
    """
    listen.check()
    socket_keys = [k for k, _ in keys if k.startswith("socket-")]
    if socket_keys and not listen.socket:
        raise ConfigError(socket_keys[0], "is for an NBD Unix socket: give --nbd-socket PATH, "
                                          "or leave the socket-* keys out for a TCP listener")
    if listen.socket:
        if nbd_server_answers(listen.socket):
            raise RepdiskError(f"NBD socket {listen.socket}: a live server answers there; stop "
                               "it or choose another path")
        free_socket(listen.socket, "NBD socket")
    if threads is None:
        threads = default_threads(keys)
    filters = [f"--filter={fastpath.FILTER}"] if os.path.exists(fastpath.FILTER) else []
    return (nbdkit_program() + ["-f", "-t", str(threads)] + listen.nbdkit_args()
            + filters + ["python", plugin] + [f"{k}={v}" for k, v in keys])


def nbdkit_program() -> list[str]:
    """How to run nbdkit for a node: with :data:`NBDKIT_GUARD` preloaded, or, if it was not
    built, plain (after a warning on stderr that says what that risks)."""
    if os.path.exists(NBDKIT_GUARD):
        return ["env", f"LD_PRELOAD={NBDKIT_GUARD}", "nbdkit"]
    print(f"repdisk: warning: {NBDKIT_GUARD} is missing (run make setup): without it a client "
          "that hangs up during I/O can abort the node (nbdkit 1.32, docs/failure-matrix.md)",
          file=sys.stderr)
    return ["nbdkit"]


def free_socket(path: str, what: str) -> None:
    """Remove a stale socket file at ``path``; RepdiskError if a server answers there."""
    try:
        remove_stale_socket(path, what)
    except ControlError as err:
        raise RepdiskError(str(err)) from None


_NBDMAGIC, _IHAVEOPT = b"NBDMAGIC", b"IHAVEOPT"
_NBD_OPT_ABORT = 2


def nbd_server_answers(path: str, timeout: float = 1.0) -> bool:
    """Whether a server listens on the Unix socket ``path``, asked the way a client that
    changes its mind does: an NBD server's greeting is answered with its own flags and
    NBD_OPT_ABORT, so the running node logs nothing (a bare connect and close makes nbdkit
    log "reading initial client flags: ... Connection reset by peer" in its log).  A server
    that says nothing within ``timeout`` (stopped, or not NBD) still answers."""
    if not os.path.exists(path):
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        return False           # refused, gone, or not a socket: remove_stale_socket decides
    try:
        greeting = _recv_exactly(sock, 18)
        if greeting[:16] == _NBDMAGIC + _IHAVEOPT:
            flags = struct.unpack(">H", greeting[16:])[0] & 0b11   # fixed newstyle, no zeroes
            sock.sendall(struct.pack(">I", flags) + _IHAVEOPT
                         + struct.pack(">II", _NBD_OPT_ABORT, 0))
            _recv_exactly(sock, 20)                                 # the server's ack
    except OSError:
        pass
    finally:
        sock.close()
    return True


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        data += chunk
    return data


def spawn(cmd: list[str], logfile: str) -> subprocess.Popen[bytes]:
    """Start nbdkit as a child of this process, with its output in ``logfile``."""
    with open(logfile, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def start_background(cmd: list[str], pidfile: str, logfile: str, control: str,
                     listen: Listen) -> int:
    """Start a detached node; return its pid once it serves, else raise with its log's error.

    A start that is refused touches nothing of a node already running: a pid file naming a
    live node, or a control socket where a server answers, is refused before anything is
    written (the running node's log included), and the new node's pid goes to a file of its
    own (``PIDFILE.starting``) that becomes ``pidfile`` only once it serves.  A folder that
    does not exist is one line saying so, before anything is started.

    Detached by :func:`repdisk.detach.launch` (a node that fails during start-up is
    noticed at once); nbdkit's ``-P`` writes the same pid again once serving.
    """
    refuse_running(pidfile)
    for what, path in (("--control", control), ("--nbd-socket", listen.socket),
                       ("--pidfile", pidfile), ("--log", logfile)):
        if path:
            check_folder(what, path)
    free_socket(control, "control socket")
    starting = pidfile + ".starting"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(starting)       # left by a start that was killed itself: ours alone
    after = cmd.index("nbdkit") + 1 if "nbdkit" in cmd else 1
    earlier = os.path.getsize(logfile) if os.path.exists(logfile) else 0
    detach.launch([*cmd[:after], "-P", starting, *cmd[after:]], starting, logfile)
    try:
        wait_ready(detach.watch(starting), control, listen, logfile, since=earlier)
    except BaseException:
        stop_pidfile(starting)
        raise
    with open(starting) as f:
        pid = int(f.read())
    os.replace(starting, pidfile)
    return pid


def refuse_running(pidfile: str) -> None:
    """RepdiskError if ``pidfile`` names a node that runs (a stale one is left for the new
    node to replace)."""
    pid = _pidfile_pid(pidfile)
    if pid is not None and _is_node(pid):
        raise RepdiskError(f"a node already runs with pid file {pidfile} (pid {pid}): stop it "
                           "first (kill " + str(pid) + "), or give another --pidfile and "
                           "--control")


def _pidfile_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def child_alive(proc: subprocess.Popen[bytes]) -> Callable[[], bool | None]:
    return lambda: proc.poll() is None


def wait_ready(alive: Callable[[], bool | None], control: str, listen: Listen,
               logfile: str | None = None, timeout: float = START_TIMEOUT,
               since: int = 0) -> None:
    """Wait until the node's control socket exists and its NBD listener answers; a node
    that exits (or does not start) raises with the error it wrote to ``logfile`` after
    byte ``since`` (what earlier runs wrote there is not this start's)."""
    try:
        detach.wait(alive, lambda: os.path.exists(control) and listen.answers(), timeout)
    except detach.StartFailed as err:
        when = "exited" if err.exited else f"did not start within {timeout:.0f} s"
        raise RepdiskError(f"node {when}: {last_error_line(logfile, since)}") from None


def last_error_line(logfile: str | None, since: int = 0) -> str:
    """The last line of ``logfile`` after byte ``since`` that names an error, else its
    last line."""
    if not logfile or not os.path.exists(logfile):
        return "(no log)"
    with open(logfile, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:  # nbdkit reports every failure it sees: something ended it from outside
        return (f"nothing in its log {logfile} from this start: nbdkit ended without a "
                "message (killed, or crashed: see the kernel log)")
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines)[-1]


def stop_pidfile(pidfile: str, timeout: float = 10.0) -> bool:
    """SIGTERM the node named by a pid file, SIGKILL if it lingers; True if one was running.

    The pid file is removed either way, so a node that died leaves nothing that looks
    alive; a pid that now belongs to some other program (reused) is left alone.
    """
    pid = _pidfile_pid(pidfile)
    if pid is None:
        return False
    stopped = _is_node(pid) and stop_pid(pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    return stopped


@dataclass(frozen=True)
class Serving:
    """The process that serves a control socket: a repdisk node or controller."""
    control: str
    pid: int
    what: str       # "node" or "controller"

    def stop(self, timeout: float = 10.0) -> str:
        """Stop it (:func:`terminate`) and wait until it has exited; what happened, in one
        phrase (``stopped the node (pid N)``, or killed and why).  Its default pid file
        (``CONTROL.pid``) goes too."""
        ended = terminate(self.pid, timeout)
        if _pidfile_pid(self.control + ".pid") == self.pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.control + ".pid")
        if ended == "killed":
            return (f"killed the {self.what} (pid {self.pid}): it did not stop within "
                    f"{timeout:g} s of SIGTERM ({LINGERED})")
        return f"stopped the {self.what} (pid {self.pid})"


def serving(control: str) -> Serving | None:
    """What serves the Unix control socket ``control``, or None if nothing does any more
    (no socket there, or one left by a process that exited).  Raises RepdiskError for a
    path that is not a control socket (a file, an NBD socket) or one that a program other
    than a repdisk node or controller serves.  It opens a QMP session there and closes it,
    running no command."""
    try:
        QMPClient(timeout=5.0).connect(control, timeout=5.0).close()
    except NotAControlSocket as err:
        raise RepdiskError(str(err)) from None
    except ControlError:        # no greeting: gone, or hung, or not repdisk (its pid says)
        if gone(control):
            return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(control)
        except ConnectionRefusedError:
            return None                                 # it exited meanwhile
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", cred)[0]
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None                                     # it exited meanwhile
    if _is_node(pid):
        return Serving(control, pid, "node")
    if process_kind(cmdline) == "controller":
        return Serving(control, pid, "controller")
    raise RepdiskError(f"{control} is served by pid {pid} ({' '.join(cmdline[:3])}), not a "
                       "repdisk node or controller: nothing stopped")


def process_kind(cmdline: list[str]) -> str | None:
    """What a process is by its command line: ``node`` (nbdkit, or about to exec it),
    ``controller`` (``repdisk controller``), or None (another program)."""
    if any("nbdkit" in part for part in cmdline[:5]):
        return "node"
    if "controller" in cmdline and any("repdisk" in part for part in cmdline):
        return "controller"
    return None


def _is_node(pid: int) -> bool:
    """Whether ``pid`` is (or is about to exec) an nbdkit process."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and process_kind(proc.cmdline()) == "node"
    except psutil.Error:
        return False


#: Why a node may outlast its SIGTERM, and what killing it costs.
LINGERED = ("a node waits for its NBD clients to disconnect: stop the guest first; a killed "
            "primary compares the disks at its next start")


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM ``pid``, SIGKILL it if it lingers (saying so on stderr); True if it was
    running."""
    ended = terminate(pid, timeout)
    if ended == "killed":
        print(f"repdisk: process {pid} did not stop within {timeout:g} s of SIGTERM, so it "
              f"was killed ({LINGERED})", file=sys.stderr)
    return bool(ended)


def terminate(pid: int, timeout: float = 10.0) -> str:
    """SIGTERM ``pid`` and wait until it has exited, SIGKILL if it lingers past
    ``timeout``: "stopped", "killed", or "" if it was not running."""
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        if _wait_dead(proc, timeout):
            return "stopped"
        proc.kill()
        _wait_dead(proc, timeout)
    except psutil.NoSuchProcess:
        return ""
    return "killed"


def _wait_dead(proc: psutil.Process, timeout: float) -> bool:
    """Wait until ``proc`` has exited.  A zombie counts as exited (its files are closed):
    a detached node's parent is init, which may reap it only seconds later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False
