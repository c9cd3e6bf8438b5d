"""The VM tests' guest: a Debian cloud kernel + busybox initramfs booting an ext4 disk.

- :mod:`.build`: ``ensure_guest()`` (cached build), ``build_disk()``, ``build_raw_disk()``
- :mod:`.qemu`: ``GuestVM`` (one QEMU process), ``Drive``, ``nbd_uri()``, ``choose_accel()``
- :mod:`.checker`: ``check_records()``, ``fsck_clean()``, ``crash_fsck_clean()``
- :mod:`.exports`: ``nbdkit_file()`` (serve an image over NBD)

Workloads (kernel command line ``repdisk.workload=...``, see guest-init.sh and workload.sh):
``idle``; ``records`` (``repdisk.records=N`` more records, 0 = forever,
``repdisk.interval=S`` seconds between them); ``poweroff-after`` (N records, then a clean
poweroff). Console markers: REPDISK-BOOTED, REPDISK-RESUME next=N, REPDISK-RECORD N,
REPDISK-DONE, REPDISK-POWEROFF, REPDISK-FAIL: reason.
"""

from .build import Guest, build_disk, build_raw_disk, ensure_guest
from .checker import check_records, crash_fsck_clean, fsck_clean, record_line
from .exports import nbdkit_file
from .qemu import Drive, GuestVM, QemuError, choose_accel, nbd_uri, qemu_available

__all__ = ["Drive", "Guest", "GuestVM", "QemuError", "build_disk", "build_raw_disk",
           "check_records", "choose_accel", "crash_fsck_clean", "ensure_guest", "fsck_clean",
           "nbd_uri", "nbdkit_file", "qemu_available", "record_line"]
