"""Build the VM tests' guest from Debian packages, once, into a cache.

The guest is Debian's cloud kernel (``linux-image-cloud-amd64`` resolved to its versioned
package, fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``, never installed),
an initramfs (busybox-static, the virtio modules, ``initramfs-init.sh``) that mounts /dev/vda and
switch_roots to it, and a root tree (busybox, ``guest-init.sh``, ``workload.sh``) that
:func:`build_disk` turns into an ext4 image with ``mke2fs -d``: the workload runs from, and
writes to, the disk under test.

A build lives in ``<cache>/guest-<kernel deb>-<hash of the build inputs>/`` and is reused while
neither the kernel package nor any input (these sources, the busybox binary) changes. The
cache is ``vmtests/.cache/`` (git-ignored) unless ``REPDISK_VM_CACHE`` names another.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("REPDISK_VM_CACHE", HERE.parent / ".cache"))
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Loaded in this order by the initramfs; modules built into the kernel are skipped, and the
# dependencies a module's .modinfo names are loaded before it.
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk", "ext4")
INPUTS = ("build.py", "initramfs-init.sh", "guest-init.sh", "workload.sh")
RECORDS_PATH = "/data/records.log"
CONF_PATH = "/etc/repdisk.conf"
SLOT_SIZE = 512


class GuestBuildError(RuntimeError):
    """The guest could not be built; the message says which step failed and what to do."""


@dataclass(frozen=True)
class Guest:
    """A built guest: boot ``kernel`` with ``initramfs``; ``rootfs`` is the disk's tree."""

    kernel: Path
    initramfs: Path
    rootfs: Path
    kernel_version: str


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a build command, returning stdout; a failure names the command and its stderr."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Serialise builds between test processes that share the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def apt_retry(cmd: list[str], cwd: Path | None = None) -> str:
    """Run an apt command; if it fails (typically: no package lists yet), update once, retry."""
    try:
        return run(cmd, cwd)
    except GuestBuildError as err:
        log.info("%s; running apt-get update once", err)
        run(["apt-get", "update", "-qq"])
        return run(cmd, cwd)


def resolve_kernel_package() -> str:
    """The versioned kernel package that the cloud meta-package depends on."""
    out = apt_retry(["apt-cache", "depends", KERNEL_META_PACKAGE])
    found = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", out)
    if not found:
        raise GuestBuildError(f"apt-cache depends {KERNEL_META_PACKAGE}: no versioned "
                              f"linux-image dependency in {out!r}")
    return found.group(1)


def fetch_deb(package: str, debs: Path) -> Path:
    """The package's .deb in ``debs``, downloaded with ``apt-get download`` if not there yet."""
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        apt_retry(["apt-get", "download", "-q", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise GuestBuildError(f"apt-get download {package} left no .deb in {debs}")
    return found[-1]


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF64 executable without a PT_INTERP (dynamic loader) header."""
    data = memoryview(path.read_bytes())
    if bytes(data[:5]) != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    return all(int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little") != 3
               for i in range(phnum))


def find_busybox(cache: Path) -> Path:
    """A static busybox: the installed busybox-static's, else one unpacked from its .deb."""
    installed = Path("/bin/busybox")
    if installed.exists() and is_static_elf(installed):
        return installed
    unpacked = cache / "busybox-static"
    binary = unpacked / "bin" / "busybox"
    if not binary.exists():
        run(["dpkg-deb", "-x", str(fetch_deb(BUSYBOX_PACKAGE, cache / "debs")), str(unpacked)])
    if not is_static_elf(binary):
        raise GuestBuildError(f"{binary} is not a static executable: install busybox-static")
    return binary


def modinfo(ko: bytes, key: str) -> list[str]:
    """The values of ``key`` in a module image's .modinfo section (NUL-separated key=value)."""
    return [m.decode() for m in re.findall(rb"(?<![^\0])" + key.encode() + rb"=([^\0]*)", ko)]


def module_needs(ko: bytes) -> list[str]:
    """What must be loaded before a module: its ``depends`` and its ``softdep`` "pre:" names.

    Softdeps matter for ext4 as a module: jbd2 and ext4 find crc32c through the crypto API,
    so nothing in ``depends`` pulls the crc32c implementation in.
    """
    needs = [d for line in modinfo(ko, "depends") for d in line.split(",") if d]
    for line in modinfo(ko, "softdep"):
        pre = re.search(r"pre:\s*([^:]*?)\s*(?:post:|$)", line)
        needs += pre.group(1).split() if pre else []
    return needs


def read_module(path: Path) -> bytes:
    """A module's ELF image, decompressed if the kernel ships it compressed."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".zst":
        raise GuestBuildError(f"{path}: zstd-compressed modules are not supported")
    return path.read_bytes()


def collect_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """(name, ELF image) of each needed loadable module, dependencies before dependants.

    Names may be aliases (softdeps say "crc32c", the module is crc32c_generic); the package
    has no modules.alias (depmod makes it at install), so aliases are looked up in the
    modules' own .modinfo, only when a name is not a module file.
    """
    builtin = module_names((moddir / "modules.builtin").read_text().split())
    files = {module_name(p): p for p in moddir.rglob("*.ko*")}
    aliases: dict[str, str] = {}
    ordered: dict[str, bytes] = {}

    def resolve(alias: str) -> str:
        name = alias.replace("-", "_")
        if name in builtin or name in files:
            return name
        if not aliases:  # built-in modules' aliases win: nothing to load for them
            aliases.update((a, n) for n, p in files.items()
                           for a in modinfo(read_module(p), "alias"))
            aliases.update(builtin_aliases(moddir))
        return aliases.get(alias, name).replace("-", "_")

    def add(name: str) -> None:
        name = resolve(name)
        if name in builtin or name in ordered:
            return
        if name not in files:
            raise GuestBuildError(f"module {name} is neither built into nor shipped with "
                                  f"the kernel in {moddir}")
        image = read_module(files[name])
        ordered[name] = b""  # placeholder: guards against dependency cycles
        for dep in module_needs(image):
            add(dep)
        del ordered[name]
        ordered[name] = image

    for name in MODULES:
        add(name)
    return list(ordered.items())


def builtin_aliases(moddir: Path) -> dict[str, str]:
    """alias -> module for the built-in modules (modules.builtin.modinfo: "mod.key=value")."""
    entries = (moddir / "modules.builtin.modinfo").read_bytes().split(b"\0")
    return {value: mod for mod, _, value in
            (e.decode().partition(".alias=") for e in entries) if value}


def module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def module_names(paths: list[str]) -> set[str]:
    return {module_name(Path(p)) for p in paths}


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks as its initramfs.

    Written in Python rather than with cpio(1) so that /dev/console can be a real device node
    without root: the kernel opens it for init's stdio before devtmpfs is mounted.
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts += [header, b"\0" * (-len(header) % 4), data, b"\0" * (-len(data) % 4)]

    def dir(self, name: str) -> None:
        self.add(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self.add(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def build_initramfs(busybox: Path, modules: list[tuple[str, bytes]]) -> bytes:
    """The gzip'd initramfs: busybox, /init, the modules and their load order."""
    cpio = Cpio()
    for name in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.dir(name)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes())
    for applet in applets(busybox):
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("init", (HERE / "initramfs-init.sh").read_bytes())
    for name, image in modules:
        cpio.file(f"lib/modules/{name}.ko", image, 0o644)
    cpio.file("lib/modules/load.order", "".join(f"{n}\n" for n, _ in modules).encode(), 0o644)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def applets(busybox: Path) -> list[str]:
    """The applet names this busybox provides (each gets a /bin symlink)."""
    return [a for a in run([str(busybox), "--list"]).split() if a != "busybox" and "/" not in a]


def build_rootfs(busybox: Path, dest: Path) -> None:
    """The tree that build_disk copies into every disk image."""
    for name in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "data", "repdisk"):
        (dest / name).mkdir(parents=True)
    shutil.copy(busybox, dest / "bin" / "busybox")
    for applet in applets(busybox):
        (dest / "bin" / applet).symlink_to("busybox")
    shutil.copy(HERE / "guest-init.sh", dest / "sbin" / "init")
    shutil.copy(HERE / "workload.sh", dest / "repdisk" / "workload.sh")
    (dest / "sbin" / "init").chmod(0o755)


def inputs_hash(busybox: Path) -> str:
    """A hash of everything but the kernel that a build depends on."""
    h = hashlib.sha256(busybox.read_bytes())
    for name in INPUTS:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return h.hexdigest()[:12]


def build(kernel_deb: Path, busybox: Path, out: Path) -> None:
    """Unpack the kernel and build the initramfs and root tree into ``out`` (a new dir)."""
    with tempfile.TemporaryDirectory(prefix="repdisk-kernel-") as tmp:
        run(["dpkg-deb", "-x", str(kernel_deb), tmp])
        (vmlinuz,) = Path(tmp, "boot").glob("vmlinuz-*")
        (moddir,) = Path(tmp, "lib", "modules").iterdir()
        modules = collect_modules(moddir)
        out.mkdir(parents=True)
        shutil.copy(vmlinuz, out / "vmlinuz")
        (out / "version").write_text(moddir.name)
    (out / "initramfs.gz").write_bytes(build_initramfs(busybox, modules))
    build_rootfs(busybox, out / "rootfs")
    log.info("built guest for %s: modules %s", kernel_deb.name, " ".join(n for n, _ in modules))


def guest_from(path: Path) -> Guest:
    return Guest(path / "vmlinuz", path / "initramfs.gz", path / "rootfs",
                 (path / "version").read_text())


def ensure_guest(cache: Path = CACHE_DIR) -> Guest:
    """The guest for the current cloud kernel, built (about 5 s plus the download) if needed.

    When apt cannot say which kernel is current even after an update (no network), the
    newest build already in the cache is used.
    """
    with cache_lock(cache):
        busybox = find_busybox(cache)
        try:
            package = resolve_kernel_package()
        except GuestBuildError:
            built = sorted(cache.glob("guest-*/version"), key=lambda p: p.stat().st_mtime)
            if not built:
                raise
            log.warning("cannot resolve %s; using cached %s", KERNEL_META_PACKAGE, built[-1].parent)
            return guest_from(built[-1].parent)
        kernel_deb = fetch_deb(package, cache / "debs")
        out = cache / f"guest-{kernel_deb.stem}-{inputs_hash(busybox)}"
        if not (out / "version").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
            try:
                build(kernel_deb, busybox, tmp / "guest")
                shutil.rmtree(out, ignore_errors=True)
                (tmp / "guest").rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return guest_from(out)


def build_disk(path: Path | str, size_mb: int = 64, raw_mb: int = 8,
               guest: Guest | None = None) -> Path:
    """Write a raw guest disk image: ext4 with the root tree, then a raw record region.

    The first ``size_mb - raw_mb`` MiB are the ext4 filesystem (``mke2fs -d``, inode tables and
    journal initialised now so that the guest's kernel does no background zeroing of its
    own); the last ``raw_mb`` MiB are the raw region the records workload writes when no
    second disk is attached (its offset is in /etc/repdisk.conf, read by guest and checker).
    """
    if raw_mb < 1 or size_mb - raw_mb < 16:
        raise ValueError(f"disk of {size_mb} MiB with a {raw_mb} MiB raw region: "
                         f"the filesystem needs at least 16 MiB")
    guest = guest or ensure_guest()
    path = Path(path)
    fs_bytes = (size_mb - raw_mb) << 20
    with tempfile.TemporaryDirectory(prefix="repdisk-rootfs-") as tmp:
        tree = Path(tmp, "root")
        shutil.copytree(guest.rootfs, tree, symlinks=True)
        (tree / CONF_PATH.lstrip("/")).write_text(
            f"RAW_OFFSET={fs_bytes}\nRAW_SLOTS={(raw_mb << 20) // SLOT_SIZE}\n")
        with open(path, "wb") as f:
            f.truncate(size_mb << 20)
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "repdisk",
             "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(tree), str(path),
             str(fs_bytes // 4096)])
    return path


def build_raw_disk(path: Path | str, size_mb: int = 8) -> Path:
    """Write a zeroed second disk: attached as /dev/vdb it becomes the raw record region."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    return path
