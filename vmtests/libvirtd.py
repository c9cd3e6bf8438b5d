"""A real libvirtd for the VM tests, set up and stopped by the test, and guests it runs.

Debian 12's ``libvirt-daemon``, ``libvirt-daemon-driver-qemu`` and ``libvirt-clients`` (9.0,
installed by scripts/setup.sh) without ``libvirt-daemon-system``, which would also start
the daemons at boot. What that package would have done, :class:`Libvirtd` does (see
/work/shared/reference/libvirt-on-one-host.md for how each was found):

1. the user ``libvirt-qemu`` (libvirtd looks it up before reading qemu.conf and exits
   without it);
2. ``/etc/libvirt/qemu.conf`` with the user and group QEMU runs as (root or libvirt-qemu);
3. ``/var/log/libvirt/qemu`` for virtlogd;
4. ``virtlogd -d`` and ``libvirtd -d`` with pid files of their own.

And for QEMU as ``libvirt-qemu``, what Debian's udev and libvirt-daemon-system do for
``/dev/kvm`` (0660 root:kvm, libvirt-qemu in group kvm): without it libvirt finds that the
QEMU capabilities it probed (as root, with KVM) no longer fit a QEMU user that cannot open
/dev/kvm, and probes QEMU again at every ``virsh create``: 48-58 s each on this host instead
of about 1.5 s. The domains are TCG (``type='qemu'``) either way. /dev/kvm's owner and mode
are put back at the end.

:meth:`Libvirtd.close` destroys the domains the test created and stops both daemons by
their pid files, leaving no daemon behind; qemu.conf is put back as it was. The host has one
libvirtd socket and one qemu.conf, so runs of several clones on one machine take turns (a
lock file held from start to close).

:class:`LibvirtGuest` is one domain running the test guest, with the console reading,
record stamping and waiting of :class:`vmtests.guest.GuestVM` (its serial console goes to a
file, which a ``tail -F`` feeds to the reader).
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import escape

from vmtests.guest import Guest, GuestVM
from vmtests.guest.qemu import QemuError, kernel_args

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LOG_DIR = Path("/var/log/libvirt/qemu")
KVM = Path("/dev/kvm")
QEMU_USER = "libvirt-qemu"
PIDS = {"virtlogd": Path("/run/repdisk-vmtests-virtlogd.pid"),
        "libvirtd": Path("/run/repdisk-vmtests-libvirtd.pid")}
#: The host has one libvirtd socket and one qemu.conf: test runs of several clones on one
#: machine take turns (flock), the second waits for the first instead of failing.
LOCK = Path("/run/repdisk-vmtests-libvirtd.lock")
LOCK_TIMEOUT = 900.0
START_TIMEOUT = 90.0   # the first start probes QEMU's capabilities (about 10 s), then cached


def virsh(*args: str, timeout: float = 120.0, check: bool = True) -> str:
    """Run ``virsh -c qemu:///system ARGS``; its output (QemuError with virsh's error)."""
    run = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                         timeout=timeout)
    if check and run.returncode != 0:
        raise QemuError(f"virsh {' '.join(args)}: {run.stderr.strip()}")
    return run.stdout


class Libvirtd:
    """libvirtd and virtlogd running QEMU as ``user`` (root or libvirt-qemu); see the module."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.domains: list[str] = []
        self._conf: bytes | None = None
        self._kvm: os.stat_result | None = None
        self._lock: IO[str] | None = None
        self._held = False                  # our turn: the daemons are ours to stop
        self.start_seconds = 0.0

    def start(self) -> Libvirtd:
        for tool in ("libvirtd", "virtlogd", "virsh"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing: make setup installs libvirt-daemon, "
                                   "libvirt-daemon-driver-qemu and libvirt-clients")
        self._lock = open(LOCK, "w")  # noqa: SIM115 (held until close)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another test run held {LOCK} for "
                                       f"{LOCK_TIMEOUT:g}s") from None
                time.sleep(0.5)
        self._conf = QEMU_CONF.read_bytes() if QEMU_CONF.exists() else None
        for pidfile in PIDS.values():
            _stop(pidfile)      # left by a run that was killed (ours: we hold the lock)
        try:                                                          # 1
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin",
                            QEMU_USER], check=True)
        QEMU_CONF.write_text(f'user = "{self.user}"\ngroup = "{self.user}"\n')   # 2
        LOG_DIR.mkdir(parents=True, exist_ok=True)                    # 3
        if self.user != "root" and KVM.exists():
            self._give_kvm_to_the_qemu_user()
        t0 = time.monotonic()
        for name, pidfile in PIDS.items():                            # 4
            subprocess.run([name, "-d", "-p", str(pidfile)], check=True, timeout=30)
        deadline = time.monotonic() + START_TIMEOUT
        while subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                             timeout=START_TIMEOUT).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not answer within {START_TIMEOUT:g}s")
            time.sleep(0.1)
        self.start_seconds = time.monotonic() - t0
        return self

    def _give_kvm_to_the_qemu_user(self) -> None:
        """/dev/kvm 0660 root:kvm with libvirt-qemu in kvm, as on a Debian host with udev."""
        if not _group_exists("kvm"):
            subprocess.run(["groupadd", "--system", "kvm"], check=True)
        if QEMU_USER not in grp.getgrnam("kvm").gr_mem:
            subprocess.run(["usermod", "--append", "--groups", "kvm", QEMU_USER], check=True)
        self._kvm = KVM.stat()
        os.chown(KVM, -1, grp.getgrnam("kvm").gr_gid)
        KVM.chmod(0o660)

    def create(self, xml: Path, paused: bool = False) -> None:
        """``virsh create XML`` (the domain goes when destroyed: nothing is defined)."""
        name = _domain_name(xml)
        self.domains.append(name)
        virsh("create", str(xml), *(["--paused"] if paused else []))

    def close(self) -> None:
        """Destroy the test's domains, stop both daemons, put qemu.conf and /dev/kvm back
        (nothing if this test never had its turn: the daemons are another run's)."""
        if not self._held:
            if self._lock is not None:
                self._lock.close()
            return
        for name in self.domains:
            virsh("destroy", name, check=False, timeout=30)
        for pidfile in reversed(PIDS.values()):
            _stop(pidfile)
        if self._conf is None:
            QEMU_CONF.unlink(missing_ok=True)
        else:
            QEMU_CONF.write_bytes(self._conf)
        if self._kvm is not None:
            os.chown(KVM, -1, self._kvm.st_gid)
            KVM.chmod(self._kvm.st_mode & 0o7777)
        if self._lock is not None:
            self._lock.close()      # releases the flock
            self._lock, self._held = None, False


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pidfile: Path) -> bool:
    pid = _pid(pidfile)
    if pid is None:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop(pidfile: Path, timeout: float = 15.0) -> None:
    """SIGTERM the daemon named by ``pidfile`` (its own), SIGKILL it if it lingers."""
    pid = _pid(pidfile)
    if pid is not None and _alive(pidfile):
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while _alive(pidfile) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pidfile):
            os.kill(pid, 9)
    pidfile.unlink(missing_ok=True)


def _domain_name(xml: Path) -> str:
    text = xml.read_text()
    return text.split("<name>", 1)[1].split("</name>", 1)[0]


def domain_xml(name: str, guest: Guest, files: Path, disk: str, serial: Path | str,
               workload: str = "records", seen_as: str | None = None) -> str:
    """The test guest as a libvirt domain: TCG, direct kernel boot (kernel and initramfs
    copied into ``files``, which libvirt may relabel for its QEMU user), the ``<disk>``
    element ``disk`` (the README's), the serial console to the file ``serial``, and every
    way of ending (poweroff, reboot, crash) ends the domain, as -no-reboot does.
    ``seen_as``: the path under which libvirtd sees ``files``, if not the same."""
    kernel, initrd = files / "vmlinuz", files / "initramfs.gz"
    for src, dst in ((guest.kernel, kernel), (guest.initramfs, initrd)):
        if not dst.exists():
            shutil.copyfile(src, dst)
    if seen_as is not None:      # the folder's path where libvirtd runs (a cluster node's)
        kernel, initrd = Path(seen_as) / kernel.name, Path(seen_as) / initrd.name
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{escape(kernel_args(workload))}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{disk}
    <serial type='file'><source path='{serial}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtGuest(GuestVM):
    """The test guest as libvirt domain ``name`` defined by ``xml``, whose serial console
    goes to ``serial``; the console reader, ``wait_for`` and record stamps of GuestVM read
    it through ``tail -F`` (copied to ``log_path``). ``kill`` is ``virsh destroy``."""

    def __init__(self, daemon: Libvirtd | None, xml: Path, serial: Path, log_path: Path,
                 guest: Guest, paused: bool = False, created: bool = False,
                 run_virsh: Callable[..., Any] = virsh) -> None:
        """``daemon`` None: the domain runs elsewhere (``created``), e.g. in a cluster node,
        whose ``virsh`` is ``run_virsh``."""
        super().__init__([], guest=guest, accel="tcg", log_path=log_path)
        self.daemon, self.xml, self.serial = daemon, xml, serial
        self.run_virsh = run_virsh
        self.name = _domain_name(xml)
        self.paused, self.created = paused, created
        self.cmd = ["tail", "-c", "+1", "-F", str(serial)]

    def start(self) -> LibvirtGuest:
        """``virsh create`` (unless the domain was ``created`` by someone else, e.g. the
        controller's hook), then follow its console; ``started_at`` is before the create."""
        t0 = time.monotonic()
        if not self.created:
            assert self.daemon is not None
            self.daemon.create(self.xml, self.paused)
        elif self.daemon is not None:
            self.daemon.domains.append(self.name)
        super().start()
        self.started_at = t0
        return self

    def qmp(self, command: str, **arguments: Any) -> Any:
        raise QemuError("libvirt owns this guest's monitor: use virsh")

    def kill(self) -> None:
        """``virsh destroy`` (QEMU gets SIGTERM then SIGKILL, as a dying host stops it), then
        stop following the console once everything it wrote has been read."""
        self.run_virsh("destroy", self.name, check=False, timeout=30)
        deadline = time.monotonic() + 5
        while (time.monotonic() < deadline and self.serial.exists()
               and self.log_path.exists()
               and self.log_path.stat().st_size < self.serial.stat().st_size):
            time.sleep(0.02)
        super().kill()


#: libvirt in a cluster node (tests/helpers/cluster.py): the node's own folders bound over
#: libvirt's, in the node's mount namespace (/run is already the node's own), then the two daemons.
#: ``namespaces = []``: QEMU stays in the node's mount namespace, by which a power cut and the
#: fence agent find the node's processes (libvirt's default gives each QEMU one of its own).
#: QEMU's capabilities probed by the host's libvirtd, if any, are copied (same binary: still
#: valid), so the node's libvirtd does not probe again.
NODE_SETUP = r"""
f=$1
mkdir -p $f/etc $f/lib $f/cache/qemu/capabilities $f/log/qemu
printf 'user = "root"\ngroup = "root"\nnamespaces = []\n' > $f/etc/qemu.conf
cp /var/cache/libvirt/qemu/capabilities/*.xml $f/cache/qemu/capabilities/ 2>/dev/null || true
mount --bind $f/etc /etc/libvirt
mount --bind $f/lib /var/lib/libvirt
mount --bind $f/cache /var/cache/libvirt
mount --bind $f/log /var/log/libvirt
virtlogd -d
libvirtd -d
"""


def start_in_node(run: Callable[[list[str]], Any], folder: Path,
                  timeout: float = START_TIMEOUT) -> float:
    """Start libvirt in a cluster node (``run``: the node's ``ClusterNode.run``), its state in
    ``folder``; the seconds until it answered. A power cut of the node ends it."""
    t0 = time.monotonic()
    run(["sh", "-ec", NODE_SETUP, "sh", str(folder)])
    deadline = time.monotonic() + timeout
    while run(["virsh", "-c", URI, "version"], check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd in the node did not answer within {timeout:g}s")
        time.sleep(0.2)
    return time.monotonic() - t0
