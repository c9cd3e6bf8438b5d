"""The ``repdisk`` command's entry point.

Loading the CLI takes a moment (libnbd, qemu.qmp); a Ctrl-C meanwhile ends the command
the way a C tool's does, silently with status 130, not with a Python traceback.
:func:`repdisk.cli.main.main` handles Ctrl-C itself once it runs.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)

from repdisk.cli.main import main  # noqa: E402 - after the handler, on purpose

__all__ = ["main"]
