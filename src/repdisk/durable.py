"""Replacing a small file durably: the one way repdisk writes its state, dirty maps and metrics.

The rule: the new contents go to a temporary file in the same directory, which is
flushed to stable storage (fsync), renamed over the old name, and then the directory is
fsynced too.  A crash (of the process or of the host) at any moment leaves either the old
file or the new one, never a torn or empty one, and once :func:`replace_file` returns the
new file survives a host crash.  A reader (a metrics scraper) never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["replace_file"]


def replace_file(path: str | os.PathLike[str], data: str | bytes,
                 mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) atomically and durably, as ``mode``."""
    name = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(name))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(name)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
