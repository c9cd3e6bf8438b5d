"""A minimal nbdkit Python plugin serving a raw file, as a repdisk secondary's replica
export does to a primary: plain, and under ``NAME+batch`` through repdisk's BatchView
(batch.py), so a batching forwarder can be tested without a whole secondary node.

    nbdkit python tests/helpers/batchserver.py file=IMG [jitter=SECONDS]

``jitter``: each write sleeps a random time up to this long first, so that requests in
flight together finish out of order (the forwarder's order rules must hold anyway).
"""

import errno
import os
import random
import sys
import time

import nbdkit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from repdisk.block.rawimage import RawImage  # noqa: E402
from repdisk.errors import BlockIOError  # noqa: E402
from repdisk.replication.batch import EXPORT_SUFFIX, BatchView  # noqa: E402
from repdisk.replication.sessions import split_tag  # noqa: E402

API_VERSION = 2
_path = ""
_jitter = 0.0
_image = None


def config(key, value):
    global _path, _jitter
    if key == "file":
        _path = value
    elif key == "jitter":
        _jitter = float(value)
    else:
        raise RuntimeError(f"unknown key {key}")


def config_complete():
    global _image
    _image = RawImage.open(_path)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    name, _token, _writer = _call(split_tag, nbdkit.export_name())  # sessions not fenced here
    return BatchView(_image) if name.endswith(EXPORT_SUFFIX) else _image


def get_size(h):
    return h.size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def _call(fn, *args):
    try:
        return fn(*args)
    except BlockIOError as err:
        nbdkit.set_error(err.errno or errno.EIO)
        raise


def _wait():
    if _jitter:
        time.sleep(random.random() * _jitter)


def pread(h, buf, offset, flags):
    _call(h.pread_into, memoryview(buf), offset)


def pwrite(h, buf, offset, flags):
    _wait()
    _call(h.pwrite, buf, offset, bool(flags & nbdkit.FLAG_FUA))


def zero(h, count, offset, flags):
    _wait()
    _call(h.zero, offset, count, bool(flags & nbdkit.FLAG_FUA))


def trim(h, count, offset, flags):
    _call(h.trim, offset, count, bool(flags & nbdkit.FLAG_FUA))


def flush(h, flags):
    _call(h.flush)
