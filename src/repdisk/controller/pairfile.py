"""The pair file (``CONTROL.pair``): which nodes a controller's pair is, across its restarts.

Promotions and switchovers replace or swap the nodes that the controller's options name;
the file remembers where they went, with the options that named the pair first, so a
controller restarted with those options runs the pair as it is now.  Options that differ
from those, even only in their order (a resource file whose sections were swapped), win
over the file.  The roles in the file are only a start: the controller still asks the
nodes.
"""

from __future__ import annotations

import json
import logging

from repdisk import durable

log = logging.getLogger(__name__)


def recall(path: str, options: tuple[str, str], *,
           any_order: bool = False) -> tuple[str, str] | None:
    """The pair's (primary, secondary) control sockets now, from the file at ``path``, if it
    is about the pair that ``options`` (the controller's --primary, --secondary) name, in
    that order (``any_order``: in either order, which is how ``down`` and ``status`` find
    the pair's nodes after the resource file's sections were swapped).

    None if there is no file, or it is about other options (those that name other nodes, or
    the same nodes in other roles, win); a file that cannot be read is logged and ignored."""
    try:
        with open(path) as f:
            rec = json.load(f)
        first, now = rec["options"], (rec["primary"], rec["secondary"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the pair file %s (%s): running the pair the options name",
                    path, err)
        return None
    if (sorted(first) != sorted(options)) if any_order else (list(first) != list(options)):
        return None
    return now


def recall_primary(path: str, options: tuple[str, str]) -> tuple[str | None, int | None]:
    """The pair's write mode and max-lag as the file at ``path`` remembers them (None for
    each: no such file, one about another pair, or one written before it held it)."""
    try:
        with open(path) as f:
            rec = json.load(f)
        if sorted(rec["options"]) != sorted(options):
            return None, None
        mode, max_lag = rec.get("write_mode"), rec.get("max_lag")
        return (mode if isinstance(mode, str) else None,
                max_lag if isinstance(max_lag, int) and not isinstance(max_lag, bool)
                else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


def remember(path: str, options: tuple[str, str], primary: str, secondary: str,
             write_mode: str, max_lag: int | None = None) -> None:
    """Write the file at ``path`` durably (after every change of the pair's nodes or of its
    primary's write mode or max-lag): the pair is ``primary``, ``secondary`` now, named
    first by the options the file already holds if they are ``options``, else by
    ``options``.  A failure is logged."""
    try:
        with open(path) as f:
            first = json.load(f)["options"]
    except (OSError, ValueError, KeyError, TypeError):
        first = None
    if first is None or list(first) != list(options):
        first = list(options)
    try:
        durable.replace_file(path, json.dumps({
            "options": first, "primary": primary, "secondary": secondary,
            "write_mode": write_mode, "max_lag": max_lag}) + "\n")
    except OSError as err:
        log.warning("cannot write the pair file %s: %s (a restart with the first "
                    "options will not find the nodes that replaced them)", path, err)
