"""Serve a disk image over NBD on a Unix socket with nbdkit, for a guest to boot from."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .qemu import die_with_parent, nbd_uri


@contextmanager
def nbdkit_file(image: Path | str, timeout: float = 10.0) -> Iterator[str]:
    """Yield the NBD URI of ``nbdkit file IMAGE``; nbdkit is killed on exit (and dies with us)."""
    sockdir = Path(tempfile.mkdtemp(prefix="repdisk-nbd-"))
    sock, errlog = sockdir / "nbd.sock", sockdir / "nbdkit.log"
    with open(errlog, "wb") as stderr:
        proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--exit-with-parent", "file",
                                 str(image)], stdin=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit file {image}: no socket {sock} after "
                                   f"{timeout:g}s: {errlog.read_text().strip()}")
            time.sleep(0.02)
        yield nbd_uri(sock)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
